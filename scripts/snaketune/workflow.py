"""What the Snakefile needs from the config besides paths (those are layout.py's), kept here as plain Python.

Each ``*_settings`` function returns exactly the settings that change a stage's output, as compact JSON; the
rules pass it as a ``params`` value, so Snakemake reruns a stage when, and only when, those settings change.
A setting added since (``settings.added``) is left out while it holds the value that changes no output.
"""

from __future__ import annotations

import json
from typing import Any

from snaketune.config import WorkflowConfig
from snaketune.errors import UserError
from snaketune.layout import Layout
from snaketune.settings import job_params


def as_json(settings: Any) -> str:
    return json.dumps(settings, sort_keys=True, ensure_ascii=False)


def download_settings(cfg: WorkflowConfig, model: str) -> str:
    return as_json({**cfg.models[model], "name": model})


def dataset_settings(cfg: WorkflowConfig, dataset: str) -> str:
    """What a build depends on: every dataset setting but ``num_workers`` (the rule's threads; a new worker count
    must not rebuild a finished dataset)."""
    settings = job_params(cfg.datasets[dataset])
    del settings["num_workers"]
    return as_json(settings)


def dataset_threads(cfg: WorkflowConfig, dataset: str) -> int:
    """The dataset rule's threads, its worker processes: ``num_workers``, else every core of this machine (a local
    run gives a job at most --cores; the build uses no more cores than it may run on)."""
    import os

    return cfg.datasets[dataset].num_workers or os.cpu_count() or 1


def replay_settings(cfg: WorkflowConfig, dataset: str) -> str:
    """What a replay dataset's answers depend on: the prompts, the system prompt, the template and the length."""
    settings = cfg.datasets[dataset]
    return as_json({"prompts": settings.replay, "system": settings.system, "template": settings.template,
                    "max_new_tokens": settings.replay_max_new_tokens})


def train_settings(cfg: WorkflowConfig, run: str) -> str:
    return as_json(job_params(cfg.runs[run].train))


def merge_settings(cfg: WorkflowConfig, run: str) -> str:
    return as_json(job_params(cfg.runs[run].merge))


def generation_settings(cfg: WorkflowConfig, run: str) -> str:
    return as_json(job_params(cfg.runs[run].generation))


def exam_settings(cfg: WorkflowConfig, run: str) -> str:
    return as_json(job_params(cfg.runs[run].exam))


def eval_settings(cfg: WorkflowConfig, run: str) -> str:
    """Settings of evaluate; the exam keys belong to the exam rule and are left out, so changing them does not
    rescore the predictions."""
    settings = job_params(cfg.runs[run].evaluation)
    return as_json({k: v for k, v in settings.items() if k not in ("exams", "shots", "test_sets")})


def report_records(cfg: WorkflowConfig, layout: Layout) -> str:
    """One record per run (its columns and the files the report reads), in config order."""
    return as_json([layout.report_record(run) for run in cfg.runs])


def sweep_settings(cfg: WorkflowConfig, layout: Layout) -> str:
    """Each sweep's runs with their swept values (in expansion order: not sorted), how the best one is picked,
    and the files it writes."""
    sweeps = {name: {**sweep, "files": layout.sweep_files(name)} for name, sweep in cfg.sweeps.items()}
    return json.dumps(sweeps, ensure_ascii=False)


def serve_run(cfg: WorkflowConfig) -> str:
    """The run `snakemake serve` serves: ``serve_run`` from the config, else the first run."""
    run = cfg.serve_run or next(iter(cfg.runs))
    if run not in cfg.runs:
        raise UserError(f"serve_run: `{run}` is not a run (runs: {', '.join(cfg.runs)})")
    return run


def preflight(cfg: WorkflowConfig, executor: str, targets: set[str]) -> list[str]:
    """Why the workflow must not start, one line each (empty: start). Checked before any job runs, not hours in:

    - a run that spans several nodes needs the Slurm executor;
    - a stage that cannot fit the machine the profile declares (``gpu_memory_gib``, ``disk_gib``), unless the only
      target is ``plan``, which prints exactly that.

    ``executor``: the executor plugin's name (``local``, ``slurm`` ...); ``targets``: the rule names of the
    target jobs.
    """
    from snaketune.plan import plan, problems

    spanning = [name for name, run in cfg.runs.items() if run.train.nodes > 1]
    if spanning and "slurm" not in executor:
        nodes = cfg.runs[spanning[0]].train.nodes
        return [f"runs.{spanning[0]}.nodes: {nodes} nodes need a Slurm cluster (--profile profiles/slurm); on one "
                "machine set nodes: 1 and gpus: <its GPUs>"]
    if targets == {"plan"}:
        return []
    return problems(plan(cfg), cfg.gpu_memory_gib, cfg.disk_gib)
