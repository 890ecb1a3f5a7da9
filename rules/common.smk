# Lookups only: validated config, wildcard constraints, input functions and paths.
# The logic behind them lives in scripts/snaketune/ (config.py, workflow.py) where it is unit-tested.
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))

from snaketune import workflow as stages
from snaketune.exam import benchmark_files
from snaketune.config import load as load_config
from snaketune.errors import UserError

try:
    CFG = load_config(config, workflow.configfiles)
except UserError as problem:
    # One line per problem, no traceback: these are the user's mistakes, not ours.
    for line in str(problem).splitlines():
        sys.stderr.write(f"error: {line}\n")
    sys.exit(1)


wildcard_constraints:
    model="[A-Za-z0-9][A-Za-z0-9._-]*",
    dataset="[A-Za-z0-9][A-Za-z0-9._-]*",
    run="[A-Za-z0-9][A-Za-z0-9._-]*",
    benchmark="[A-Za-z0-9][A-Za-z0-9._-]*",


def script(name):
    """Path of a stage script, relative to the working directory when it can be."""
    return os.path.relpath(Path(workflow.basedir) / "scripts" / f"{name}.py")


def model_manifest(model):
    return f"results/models/{model}/manifest.json"


def dataset_dir(dataset, model):
    return f"results/datasets/{dataset}/{model}"


def run_model_manifest(wildcards):
    return model_manifest(CFG.runs[wildcards.run]["model"])


def run_dataset_file(name):
    """Input function: one file of the dataset build a run trains on."""

    def lookup(wildcards):
        run = CFG.runs[wildcards.run]
        return f"{dataset_dir(run['dataset'], run['model'])}/{name}"

    return lookup


def run_files(name, owner=None):
    """One file per run, in config order; ``owner`` maps a run to the run whose file it shares."""
    return [
        f"results/runs/{owner(CFG, run) if owner else run}/{name}" for run in CFG.runs
    ]


def model_arguments(wildcards, input):
    """Command-line model of predict and benchmark: the merged folder, or the base manifest and the adapter."""
    if "adapter" in input.keys():
        return f"--model-manifest {input.manifest} --adapter {input.adapter}"
    return f"--model {input.model}"


def get_final_output():
    return ["results/leaderboard.csv", "results/report.html"]
