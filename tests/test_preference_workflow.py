"""config/examples/tiny-dpo-orpo.yaml end to end on the CPU: SFT, DPO from the SFT run's merged model, ORPO from
the base; both preference runs learn what the SFT model does not know, their merged models predict and score
through the same stages, and a change reruns only what depends on it."""

import copy
import csv
import json

import pytest
import yaml

from conftest import REPO, RUN_STAGES, planned_jobs, scratch_workflow, snakemake

pytestmark = pytest.mark.workflow
EXAMPLE = yaml.safe_load((REPO / "config" / "examples" / "tiny-dpo-orpo.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("preference")
    config = scratch_workflow(workdir, EXAMPLE)
    snakemake(workdir, "--configfile", str(config), check=True)
    return workdir


def metrics(workdir, run):
    return json.loads((workdir / "results" / "runs" / run / "metrics.json").read_text(encoding="utf-8"))


def test_dpo_from_the_sft_model_and_orpo_from_the_base_learn_the_preference(finished):
    dpo, orpo = metrics(finished, "greet-dpo"), metrics(finished, "greet-orpo")
    # the SFT model answered at random: it prefers neither answer; nor does the random base
    assert 0.35 <= dpo["preference_accuracy_at_start"] <= 0.65 and 0.35 <= orpo["preference_accuracy_at_start"] <= 0.65
    assert dpo["preference_accuracy"] >= 0.9 and orpo["preference_accuracy"] >= 0.9
    assert dpo["preference_pairs"] == orpo["preference_pairs"] == 80
    assert dpo["reward_accuracy"] >= 0.9 and dpo["reward_margin"] > 0
    summary = json.loads((finished / "results/runs/greet-dpo/train_summary.json").read_text(encoding="utf-8"))
    sft = json.loads((finished / "results/runs/greet-sft/train_summary.json").read_text(encoding="utf-8"))
    assert summary["settings"]["stage"] == "dpo" and "preference" not in sft  # the SFT data has no pairs


def test_preference_runs_predict_score_and_list_in_the_leaderboard(finished):
    with open(finished / "results" / "leaderboard.csv", newline="") as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    assert rows["greet-dpo"]["stage"] == "dpo" and rows["greet-dpo"]["from_run"] == "greet-sft"
    assert float(rows["greet-dpo"]["preference_accuracy"]) >= 0.9 and rows["greet-sft"]["preference_accuracy"] == ""
    for run in ("greet-dpo", "greet-orpo"):
        assert (finished / "results" / "runs" / run / "merged" / "model.safetensors").exists()
        with open(finished / "results" / "runs" / run / "predictions.csv", newline="") as handle:
            predictions = list(csv.DictReader(handle))
        assert len(predictions) == 40 and metrics(finished, run)["n"] == 40
        # learned the wording of the chosen answers: most predictions open as the reference does
        assert sum(p["prediction"].split(",")[0] == p["reference"].split(",")[0] for p in predictions) >= 30
    assert "greet-dpo" in (finished / "results" / "report.html").read_text(encoding="utf-8")


def dry_run(workdir, tmp_path, edit):
    config = copy.deepcopy(EXAMPLE)
    edit(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    result = snakemake(workdir, "--configfile", str(path), "--dry-run")
    assert result.returncode == 0, result.stderr
    return result


def run_jobs(*runs):
    return [(rule, f"run={run}") for run in runs for rule in RUN_STAGES]


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["runs"]["greet-sft"].update(learning_rate=0.02), run_jobs("greet-sft", "greet-dpo")),
    (lambda c: c["runs"]["greet-dpo"].update(pref_beta=0.3), run_jobs("greet-dpo")),
    (lambda c: c["runs"]["greet-orpo"].update(pref_beta=0.3), run_jobs("greet-orpo")),
    (lambda c: None, None),
], ids=["the SFT run: it and the DPO run after it", "the DPO run: only it", "the ORPO run: only it", "nothing"])
def test_a_change_reruns_the_chain_after_it_and_nothing_else(finished, tmp_path, edit, expected):
    result = dry_run(finished, tmp_path, edit)
    if expected is None:
        assert "Nothing to be done" in result.stdout + result.stderr
    else:
        assert planned_jobs(result) == sorted(expected + [("report", "")])
