"""How the train stage starts its processes: which command for one process, one machine, or a Slurm node."""

import sys

import pytest

from snaketune.errors import UserError
from snaketune.train.distributed import NODE_LAUNCHER, first_host, launch_command, rendezvous_port

SLURM = {"SLURM_JOB_ID": "1234567", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2"}


@pytest.mark.parametrize("nodelist, host", [("gpu[07-08]", "gpu07"), ("a100-3,a100-9", "a100-3"),
                                            ("node[2,5-6],login1", "node2"), ("localhost", "localhost")])
def test_the_first_host_of_a_slurm_host_list(nodelist, host):
    assert first_host(nodelist) == host


def test_one_process_trains_in_place_and_several_go_through_torchrun():
    assert launch_command(1, 1, False, "train.py", ["--x"], {}) is None
    assert launch_command(2, 1, False, "train.py", ["--x"], {"LOCAL_RANK": "0"}) is None  # already a worker
    assert launch_command(1, 4, False, "train.py", ["--x"], {}) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone", "train.py", "--x"]


def test_a_two_node_job_fans_out_with_srun_then_each_node_joins_the_first_host():
    outer = launch_command(2, 8, True, "train.py", ["--x"], SLURM)
    assert outer[:7] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--overlap", "--kill-on-bad-exit=1",
                         f"--export=ALL,{NODE_LAUNCHER}=1"]
    assert outer[7:] == [sys.executable, "train.py", "--x"]
    node = launch_command(2, 8, True, "train.py", ["--x"], {**SLURM, NODE_LAUNCHER: "1", "SLURM_NODEID": "1"})
    assert node == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=2",
                    "--node_rank=1", "--master_addr=gpu07", f"--master_port={rendezvous_port(SLURM)}", "train.py",
                    "--x"]
    assert 20000 <= rendezvous_port(SLURM) < 32000 and rendezvous_port({**SLURM, "MASTER_PORT": "29400"}) == 29400


def test_more_nodes_than_the_job_has_is_refused():
    with pytest.raises(UserError, match="nodes: 4, but this Slurm job has 2 node"):
        launch_command(4, 8, True, "train.py", [], SLURM)


def test_the_run_folder_stays_locked_while_the_process_that_started_training_lives(tmp_path, monkeypatch):
    """start_processes returns into training: the run folder's lock must outlive the call (a closed lock file
    would let a second trainer in)."""
    import gc

    from snaketune.settings import TrainSettings
    from snaketune.train import distributed
    from snaketune.train.guard import lock_run_folder

    for name in ("LOCAL_RANK", "SLURM_JOB_ID", NODE_LAUNCHER):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # nothing to claim
    held = len(distributed._held)
    distributed.start_processes(TrainSettings(), "train.py", [], tmp_path / "checkpoints")
    gc.collect()
    try:
        with pytest.raises(UserError, match="another trainer"):
            lock_run_folder(tmp_path / "checkpoints")
    finally:
        for handle in distributed._held[held:]:
            handle.close()
        del distributed._held[held:]
