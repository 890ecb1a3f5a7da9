"""The Slurm profile for real: the default DAG on a one-node Slurm cluster started on localhost.

Runs once (it is the expensive test): installs slurm-wlm + munge when absent, starts munged/slurmctld/slurmd under a
temporary folder, runs profiles/slurm (partition and per-job sizes lowered to what this machine has), and stops
every daemon by pid.
"""

import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import REPO, scratch_workflow, workflow_env
from local_slurm import CPU_PARTITION, PARTITION, LocalSlurm

pytestmark = [pytest.mark.slow, pytest.mark.workflow,
              pytest.mark.skipif(sys.platform != "linux", reason="the local Slurm cluster is Debian packages")]


def machine_profile(folder, cluster):
    """profiles/slurm with only the partitions and the resources this machine has changed (and without conda
    deployment when conda is absent: it is not on PyPI; tests/test_envs.py audits the env files instead)."""
    import shutil

    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.v8+.yaml").read_text())
    if shutil.which("conda") is None:
        profile.pop("software-deployment-method", None)
    profile["default-resources"]["slurm_partition"] = PARTITION
    for resources in profile["set-resources"].values():
        if resources.get("slurm_partition") == "cpu":
            resources["slurm_partition"] = CPU_PARTITION
    profile["default-resources"].pop("slurm_account", None)
    profile["slurm-no-account"] = True
    profile["slurm-init-seconds-before-status-checks"] = 1
    profile["latency-wait"] = 5
    mem_mb = min(4000, cluster.memory_mb // 2)
    for rule in list(profile["set-resources"]) + ["train", "predict", "exam"]:
        resources = profile["set-resources"].setdefault(rule, {})
        resources.update({"mem_mb": mem_mb, "cpus_per_task": 1})
        if rule in ("predict", "exam"):
            resources["gpu"] = 0  # one counted GPU on the test cluster: train asks for it (gpus: 1)
    profile["default-resources"]["mem_mb"] = mem_mb
    profile["default-resources"]["cpus_per_task"] = 1
    folder.mkdir(parents=True)
    (folder / "config.v8+.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


def test_default_dag_runs_as_slurm_jobs_and_matches_the_local_run(tmp_path, demo, default_config):
    workdir = tmp_path / "work"
    config = scratch_workflow(workdir, default_config)
    with LocalSlurm(tmp_path / "slurm") as cluster:
        profile = machine_profile(tmp_path / "profile", cluster)
        env = workflow_env()
        env.update(SLURM_CONF=cluster.env["SLURM_CONF"], PATH=f"{cluster.bin}:{env['PATH']}")
        result = subprocess.run(
            [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
             "--profile", str(profile), "--configfile", str(config)],
            capture_output=True, text=True, env=env, cwd=workdir, timeout=1800)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]

        # every job of every rule was submitted to Slurm, and Slurm says each completed
        submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", output)
        states, by_rule = {}, {}  # by_rule: what scontrol shows of each job, by rule (the plugin's job comment)
        for _, slurm_id in submitted:
            shown = subprocess.run(["scontrol", "show", "job", slurm_id], env=cluster.env, capture_output=True,
                                   text=True).stdout
            states[slurm_id] = re.search(r"JobState=(\S+)", shown).group(1)
            by_rule.setdefault(re.search(r"Comment=rule_([a-z]+)", shown).group(1), []).append(shown)
        local_jobs = re.findall(r"^localrule (\w+):", output, flags=re.M)
        running = cluster.running()
    assert cluster.running() == [] and running == ["munged", "slurmctld", "slurmd"]
    assert sorted(local_jobs) == ["all", "download"]  # the download ran where Snakemake runs, not as a Slurm job
    ran_rules = set(re.findall(r"^rule (\w+):", output, flags=re.M))
    assert ran_rules == {"dataset", "train", "merge", "predict", "evaluate", "exam", "report"}
    # 2 dataset builds + 2 runs x (train, merge, predict, evaluate) + the baseline's predict and evaluate
    # + 2 exams + 1 report
    assert len(submitted) == 15 and set(states.values()) == {"COMPLETED"}, states  # the baseline: no train, merge
    assert all("TresPerJob=gres:gpu:1" in shown for shown in by_rule["train"]), by_rule["train"][0]
    for log in (workdir / "logs" / "train").glob("*.log"):  # and Slurm gave each train job the counted GPU
        assert re.search(r"^Slurm job \d+ on \S+: GPUs 0$", log.read_text(), flags=re.M), log.read_text()[-2000:]
    assert all(f"Partition={CPU_PARTITION}" in shown for rule in ("dataset", "merge", "evaluate", "report")
               for shown in by_rule[rule])
    assert all(f"Partition={PARTITION}" in shown and "TresPerJob=gres" not in shown for shown in by_rule["predict"])

    # same outputs as the local run of the same config
    for relative in ["results/models/tiny-qwen2/model.safetensors",
                     "results/datasets/identity/tiny-qwen2/train.parquet",
                     "results/runs/matching-lora/metrics.json"]:
        assert (workdir / relative).read_bytes() == (demo / relative).read_bytes(), relative
    for run in default_config["runs"]:
        slurm = pd.read_csv(workdir / f"results/runs/{run}/predictions.csv")
        local = pd.read_csv(demo / f"results/runs/{run}/predictions.csv")
        assert slurm[["id", "prediction"]].equals(local[["id", "prediction"]]), run
