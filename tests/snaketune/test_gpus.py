"""GPU claiming on a box without a scheduler: two jobs never share a GPU, a dead job frees its GPU."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO


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
