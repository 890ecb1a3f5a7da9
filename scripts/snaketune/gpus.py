"""Give each GPU job its own GPUs on a box without a scheduler.

Snakemake's local executor counts GPUs (``--resources gpu=2``) but does not say which ones a job may use, so two
one-GPU jobs on a two-GPU box would both land on GPU 0. ``claim`` picks free GPU indices by taking an exclusive
``flock`` on one lock file per GPU and sets ``CUDA_VISIBLE_DEVICES`` before CUDA starts. The kernel drops the locks
when the process exits, however it exits, so a killed job never leaves a GPU marked busy.

Under Slurm (or anything else that already set ``CUDA_VISIBLE_DEVICES``) nothing is claimed: the scheduler chose.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from snaketune.errors import UserError

LOCK_DIR_ENV = "SNAKETUNE_GPU_LOCK_DIR"
_held: list = []  # open lock files; kept for the life of the process


def lock_dir() -> Path:
    folder = Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"snaketune-gpu-locks-{os.getuid()}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def visible_gpu_indices() -> list[str]:
    """Indices of the GPUs on this machine, from nvidia-smi (without starting CUDA in this process)."""
    if shutil.which("nvidia-smi") is None:
        return []
    result = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def claim(count: int, wait_s: float = 3600.0, poll_s: float = 2.0) -> list[str] | None:
    """Lock ``count`` free GPUs for this process and make them the only visible ones.

    Returns the claimed indices, or None when nothing was claimed (no GPUs, a scheduler already chose, or
    ``count`` is 0). Waits up to ``wait_s`` for GPUs held by other jobs (another user's run, say).
    """
    if count <= 0 or "CUDA_VISIBLE_DEVICES" in os.environ:
        return None
    indices = visible_gpu_indices()
    if not indices:
        return None
    count = min(count, len(indices))
    deadline = time.monotonic() + wait_s
    while True:
        taken = []
        for index in indices:
            handle = open(lock_dir() / f"gpu{index}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            taken.append((index, handle))
            if len(taken) == count:
                break
        if len(taken) == count:
            _held.extend(handle for _, handle in taken)
            claimed = [index for index, _ in taken]
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(claimed)
            return claimed
        for _, handle in taken:
            handle.close()
        if time.monotonic() > deadline:
            raise UserError(f"no {count} free GPU(s) among {indices} after {wait_s:.0f} s (locks in {lock_dir()})")
        time.sleep(poll_s)
