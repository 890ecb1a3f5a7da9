"""How the train stage's processes start, find each other and end, and which GPUs a job may use.

Launch: a run trains in this process, under torchrun on this machine (``gpus`` > 1, or DeepSpeed), or as one
torchrun per node of a Slurm allocation. A run with ``nodes: N`` (N > 1) is one Slurm job of N nodes. Its script
first runs on one node of the allocation; there it starts ``srun`` with one task per node. Each task is that node's
launcher: a torchrun joining a static rendezvous at the first host of ``SLURM_JOB_NODELIST``, with its node rank
from ``SLURM_NODEID``. torchrun then starts ``gpus`` workers on its node, and torch.distributed / DeepSpeed take it
from there (``start_process_group``; ``finish_process_group`` ends it).

GPUs on a box without a scheduler (``claim``, also used by predict, exam, replay and serve): Snakemake's local
executor counts GPUs (``--resources gpu=2``) but does not say which ones a job may use, so two one-GPU jobs on a
two-GPU box would both land on GPU 0. ``claim`` picks free GPU indices by taking an exclusive ``flock`` on one lock
file per GPU and sets ``CUDA_VISIBLE_DEVICES`` before CUDA starts. The kernel drops the locks when the process
exits, however it exits, so a killed job never leaves a GPU marked busy. Under Slurm (or anything else that already
set ``CUDA_VISIBLE_DEVICES``) nothing is claimed: the scheduler chose.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from snaketune.errors import UserError
from snaketune.settings import TrainSettings

# -- launch: this process, torchrun, or srun + one torchrun per node -----------------------------------------
NODE_LAUNCHER = "SNAKETUNE_NODE_LAUNCHER"  # set for the srun tasks: this process launches one node's workers
# Rendezvous ports are taken from 20000-31999 by job id: below Linux's ephemeral range (32768-60999), where an
# outgoing connection could already hold the port.
PORT_BASE, PORT_SPAN = 20000, 12000


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: ``gpu[03-05,9],login1`` -> ``gpu03``."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise UserError(f"SLURM_JOB_NODELIST `{nodelist}` is not a host list")
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def rendezvous_port(environ: Mapping[str, str]) -> int:
    """The port every node's launcher meets on: ``MASTER_PORT`` when set, else one derived from the job id, so all
    nodes agree without talking first and two jobs sharing a first node do not collide."""
    if environ.get("MASTER_PORT"):
        return int(environ["MASTER_PORT"])
    return PORT_BASE + int(environ["SLURM_JOB_ID"]) % PORT_SPAN


def allocated_nodes(environ: Mapping[str, str]) -> int:
    return int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)


def launch_command(nodes: int, gpus: int, deepspeed: bool, script: str, argv: list[str],
                   environ: Mapping[str, str] = os.environ) -> list[str] | None:
    """The command this process should become, or None to train in this process.

    Raises:
        UserError: ``nodes`` above 1 outside a Slurm allocation of that many nodes.
    """
    if "LOCAL_RANK" in environ:  # a worker torchrun started
        return None
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}"]
    if nodes > 1:
        if "SLURM_JOB_ID" not in environ:
            raise UserError(f"nodes: {nodes} spans several machines, which needs a Slurm job (--profile "
                            "profiles/slurm); on one machine use nodes: 1 and gpus: <GPUs of the machine>")
        if allocated_nodes(environ) < nodes:
            raise UserError(f"nodes: {nodes}, but this Slurm job has {allocated_nodes(environ)} node(s); the train "
                            "rule asks for `nodes` from the run's setting: check the profile's set-resources")
        if environ.get(NODE_LAUNCHER) != "1":  # on the first node: one launcher task per node
            return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--overlap",
                    "--kill-on-bad-exit=1", f"--export=ALL,{NODE_LAUNCHER}=1", sys.executable, script, *argv]
        return [*torchrun, f"--nnodes={nodes}", f"--node_rank={environ['SLURM_NODEID']}",
                f"--master_addr={first_host(environ['SLURM_JOB_NODELIST'])}",
                f"--master_port={rendezvous_port(environ)}", script, *argv]
    if gpus > 1 or deepspeed:  # DeepSpeed wants a launcher's environment even for one process
        return [*torchrun, "--standalone", script, *argv]
    return None


def start_processes(settings: TrainSettings, script: str, argv: list[str], checkpoints: Path) -> None:
    """In the job's first process: lock the run folder, claim the GPUs and, when the run needs a launcher (torchrun,
    or srun on several nodes), become it (``exec``: this call then never returns). Returns in the process that
    trains: a worker torchrun started, or the only process of a one-process run."""
    from snaketune.train.guard import lock_run_folder

    if "LOCAL_RANK" not in os.environ and os.environ.get(NODE_LAUNCHER) != "1":  # the job's first process
        lock = lock_run_folder(checkpoints)  # held (and inherited by torchrun) until the job ends
        _held.append(lock)  # kept open for the life of the process: closing the file would release the lock
        print(f"holding {lock.name}", file=sys.stderr)
    command = launch_command(settings.nodes, settings.gpus, bool(settings.deepspeed), script, argv)
    if "SLURM_JOB_ID" in os.environ and "LOCAL_RANK" not in os.environ:  # which GPUs Slurm gave this job
        gpus = os.environ.get("SLURM_STEP_GPUS") or os.environ.get("SLURM_JOB_GPUS") or "none"
        print(f"Slurm job {os.environ['SLURM_JOB_ID']} on {os.environ.get('SLURMD_NODENAME', '?')}: GPUs {gpus}",
              file=sys.stderr)
    if "LOCAL_RANK" not in os.environ and "SLURM_JOB_ID" not in os.environ:  # Slurm assigns a job's GPUs
        claim(settings.gpus)  # torchrun's workers inherit the launcher's GPUs
    if command:
        prepare_environment(settings)
        print(f"launching: {' '.join(command[:8])} ...", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp(command[0], command)


# -- environment and process group ------------------------------------------------------------------------------
def fix_cuda_arch_list(environ: dict[str, str] = os.environ) -> str | None:
    """Strip arch suffixes (``9.0a`` -> ``9.0``) from TORCH_CUDA_ARCH_LIST, which DeepSpeed cannot parse.

    Containers for Hopper set ``9.0a``; DeepSpeed's op builder then fails at import with ValueError('0a').
    Returns the new value when it changed something.
    """
    value = environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return None
    fixed = ";".join(dict.fromkeys(re.sub(r"(\d+\.\d+)[a-z]+", r"\1", a) for a in re.split(r"[;\s]+", value) if a))
    if fixed == value:
        return None
    environ["TORCH_CUDA_ARCH_LIST"] = fixed
    return fixed


def prepare_environment(settings: TrainSettings) -> None:
    """Environment fixes that must happen before torch/deepspeed are imported, in every process."""
    # transformers and accelerate import DeepSpeed whenever it is installed, so this matters for LoRA runs too
    if fix_cuda_arch_list():
        print(f"TORCH_CUDA_ARCH_LIST set to {os.environ['TORCH_CUDA_ARCH_LIST']} for DeepSpeed", file=sys.stderr)
    if settings.deepspeed:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU: its cpu accelerator, gloo backend


def die_with_launcher() -> None:
    """Make this worker die when torchrun dies.

    torchrun starts each worker in a session of its own, so killing the launcher (Snakemake cancelling the job,
    an OOM kill) would leave the workers training on as orphans that later write into a rerun's folder.
    """
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before we asked
        os._exit(1)


def start_process_group(settings: TrainSettings) -> None:
    """Join the processes torchrun started, before the model loads.

    ZeRO-3 shards the model while it loads, so DeepSpeed's group must exist before from_pretrained, and the
    checkpoint clean-up needs a barrier. The Trainer's arguments do this on a GPU but not on the CPU.
    """
    import torch

    if "LOCAL_RANK" not in os.environ:  # one process, no launcher
        return
    if settings.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # also adopts a torch group that already exists
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def is_first_process() -> bool:
    """Rank 0 (or the only process): the one that cleans up, writes caches and saves."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process of the group, when there is one."""
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def report_rank() -> None:
    """Where this process is (global rank, node, local rank, host), when a launcher started it."""
    if "RANK" not in os.environ:
        return
    import socket

    print(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: node {os.environ.get('GROUP_RANK', 0)}, "
          f"local rank {os.environ['LOCAL_RANK']}, host {socket.gethostname()}", file=sys.stderr, flush=True)


def finish_process_group() -> None:
    """Leave the process group cleanly: every rank waits for rank 0's writes, then the group is destroyed.

    Exiting with the group alive lets the interpreter tear down gloo/NCCL threads that are still joinable, which
    aborts the process (``terminate called without an active exception``, SIGABRT) after a finished run.
    """
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# -- GPUs on a box without a scheduler --------------------------------------------------------------------------
LOCK_DIR_ENV = "SNAKETUNE_GPU_LOCK_DIR"
_held: list = []  # open lock files (GPUs, the run folder); kept for the life of the process


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
