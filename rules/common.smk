# Lookups only: validated config, wildcard constraints, the layout of every path, and the stage scripts.
# The logic behind them lives in scripts/snaketune/ (config.py, layout.py, workflow.py) where it is unit-tested.
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))

from snaketune import layout as paths
from snaketune import workflow as stages
from snaketune.config import load_files
from snaketune.errors import UserError
from snaketune.exam import exam_files

try:
    # The same loader as plan.py, chat.py and serve.py: the files merged as Snakemake merged them into `config`.
    CFG = load_files(workflow.configfiles, workflow.config_settings.config)
except UserError as problem:
    # One line per problem, no traceback: these are the user's mistakes, not ours.
    for line in str(problem).splitlines():
        sys.stderr.write(f"error: {line}\n")
    sys.exit(1)
LAYOUT = paths.Layout(CFG)


wildcard_constraints:
    model="[A-Za-z0-9][A-Za-z0-9._-]*",
    dataset="[A-Za-z0-9][A-Za-z0-9._-]*",
    run="[A-Za-z0-9][A-Za-z0-9._-]*",
    exam="[A-Za-z0-9][A-Za-z0-9._-]*",
    test_set="[A-Za-z0-9][A-Za-z0-9._-]*",
    gguf_type="f16|bf16|q8_0|f32",
    sweep="[A-Za-z0-9][A-Za-z0-9._-]*",


# The stage scripts are on PATH for every job (as a Nextflow pipeline's bin/ is), so rules call them by name:
# `train.py ...`. Their location is not a param, because where the project is checked out does not change any
# output: a moved checkout or working folder reruns nothing. Their `#!/usr/bin/env python` runs the interpreter of
# the job's environment (the virtualenv, or the rule's conda env).
# Every stage's shell runs `script ... 3>&2 > {log} 2>&1`: fd 3 is Snakemake's own stderr, where a job writes the
# one line that must reach the terminal even when its log cannot be written (a full disk holds the log too).
os.environ["SNAKETUNE_ERROR_FD"] = "3"


envvars:
    "PATH",
    "SNAKETUNE_ERROR_FD",


os.environ["PATH"] = os.pathsep.join(
    [str(Path(workflow.basedir) / "scripts"), os.environ.get("PATH", "")]
)


def run_model_manifest(wildcards):
    return LAYOUT.model_file("model_manifest", CFG.runs[wildcards.run].model)


def run_start_model(wildcards):
    """Input function: the merged model of the run this one starts from (from_run), as `start`; else nothing."""
    return LAYOUT.start_model(wildcards.run)


def run_start_argument(wildcards, input):
    """Command-line option of train and merge: the model to start from, when the run has from_run."""
    return f"--start-model {quote(input.start)}" if "start" in input.keys() else ""


def run_dataset_file(name):
    """Input function: one file of the dataset build a run trains on."""
    return lambda wildcards: LAYOUT.dataset_file(name, wildcards.run)


def run_model_arguments(wildcards, input):
    """Command-line model of predict and exam: the merged folder, the base manifest and the adapter, or (a
    baseline) the base manifest alone."""
    if "adapter" in input.keys():
        return (
            f"--model-manifest {quote(input.manifest)} --adapter {quote(input.adapter)}"
        )
    if "manifest" in input.keys():
        return f"--model-manifest {quote(input.manifest)}"
    return f"--model {quote(input.model)}"


def dataset_source_arguments(wildcards, input):
    """Command-line sources of a dataset build besides its settings' files: a replay dataset's generated answers
    (--replay), or a mix's datasets (--mix-train, --mix-eval, --mix-stats: one each, in the mix's order; --mix-test:
    the first one's test split)."""
    if "replay" in input.keys():
        return f"--replay {quote(input.replay)}"
    if "mix_test" not in input.keys():
        return ""
    lists = " ".join(
        f"--{name.replace('_', '-')} " + " ".join(quote(path) for path in input[name])
        for name in ("mix_train", "mix_eval", "mix_stats")
    )
    return f"{lists} --mix-test {quote(input.mix_test)}"


def run_train_summary(wildcards):
    """Input function: the train summary of a run that trains (evaluate reads its preference scores); none for a
    baseline, which has no train job."""
    if not LAYOUT.trains(wildcards.run):
        return {}
    return {"summary": LAYOUT.run_file("train_summary", wildcards.run)}


def run_train_summary_argument(wildcards, input):
    return (
        f"--train-summary {quote(input.summary)}" if "summary" in input.keys() else ""
    )


def quote(value):
    import shlex

    return shlex.quote(str(value))


onstart:
    # Refused before any job starts (workflow.preflight): several nodes without Slurm, a stage that cannot fit the
    # machine the profile declares (`snakemake plan` prints the whole plan).
    refusals = stages.preflight(
        CFG,
        workflow.executor_plugin.name if workflow.executor_plugin else "",
        {job.rule.name for job in workflow.dag.targetjobs},
    )
    for line in refusals:
        sys.stderr.write(f"error: {line}\n")
    if refusals:
        sys.exit(1)
