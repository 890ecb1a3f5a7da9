"""README "What reruns when you change something": one test per row, each a dry run against the finished demo."""

import copy
import os

import pytest
import yaml

from conftest import BASELINE_RUNS, planned_jobs, run_stages, snakemake

pytestmark = pytest.mark.workflow

RUNS = ["identity-lora", "identity-base", "matching-lora"]
IDENTITY_RUNS = ["identity-lora", "identity-base"]


def run_jobs(*runs, model_changed=False):
    """The per-run jobs; the identity runs of the default config also take the bundled exam, which a baseline
    retakes only when its model changed (it reads the base model, not the dataset)."""
    jobs = [(rule, f"run={run}") for run in runs for rule in run_stages(run)]
    return jobs + [("exam", f"run={run}, exam=mmcu-sample") for run in runs
                   if run in IDENTITY_RUNS and (model_changed or run not in BASELINE_RUNS)]


def dataset_job(dataset):
    return [("dataset", f"dataset={dataset}, model=tiny-qwen2")]


# (row of the README table, config edit, jobs planned besides `report`)
ROWS = [
    ("one run's training setting (learning_rate)",
     lambda c: c["runs"]["identity-lora"].update(learning_rate=0.02), run_jobs("identity-lora")),
    ("a training setting in run_defaults (the baseline trains nothing: it stays)",
     lambda c: c["run_defaults"].update(warmup_steps=5), run_jobs("identity-lora", "matching-lora")),
    ("one run's generation setting (max_new_tokens)",
     lambda c: c["runs"]["matching-lora"]["generation"].update(max_new_tokens=6),
     [("evaluate", "run=matching-lora"), ("predict", "run=matching-lora")]),
    ("one run's evaluation setting",
     lambda c: c["runs"]["matching-lora"]["evaluation"].update(text_tokenizer="whitespace"),
     [("evaluate", "run=matching-lora")]),
    ("one run's exam setting (shots)",
     lambda c: c["runs"]["identity-lora"]["evaluation"].update(shots=1),
     [("exam", "run=identity-lora, exam=mmcu-sample")]),
    ("one run's predict_from (adapter instead of merged)",
     lambda c: c["runs"]["matching-lora"]["generation"].update(predict_from="adapter"),
     [("evaluate", "run=matching-lora"), ("predict", "run=matching-lora")]),
    ("a dataset's build setting (max_seq_length)",
     lambda c: c["datasets"]["identity"].update(max_seq_length=96), dataset_job("identity") + run_jobs(*IDENTITY_RUNS)),
    ("the model entry (seed of the builtin model)",
     lambda c: c["models"]["tiny-qwen2"].update(seed=1),
     [("download", "model=tiny-qwen2")] + dataset_job("identity") + dataset_job("text-matching")
     + run_jobs(*RUNS, model_changed=True)),
    ("a new run", lambda c: c["runs"].update({"identity-r4": {"model": "tiny-qwen2", "dataset": "identity",
                                                               "lora_rank": 4}}),
     run_jobs("identity-r4")),
    ("nothing", lambda c: None, None),
]


@pytest.mark.parametrize("change, edit, expected", ROWS, ids=[row[0] for row in ROWS])
def test_what_reruns_when_you_change(demo, default_config, tmp_path, change, edit, expected):
    config = copy.deepcopy(default_config)
    edit(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    result = snakemake(demo, "--configfile", str(path), "--dry-run")
    assert result.returncode == 0, result.stderr
    if expected is None:
        assert "Nothing to be done" in result.stdout + result.stderr
    else:
        assert planned_jobs(result) == sorted(expected + [("report", "")])


def test_editing_a_data_file_rebuilds_that_dataset_and_its_runs_only(demo):
    data = demo / "data" / "identity.jsonl"
    before = data.stat()
    original = data.read_bytes()
    try:
        data.write_bytes(original + b"\n")
        result = snakemake(demo, "--configfile", str(demo / "config.yaml"), "--dry-run")
    finally:
        data.write_bytes(original)
        os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert planned_jobs(result) == sorted(dataset_job("identity") + run_jobs(*IDENTITY_RUNS) + [("report", "")])
