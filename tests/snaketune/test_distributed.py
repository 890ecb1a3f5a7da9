"""train/distributed.py: how the train stage starts its processes (one process, one machine, a Slurm node),
and GPU claiming on a box without a scheduler (two jobs never share a GPU, a dead job frees its GPU)."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
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


@pytest.fixture
def four_gpu_box(tmp_path, monkeypatch):
    """A PATH whose nvidia-smi lists four GPUs, and a private lock folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n3\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SNAKETUNE_GPU_LOCK_DIR=str(tmp_path / "locks"),
               PYTHONPATH=str(REPO / "scripts"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


HOLDER = textwrap.dedent("""
    import os, sys, time
    from snaketune.train.distributed import claim
    claimed = claim(int(sys.argv[1]), wait_s=float(sys.argv[2]), poll_s=0.1)
    print(os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
    time.sleep(float(sys.argv[3]))
""")


def start(env, count, wait_s=0.0, hold_s=30.0):
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(count), str(wait_s), str(hold_s)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_jobs_get_disjoint_gpus_and_a_killed_job_frees_its_gpus(four_gpu_box):
    first, second = start(four_gpu_box, 2, wait_s=30), start(four_gpu_box, 2, wait_s=30)
    first_gpus = set(first.stdout.readline().strip().split(","))
    second_gpus = set(second.stdout.readline().strip().split(","))
    assert len(first_gpus) == len(second_gpus) == 2 and first_gpus | second_gpus == {"0", "1", "2", "3"}
    # the box is full: a third job waits, and takes the GPUs of the job that gets killed
    third = start(four_gpu_box, 1, wait_s=30, hold_s=0)
    first.kill()
    first.wait()
    freed = third.stdout.readline().strip()
    assert freed in first_gpus
    second.kill()
    second.wait()
    assert third.wait(timeout=30) == 0


def test_a_scheduler_choice_is_kept(four_gpu_box):
    env = dict(four_gpu_box, CUDA_VISIBLE_DEVICES="3")
    job = start(env, 1, hold_s=0)
    assert job.stdout.readline().strip() == "3"
    assert job.wait() == 0


def test_no_gpus_means_no_claim(four_gpu_box, tmp_path):
    env = dict(four_gpu_box, PATH="/usr/bin:/bin")
    job = start(env, 1, hold_s=0)
    assert job.stdout.readline().strip() == "None"
    assert job.wait() == 0


def test_waiting_too_long_is_one_clear_error(four_gpu_box):
    holder = start(four_gpu_box, 4)
    assert holder.stdout.readline().strip() == "0,1,2,3"
    waiter = start(four_gpu_box, 1, wait_s=0.3, hold_s=0)
    _, err = waiter.communicate(timeout=30)
    holder.kill()
    holder.wait()
    assert waiter.returncode != 0 and "no 1 free GPU(s) among ['0', '1', '2', '3']" in err
