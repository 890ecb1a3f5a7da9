"""What the Snakefile needs from the config, kept here so it is plain Python with tests.

Each ``*_settings`` function returns exactly the settings that change a stage's output, as compact JSON; the
rules pass it as a ``params`` value, so Snakemake reruns a stage when, and only when, those settings change.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from snaketune.config import WorkflowConfig
from snaketune.dataset import DatasetSettings
from snaketune.errors import UserError
from snaketune.evaluate import EvalSettings
from snaketune.merge import MergeSettings
from snaketune.predict import GenerationSettings
from snaketune.report import RUN_COLUMNS
from snaketune.train import TrainSettings


def as_json(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, ensure_ascii=False)


def pick(source: dict[str, Any], settings_class) -> dict[str, Any]:
    names = {f.name for f in fields(settings_class)}
    return {key: value for key, value in source.items() if key in names}


def download_settings(cfg: WorkflowConfig, model: str) -> str:
    return as_json({**cfg.models[model], "name": model})


def dataset_settings(cfg: WorkflowConfig, dataset: str) -> str:
    return as_json(pick(cfg.datasets[dataset], DatasetSettings))


def dataset_files(cfg: WorkflowConfig, dataset: str) -> list[str]:
    """The files a dataset build reads: its data files, and the dataset_info.json that named them."""
    entry = cfg.datasets[dataset]
    files = [entry["path"]] if isinstance(entry["path"], str) else list(entry["path"])
    return files + ([entry["dataset_info"]] if entry.get("dataset_info") else [])


def train_settings(cfg: WorkflowConfig, run: str) -> str:
    return as_json(pick(cfg.runs[run], TrainSettings))


def merge_settings(cfg: WorkflowConfig, run: str) -> str:
    return as_json(pick(cfg.runs[run]["merge"], MergeSettings))


def generation_settings(cfg: WorkflowConfig, run: str) -> str:
    return as_json({**pick(cfg.runs[run]["generation"], GenerationSettings), "seed": cfg.runs[run]["seed"]})


def predict_model_inputs(cfg: WorkflowConfig, run: str) -> dict[str, str]:
    """What predict reads: the merged model, or (predict_from: adapter) the base manifest and the adapter."""
    if cfg.runs[run]["generation"]["predict_from"] == "adapter":
        return {"manifest": f"results/models/{cfg.runs[run]['model']}/manifest.json",
                "adapter": f"results/runs/{train_owner(cfg, run)}/adapter"}
    return {"model": f"results/runs/{merge_owner(cfg, run)}/merged"}


def benchmark_outputs(cfg: WorkflowConfig) -> list[str]:
    """One result file per (run, benchmark it names), in config order."""
    return [f"results/runs/{run}/benchmarks/{name}.json" for run, entry in cfg.runs.items()
            for name in entry["evaluation"]["benchmarks"]]


def benchmark_settings(cfg: WorkflowConfig, run: str) -> str:
    return as_json({"shots": cfg.runs[run]["evaluation"]["shots"],
                    "batch_size": cfg.runs[run]["generation"]["batch_size"]})


def eval_settings(cfg: WorkflowConfig, run: str) -> str:
    """Settings of evaluate; the benchmark keys belong to exam and are left out, so
    changing them does not rescore the predictions."""
    settings = pick(cfg.runs[run]["evaluation"], EvalSettings)
    return as_json({k: v for k, v in settings.items() if k not in ("benchmarks", "shots")})


def report_runs(cfg: WorkflowConfig) -> str:
    """The per-run columns of the leaderboard, in config order."""
    return as_json([{**{k: run.get(k) for k in RUN_COLUMNS}, "run": name} for name, run in cfg.runs.items()])


def sweep_settings(cfg: WorkflowConfig) -> str:
    """Each sweep's runs with their swept values, and how the best one is picked (in expansion order)."""
    return json.dumps(cfg.sweeps, ensure_ascii=False)


def _first_run_like(cfg: WorkflowConfig, run: str, identity) -> str:
    """The first run in config order with the same ``identity`` as ``run``.

    Snakemake asks once per job; the table of first runs is built once per config and identity, not per ask.
    """
    firsts = cfg.cache.get(identity)
    if firsts is None:
        firsts = {}
        for name in cfg.runs:
            firsts.setdefault(identity(cfg, name), name)
        cfg.cache[identity] = firsts
    return firsts[identity(cfg, run)]


def _training(cfg: WorkflowConfig, run: str) -> tuple:
    return cfg.runs[run]["model"], cfg.runs[run]["dataset"], train_settings(cfg, run)


def _merged(cfg: WorkflowConfig, run: str) -> tuple:
    return _training(cfg, run) + (merge_settings(cfg, run),)


def _predictions(cfg: WorkflowConfig, run: str) -> tuple:
    return _merged(cfg, run) + (generation_settings(cfg, run),)


def train_owner(cfg: WorkflowConfig, run: str) -> str:
    """The run whose training this run uses: the first one with the same model, data and train settings.

    Runs that differ only in what happens after training (generation, evaluation) share one train job.
    """
    return _first_run_like(cfg, run, _training)


def merge_owner(cfg: WorkflowConfig, run: str) -> str:
    """The run whose merged model this run uses (same training and merge settings)."""
    return _first_run_like(cfg, run, _merged)


def predict_owner(cfg: WorkflowConfig, run: str) -> str:
    """The run whose merged model and predictions this run uses (same training, merge and generation)."""
    return _first_run_like(cfg, run, _predictions)


def serve_run(cfg: WorkflowConfig) -> str:
    """The run `snakemake serve` serves: ``serve_run`` from the config, else the first run."""
    run = cfg.serve_run or next(iter(cfg.runs))
    if run not in cfg.runs:
        raise UserError(f"serve_run: `{run}` is not a run (runs: {', '.join(cfg.runs)})")
    return run
