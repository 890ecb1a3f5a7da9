"""One trainer per run folder, and no trainer without its Snakemake.

A train job outlives a ``kill -9`` of the Snakemake that started it: its shell and ``train.py`` are not killed
with it. Run again, Snakemake would start a second trainer in the same folder, and the first one, finishing later,
would write outputs that no live job asked for. So:

- ``lock_run_folder``: the trainer holds an exclusive lock (``flock``) on ``<checkpoints>.lock`` for its whole
  life (torchrun's workers inherit it); a second trainer refuses with one line naming the PID that holds it.
- ``watch_snakemake``: the trainer finds the Snakemake process among its ancestors and, when that process is
  gone, signals itself as Ctrl-C would (SIGTERM): it saves a checkpoint and stops, and a rerun resumes from it.
  ``snakemake_alive`` is asked once more right before the final outputs are written.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from snaketune.errors import UserError

WATCH_SECONDS = 1.0
watched: list[int] = []  # the Snakemake this process watches (watch_snakemake), for still_wanted


def lock_run_folder(checkpoints: Path):
    """Take the run folder's lock or raise a UserError naming the process that has it; returns the open lock file
    (keep it open: the lock lasts as long as it does, in this process and the ones it starts)."""
    import fcntl

    path = Path(f"{checkpoints}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held open for the life of the job, on purpose
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"{checkpoints.parent}: another trainer (PID {holder}) is training this run; wait for it to "
                        f"end or stop it (`kill {holder}`: it saves a checkpoint first), then run again") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    os.set_inheritable(handle.fileno(), True)  # torchrun and its workers, started by exec, hold it too
    return handle


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces


def is_snakemake(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name == "snakemake" for arg in argv[:3])


def snakemake_ancestor(pid: int | None = None) -> int | None:
    """The outermost ancestor of ``pid`` (this process) that is a Snakemake process (the one the user started; a
    job may run under a Snakemake of its own), or None: run by hand, or a Slurm step, whose Snakemake is on another
    host and whose job outlives it by design."""
    found, current = None, parent_of(pid or os.getpid())
    while current and current > 1:
        if is_snakemake(current):
            found = current
        current = parent_of(current)
    return found


def snakemake_alive(pid: int | None) -> bool:
    """Whether the Snakemake ``pid`` still runs (a zombie, killed but not yet reaped, counts as gone)."""
    if pid is None:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def watch_snakemake(pid: int | None, seconds: float = WATCH_SECONDS) -> None:
    """Send this process SIGTERM (checkpoint, then stop) once the Snakemake ``pid`` is gone."""
    if pid is None:
        return
    watched.append(pid)

    def watch():
        while snakemake_alive(pid):
            time.sleep(seconds)
        print(f"Snakemake (PID {pid}) is gone: saving a checkpoint and stopping", flush=True, file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-snakemake", daemon=True).start()


def still_wanted() -> bool:
    """False once the Snakemake this process watches is gone: its outputs would be taken as done by nobody."""
    return all(snakemake_alive(pid) for pid in watched)
