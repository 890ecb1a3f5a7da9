"""workflow.py: what the Snakefile asks of the config besides paths, and what refuses a start before any job."""

import pytest

from conftest import REPO
from snaketune.config import load_files
from snaketune.workflow import preflight

TWO_NODES = REPO / "config" / "examples" / "qwen2.5-72b-lora-2nodes.yaml"


@pytest.fixture(autouse=True)
def in_the_checkout(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths are relative to the working directory, as in the workflow


def test_a_run_over_several_nodes_is_refused_without_slurm_and_planned_with_it():
    cfg = load_files([TWO_NODES])
    run = next(name for name, run in cfg.runs.items() if run.train.nodes > 1)
    refused = preflight(cfg, "local", {"all"})
    assert refused == [f"runs.{run}.nodes: 2 nodes need a Slurm cluster (--profile profiles/slurm); on one machine "
                       "set nodes: 1 and gpus: <its GPUs>"]
    assert preflight(cfg, "slurm", {"all"}) == []


def test_a_stage_that_cannot_fit_the_declared_machine_is_refused_unless_only_the_plan_is_asked_for():
    assert preflight(load_files([]), "local", {"all"}) == []
    small_gpu = load_files([], {"gpu_memory_gib": 0.5})
    refused = preflight(small_gpu, "local", {"all"})
    assert refused and all("GiB of GPU memory, the profile declares gpu_memory_gib: 0.5" in line for line in refused)
    assert any(line.startswith("runs.identity-lora: train needs ~") for line in refused)
    assert preflight(small_gpu, "local", {"plan"}) == []  # `snakemake plan` prints the misfits instead
    small_disk = load_files([], {"disk_gib": 0.0001})
    assert [line for line in preflight(small_disk, "slurm", {"all"}) if "declares disk_gib: 0.0001" in line]
