"""A 2x2 sweep through the real Snakefile: shared steps run once, a new grid value plans only its runs."""

import json

import pandas as pd
import pytest

from conftest import RUN_STAGES, TINY_MODEL, planned_jobs, scratch_workflow, snakemake

pytestmark = pytest.mark.workflow


def sweep_config(rates):
    return {
        "models": {"tiny": TINY_MODEL},
        "datasets": {"identity": {"path": "data/identity.jsonl", "format": "messages", "max_seq_length": 64,
                                  "eval_size": 4, "test_size": 6}},
        "runs": {"grid": {"model": "tiny", "dataset": "identity", "max_steps": 2, "per_device_train_batch_size": 4,
                          "logging_steps": 1, "generation": {"max_new_tokens": 4},
                          "sweep": {"learning_rate": rates, "lora_rank": [4, 8]}, "select_by": "rouge-l"}},
    }


def names(rates):
    return [f"grid-learning_rate{r}-lora_rank{k}" for r in rates for k in (4, 8)]


def test_grid_shares_common_steps_and_grows_by_only_the_new_runs(tmp_path):
    config = scratch_workflow(tmp_path, sweep_config([0.01, 0.001]))
    plan = planned_jobs(snakemake(tmp_path, "--configfile", str(config), "--dry-run"))
    assert plan == sorted([("download", "model=tiny"), ("dataset", "dataset=identity, model=tiny"),
                           ("report", "")] + [(rule, f"run={run}") for run in names([0.01, 0.001])
                                              for rule in RUN_STAGES])

    snakemake(tmp_path, "--configfile", str(config), check=True)
    table = pd.read_csv(tmp_path / "results" / "sweeps" / "grid" / "runs.csv")
    assert list(table["run"]) == names([0.01, 0.001]) and list(table.columns) == ["run", "learning_rate",
                                                                                   "lora_rank", "rouge-l"]
    best = json.loads((tmp_path / "results" / "sweeps" / "grid" / "best.json").read_text())
    assert best["run"] in names([0.01, 0.001]) and best["value"] == table["rouge-l"].max()
    assert best["load"] == {"model": f"results/runs/{best['run']}/merged"}  # each point trains its own adapter
    assert "Sweep grid" in (tmp_path / "results" / "report.html").read_text()
    shown = snakemake(tmp_path, "best", "--configfile", str(config), check=True)
    assert f'"model": "results/runs/{best["run"]}/merged"' in shown.stdout + shown.stderr

    grown = scratch_workflow(tmp_path, sweep_config([0.01, 0.001, 0.1]))
    plan = planned_jobs(snakemake(tmp_path, "--configfile", str(grown), "--dry-run"))
    assert plan == sorted([("report", "")] + [(rule, f"run={run}") for run in names([0.1]) for rule in RUN_STAGES])


def test_runs_differing_only_after_training_share_the_training(tmp_path):
    config = sweep_config([0.01])
    base = {k: v for k, v in config["runs"]["grid"].items() if k not in ("sweep", "select_by")}
    config["runs"] = {
        "a": base,
        "a-words": {**base, "evaluation": {"text_tokenizer": "whitespace"}},  # same predictions, scored otherwise
        "a-longer": {**base, "generation": {"max_new_tokens": 8}},  # same adapter, generated otherwise
    }
    path = scratch_workflow(tmp_path, config)
    plan = planned_jobs(snakemake(tmp_path, "--configfile", str(path), "--dry-run"))
    assert plan == sorted([  # one train and one merge; a second predict only for other generation settings
        ("download", "model=tiny"), ("dataset", "dataset=identity, model=tiny"), ("report", ""),
        ("train", "run=a"),
        ("merge", "run=a"),
        ("predict", "run=a"), ("predict", "run=a-longer"),
        ("evaluate", "run=a"), ("evaluate", "run=a-words"),
        ("evaluate", "run=a-longer"),
    ])
