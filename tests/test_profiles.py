"""The autodl and Slurm profiles plan every example config; the local profile's kill-and-resume behaviour."""

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, planned_jobs, scratch_workflow, workflow_env
from snaketune.layout import train_arguments

EXAMPLES = sorted((REPO / "config" / "examples").glob("*.yaml"))


def profile_for_this_machine(name, folder):
    """The repo's profile; without conda on this machine (it is not on PyPI), the same profile minus conda
    deployment, whose env files tests/test_envs.py checks instead."""
    profile = yaml.safe_load((REPO / "profiles" / name / "config.v8+.yaml").read_text())
    if shutil.which("conda") is None:
        profile.pop("software-deployment-method", None)
        profile.pop("conda-prefix", None)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.v8+.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


@pytest.mark.parametrize("profile", ["autodl", "slurm"])
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_profile_plans_every_example_config(tmp_path, profile, example):
    config = yaml.safe_load(example.read_text())
    workdir = tmp_path / "work"
    scratch_workflow(workdir, config)
    shutil.copy(example, workdir / "config.yaml")  # the example itself, comments and all
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--profile", str(profile_for_this_machine(profile, tmp_path / "profile")), "--configfile",
         str(workdir / "config.yaml"), "--dry-run"],
        capture_output=True, text=True, env=workflow_env(), cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = planned_jobs(result)
    rules = {rule for rule, _ in jobs}
    assert {"download", "dataset", "train", "predict", "evaluate", "report"} <= rules
    baselines = [run for run in config["runs"].values() if run.get("max_steps") == 0 or run.get("method") == "none"]
    assert sum(rule == "train" for rule, _ in jobs) == len(config["runs"]) - len(baselines)  # a baseline trains not
    merged = any(run.get("generation", {}).get("predict_from", "merged") == "merged" for run in config["runs"].values())
    assert ("merge" in rules) == merged


def test_profiles_say_what_the_issue_asks():
    autodl = yaml.safe_load((REPO / "profiles" / "autodl" / "config.v8+.yaml").read_text())
    assert "executor" not in autodl and autodl["software-deployment-method"] == "conda"
    assert autodl["keep-going"] and autodl["rerun-incomplete"] and "gpu=1" in autodl["resources"]
    assert any(item.startswith("model_cache_dir=") for item in autodl["config"])
    slurm = yaml.safe_load((REPO / "profiles" / "slurm" / "config.v8+.yaml").read_text())
    assert slurm["executor"] == "slurm" and slurm["slurm-status-command"] == "squeue" and slurm["retries"] >= 1
    for key in ("slurm_partition", "runtime", "mem_mb", "cpus_per_task"):
        assert key in slurm["default-resources"]
    assert slurm["default-resources"]["nodes"] == 1 and "nodes" not in slurm["set-resources"]["train"]


def test_a_two_node_run_asks_slurm_for_two_nodes_with_gpus_on_each_and_nothing_else_does(tmp_path):
    example = REPO / "config" / "examples" / "qwen2.5-72b-lora-2nodes.yaml"
    workdir = tmp_path / "work"
    scratch_workflow(workdir, yaml.safe_load(example.read_text()))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--profile", str(profile_for_this_machine("slurm", tmp_path / "profile")), "--configfile", str(example),
         "--dry-run"], capture_output=True, text=True, env=workflow_env(), cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resources = {}
    for block in result.stdout.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0].strip()
        line = next((x for x in block.splitlines() if x.strip().startswith("resources:")), "")
        resources[rule] = dict(item.split("=", 1) for item in line.split(":", 1)[1].split(", ") if "=" in item)
    assert (resources["train"]["nodes"], resources["train"]["gres"], resources["train"]["gpu"]) == ("2", "gpu:8", "0")
    others = {rule: found.get("nodes") for rule, found in resources.items() if rule not in ("train", "all")}
    assert others and set(others.values()) == {"1"}, others


def test_a_train_job_killed_under_the_local_profile_is_rerun_and_resumes(tmp_path, default_config):
    config = {key: default_config[key] for key in ("models", "datasets")}
    config["runs"] = {"long": {"model": "tiny-qwen2", "dataset": "identity", "learning_rate": 0.01,
                               "max_steps": 400, "save_steps": 20, "logging_steps": 10,
                               "per_device_train_batch_size": 4}}
    workdir = tmp_path / "work"
    path = scratch_workflow(workdir, config)
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(workdir), "--profile", str(REPO / "profiles" / "local"), "--cores", "2", "--configfile", str(path)]
    # the whole process group goes, Snakemake included, as when a box is rebooted or a nohup shell is killed
    first = subprocess.Popen(command, env=workflow_env(), cwd=workdir, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = workdir / "results" / "runs" / "long" / "checkpoints"
    deadline = time.monotonic() + 600
    while not any(checkpoints.glob("checkpoint-*/trainer_state.json")):
        assert first.poll() is None and time.monotonic() < deadline, "no checkpoint before the job ended"
        time.sleep(0.5)
    time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    saved = sorted(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/trainer_state.json"))
    assert saved and saved[-1] < 400

    # Snakemake's own record of outputs whose job started and never finished (outputs are written atomically
    # at the end, so none of them exists yet: nothing half-written can be mistaken for a result)
    markers = {base64.b64decode(p.name).decode() for p in (workdir / ".snakemake" / "incomplete").iterdir()}
    assert markers == {"results/runs/long/adapter", "results/runs/long/train_log.csv", "results/runs/long/loss.png",
                       "results/runs/long/train_summary.json"}
    assert not (workdir / "results/runs/long/adapter").exists()

    # a kill -9 leaves Snakemake's lock behind, as a power loss would: the README's recovery is --unlock, then rerun
    locked = subprocess.run(command, capture_output=True, text=True, env=workflow_env(), cwd=workdir)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    subprocess.run(command + ["--unlock"], check=True, capture_output=True, env=workflow_env(), cwd=workdir)
    second = subprocess.run(command, capture_output=True, text=True, env=workflow_env(), cwd=workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    log = (workdir / "logs" / "train" / "long.log").read_text()
    assert f"resume from results/runs/long/checkpoints/checkpoint-{saved[-1]}" in log
    steps = [int(line.split(",")[0]) for line in
             (workdir / "results/runs/long/train_log.csv").read_text().splitlines()[1:] if line[0].isdigit()]
    assert steps == sorted(set(steps)) and steps[-1] == 400


def trainer_pids(workdir, run):
    """PIDs of train.py processes training ``run`` in ``workdir`` (jobs name their files relative to it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                cwd = os.readlink(proc / "cwd")
            except OSError:
                continue
            if any(arg.endswith(b"train.py") for arg in argv) and f"results/runs/{run}/".encode() in b" ".join(
                    argv) and Path(cwd) == Path(workdir):
                found.append(int(proc.name))
    return found


def test_a_trainer_whose_snakemake_is_killed_checkpoints_stops_and_is_resumed(tmp_path, default_config):
    """kill -9 of Snakemake alone (not its jobs): the orphaned trainer notices, saves a checkpoint and stops, so
    no output appears that no live job asked for; the rerun resumes from that checkpoint. A second trainer on the
    same run folder is refused while the first holds it."""
    config = {key: default_config[key] for key in ("models", "datasets")}
    config["runs"] = {"long": {"model": "tiny-qwen2", "dataset": "identity", "learning_rate": 0.01,
                               "max_steps": 600, "save_steps": 20, "save_total_limit": 1, "logging_steps": 10,
                               "per_device_train_batch_size": 4}}
    workdir = tmp_path / "work"
    path = scratch_workflow(workdir, config)
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(workdir), "--profile", str(REPO / "profiles" / "local"), "--cores", "2", "--configfile", str(path)]
    first = subprocess.Popen(command, env=workflow_env(), cwd=workdir, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = workdir / "results" / "runs" / "long"
    checkpoints = run_dir / "checkpoints"
    deadline = time.monotonic() + 600
    while not any(checkpoints.glob("checkpoint-*/trainer_state.json")):
        assert first.poll() is None and time.monotonic() < deadline, "no checkpoint before the job ended"
        time.sleep(0.5)
    trainers = trainer_pids(workdir, "long")
    assert trainers

    # while it trains, a second trainer on the same folder is refused, naming the one that holds it
    second = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--model-manifest",
                             str(workdir / "results/models/tiny-qwen2/manifest.json"),
                             *train_arguments(workdir / "results/datasets/identity/tiny-qwen2", run_dir),
                             "--settings", json.dumps({"max_steps": 600})], capture_output=True, text=True,
                            env=workflow_env(), cwd=workdir)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"another trainer (PID {min(trainers)}) is training this run" in second.stderr, second.stderr[-2000:]

    os.kill(first.pid, signal.SIGKILL)  # Snakemake alone: its job's shell and train.py live on
    first.wait()
    stopped = time.monotonic()
    while trainer_pids(workdir, "long"):
        assert time.monotonic() - stopped < 60, "the orphaned trainer kept training"
        time.sleep(0.2)
    log = (workdir / "logs" / "train" / "long.log").read_text()
    assert "Snakemake (PID" in log and "is gone: saving a checkpoint and stopping" in log
    assert "error: stopped by a signal at step" in log and not (run_dir / "adapter").exists()
    saved = sorted(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/trainer_state.json"))
    assert saved and saved[-1] < 600

    subprocess.run(command + ["--unlock"], check=True, capture_output=True, env=workflow_env(), cwd=workdir)
    rerun = subprocess.run(command, capture_output=True, text=True, env=workflow_env(), cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (workdir / "logs" / "train" / "long.log").read_text()
    assert f"resume from results/runs/long/checkpoints/checkpoint-{saved[-1]}" in log
    assert "Nothing to be done" in subprocess.run(command + ["--dry-run"], capture_output=True, text=True,
                                                  env=workflow_env(), cwd=workdir).stdout
