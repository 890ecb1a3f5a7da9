"""The DAG never serves a stale or unbuilt result: data paths are real inputs, runs and sweeps added to a finished
workflow are built by the default target, shared jobs are named where they are, and no config string reaches a
shell unquoted."""

import copy
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import REPO, RUN_STAGES, TINY_MODEL, planned_jobs, run_stages, scratch_workflow, snakemake, workflow_env

pytestmark = pytest.mark.workflow

GEN_SMALL, GEN_FULL = "gen-generation.max_new_tokens1", "gen-generation.max_new_tokens40"


def write_config(folder, config, name="config.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# -- data paths ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit", ["typo in a used dataset's path", "new dataset on a missing path"])
def test_a_missing_data_file_fails_the_run_with_one_line(demo, default_config, tmp_path, edit):
    config = copy.deepcopy(default_config)
    if edit.startswith("typo"):
        config["datasets"]["identity"]["path"] = "data/identty.jsonl"
    else:
        config["datasets"]["extra"] = {"path": "data/extra.jsonl", "format": "messages"}
        config["runs"]["extra-lora"] = {"model": "tiny-qwen2", "dataset": "extra"}
    path = write_config(tmp_path, config)
    result = snakemake(demo, "--configfile", str(path), "--dry-run")
    missing = "identty" if edit.startswith("typo") else "extra.jsonl"
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if missing in text)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [e for e in error_lines(result)] == [
        f"error: {path}:{line}: datasets.{'identity' if missing == 'identty' else 'extra'}.path: file "
        f"`data/{'identty.jsonl' if missing == 'identty' else 'extra.jsonl'}` not found (paths are relative to "
        f"{demo})"]


def test_pointing_a_dataset_at_another_file_rebuilds_it_and_its_runs(demo, default_config, tmp_path):
    copied = demo / "data" / "identity-copy.jsonl"
    shutil.copy(demo / "data" / "identity.jsonl", copied)
    try:
        config = copy.deepcopy(default_config)
        config["datasets"]["identity"]["path"] = "data/identity-copy.jsonl"
        result = snakemake(demo, "--configfile", str(write_config(tmp_path, config)), "--dry-run")
    finally:
        copied.unlink()
    assert result.returncode == 0, result.stderr
    runs = ["identity-lora", "identity-base"]
    assert planned_jobs(result) == sorted(
        [("dataset", "dataset=identity, model=tiny-qwen2"), ("report", "")]
        + [(rule, f"run={run}") for run in runs for rule in run_stages(run)]
        + [("exam", "run=identity-lora, exam=mmcu-sample")])  # the baseline's exam reads the unchanged base


def test_a_dataset_info_entry_is_followed_to_its_file(tmp_path):
    """LLaMA-Factory's dataset_info.json: a new file_name rebuilds, another entry's change does not, a missing file
    is one line naming the config key."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(REPO / "data" / "identity.jsonl", data / "a.jsonl")
    shutil.copy(REPO / "data" / "identity.jsonl", data / "b.jsonl")
    info = data / "dataset_info.json"

    def write_info(file_name, other="a.jsonl"):
        info.write_text(json.dumps({"qa": {"file_name": file_name, "formatting": "sharegpt",
                                           "columns": {"messages": "messages"},
                                           "tags": {"role_tag": "role", "content_tag": "content",
                                                    "user_tag": "user", "assistant_tag": "assistant"}},
                                    "other": {"file_name": other}}))

    write_info("a.jsonl")
    config = {"models": {"tiny": TINY_MODEL},
              "datasets": {"qa": {"dataset_info": "data/dataset_info.json", "name": "qa", "max_seq_length": 64}},
              "runs": {"r": {"model": "tiny", "dataset": "qa"}}}
    path = scratch_workflow(tmp_path, config)
    stats = "results/datasets/qa/tiny/stats.json"
    snakemake(tmp_path, stats, "--configfile", str(path), check=True)

    write_info("a.jsonl", other="b.jsonl")  # another dataset's entry: nothing to redo
    assert "Nothing to be done" in snakemake(tmp_path, stats, "--dry-run", "--configfile", str(path)).stdout
    write_info("b.jsonl")
    assert planned_jobs(snakemake(tmp_path, stats, "--dry-run", "--configfile", str(path))) == [
        ("dataset", "dataset=qa, model=tiny")]
    write_info("c.jsonl")
    result = snakemake(tmp_path, stats, "--dry-run", "--configfile", str(path))
    assert result.returncode == 1 and error_lines(result) == [
        f"error: {path}:{path.read_text().splitlines().index('    dataset_info: data/dataset_info.json') + 1}: "
        f"datasets.qa.dataset_info: file `data/c.jsonl` not found (paths are relative to {tmp_path})"]


# -- a finished demo, grown: a sweep over generation, a short run, odd paths --------------------------------------
ODD_EXAM = "data/mmcu $(touch pwned-exam)"
ODD_DATA = "data/odd $(touch pwned-data).jsonl"


@pytest.fixture(scope="module")
def grown(demo, default_config, tmp_path_factory):
    """A copy of the finished demo with a post-training sweep, a 4-step run and config strings that would run
    commands if they reached a shell unquoted; planned, then built."""
    workdir = tmp_path_factory.mktemp("grown") / "demo"
    shutil.copytree(demo, workdir, symlinks=True)
    shutil.copytree(REPO / "data" / "mmcu_sample", workdir / ODD_EXAM)
    shutil.copy(REPO / "data" / "identity.jsonl", workdir / ODD_DATA)
    config = copy.deepcopy(default_config)
    config["exams"]["odd"] = {"path": ODD_EXAM}
    config["runs"]["identity-lora"]["evaluation"]["exams"].append("odd")
    config["datasets"]["odd-data"] = {**config["datasets"]["identity"], "path": ODD_DATA}
    config["runs"]["gen"] = {"model": "tiny-qwen2", "dataset": "identity", "select_by": "exact_match",
                             "sweep": {"generation.max_new_tokens": [1, 40]}}
    config["runs"]["short"] = {"model": "tiny-qwen2", "dataset": "odd-data", "max_steps": 4, "logging_steps": 10}
    path = write_config(workdir, config, "grown.yaml")
    plan = snakemake(workdir, "--configfile", str(path), "--dry-run")
    old = os.umask(0o022)
    try:
        built = snakemake(workdir, "--configfile", str(path))
    finally:
        os.umask(old)
    assert built.returncode == 0, built.stderr[-3000:]
    return workdir, path, plan


def test_a_sweep_and_a_run_added_after_a_finished_run_are_planned_by_the_default_target(grown):
    _, _, plan = grown
    assert plan.returncode == 0, plan.stderr
    assert planned_jobs(plan) == sorted(
        [("dataset", "dataset=odd-data, model=tiny-qwen2"), ("report", ""), ("exam", "run=identity-lora, exam=odd"),
         ("predict", f"run={GEN_SMALL}"), ("evaluate", f"run={GEN_SMALL}"), ("evaluate", f"run={GEN_FULL}")]
        + [(rule, "run=short") for rule in RUN_STAGES])  # the 40-token point shares identity-lora's predictions


def test_best_json_names_the_model_that_was_built_for_the_winner(grown):
    from transformers import AutoModelForCausalLM

    workdir, path, _ = grown
    best = json.loads((workdir / "results/sweeps/gen/best.json").read_text())
    assert best["run"] == GEN_FULL  # not the first point of the sweep
    assert best["load"] == {"model": "results/runs/identity-lora/merged"}  # shared merge: built once, there
    assert not (workdir / "results/runs" / GEN_FULL / "merged").exists()  # only its metrics.json is its own
    AutoModelForCausalLM.from_pretrained(workdir / best["load"]["model"])
    chat = subprocess.run([sys.executable, str(REPO / "scripts" / "chat.py"), "--run", GEN_FULL, "--configfile",
                           str(path), "--max-new-tokens", "4"], input="hello\n/exit\n", capture_output=True,
                          text=True, env=workflow_env(), cwd=workdir, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert f"chatting with {GEN_FULL}" in chat.stderr and "assistant> " in chat.stdout


def test_the_leaderboard_reports_what_training_recorded_for_the_whole_run(grown):
    workdir, _, _ = grown
    board = pd.read_csv(workdir / "results/leaderboard.csv").set_index("run")
    log = pd.read_csv(workdir / "results/runs/short/train_log.csv")
    assert list(log["step"]) == [1, 4]  # logging_steps 10 > max_steps 4: the first and the last step
    assert board.loc["short", "train_steps"] == 4 and board.loc["short", "final_loss"] == log["loss"].iloc[-1]
    assert board.loc["short", "tokens_per_second"] > 0
    assert board.loc[GEN_FULL, "exact_match"] > board.loc[GEN_SMALL, "exact_match"]


def test_no_config_string_runs_as_a_command_and_paths_with_spaces_work(grown):
    workdir, path, _ = grown
    assert json.loads((workdir / "results/runs/identity-lora/exams/odd.json").read_text())["n"] == 9
    assert (workdir / "results/datasets/odd-data/tiny-qwen2/stats.json").is_file()
    serve = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--profile", str(REPO / "profiles" / "local"), "--cores", "1", "serve", "--configfile", str(path),
         "--config", "serve_host=127.0.0.1 $(touch pwned-host)", "serve_port=1"],
        capture_output=True, text=True, env=workflow_env(), cwd=workdir, timeout=300)
    assert serve.returncode != 0  # the host is not an address: the service cannot start
    assert "$(touch pwned-host)" in serve.stdout + serve.stderr + (workdir / "logs/serve/serve.log").read_text()
    assert not [p for p in workdir.rglob("pwned*")] and not list(REPO.glob("pwned*"))


def test_outputs_are_readable_by_others_under_the_usual_umask(grown):
    workdir, _, _ = grown
    modes = {name: (workdir / name).stat().st_mode & 0o777 for name in (
        "results/leaderboard.csv", "results/runs/short", "results/runs/short/adapter",
        "results/runs/short/train_summary.json", "results/runs/short/merged", "results/datasets/odd-data/tiny-qwen2",
        "results/datasets/odd-data/tiny-qwen2/train.parquet")}
    assert set(modes.values()) <= {0o644, 0o755} and modes["results/runs/short/merged"] == 0o755
