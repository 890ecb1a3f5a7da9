"""A one-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd under a temporary folder.

    with LocalSlurm(tmp_path) as cluster:      # installs slurm-wlm + munge with apt-get when absent (root)
        subprocess.run(["sbatch", ...], env=cluster.env)

No accounting database (so status comes from squeue, and MinJobAge keeps finished jobs visible), no cgroups.
Every daemon is stopped by its pid on exit, whatever happened inside the block.
Also runnable by hand: ``python tests/local_slurm.py /tmp/slurm`` starts one and waits for Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITION = "debug"  # the GPU partition of the test cluster
CPU_PARTITION = "cpu"  # its CPU partition (the same node)
GPUS = 1  # counted generic resources: gres/gpu with no GPU behind it


def ensure_installed() -> None:
    """apt-get install slurm-wlm and munge when their daemons are missing (needs root and a Debian mirror)."""
    if all(shutil.which(name) or Path(f"/usr/sbin/{name}").exists() for name in DAEMONS):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def slurm_conf(root: Path, host: str, cpus: int, memory_mb: int) -> str:
    user = os.environ.get("USER") or "root"
    return f"""\
ClusterName=snaketune-test
SlurmctldHost={host}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
SlurmctldPort=16817
SlurmdPort=16818
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
NodeName={host} CPUs={cpus} RealMemory={memory_mb} Gres=gpu:{GPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName={CPU_PARTITION} Nodes={host} MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class LocalSlurm:
    """Context manager: a running one-node cluster; ``env`` points Slurm's clients at it."""

    def __init__(self, root: Path, cpus: int | None = None, memory_mb: int | None = None):
        self.root = Path(root).resolve()
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        self.memory_mb = memory_mb or int(total_mb * 0.8)
        self.pids: dict[str, int] = {}
        self.bin = self.root / "bin"
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"),
                        PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}")

    # -- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> LocalSlurm:
        ensure_installed()
        for sub in ("log", "state", "spool", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "slurm.conf").write_text(slurm_conf(self.root, self.host, self.cpus, self.memory_mb))
        # a counted GPU with no hardware behind it: Slurm schedules and records it. Debian's slurmd drops a gpu entry
        # without File=, so /dev/null stands in for the device (nothing binds it: no cgroup device constraint).
        (self.root / "gres.conf").write_text(f"AutoDetect=off\nNodeName={self.host} Name=gpu Count={GPUS} "
                                             "File=/dev/null\n")
        self._write_srun_wrapper()
        try:
            self._start_munge()
            self._start("slurmctld", ["/usr/sbin/slurmctld", "-f", str(self.root / "slurm.conf")],
                        self.root / "slurmctld.pid")
            self._start("slurmd", ["/usr/sbin/slurmd", "-f", str(self.root / "slurm.conf")],
                        self.root / "slurmd.pid")
            self._wait_for_idle_node()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write_srun_wrapper(self) -> None:
        # The jobstep executor strips every SLURM_* variable, SLURM_CONF included, before its nested srun; a real
        # cluster has its config at /etc/slurm/slurm.conf, this one lives in a temporary folder, so srun on
        # PATH puts it back instead of writing to /etc.
        self.bin.mkdir(parents=True, exist_ok=True)
        wrapper = self.bin / "srun"
        real = shutil.which("srun") or "/usr/bin/srun"
        wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={self.root / "slurm.conf"} exec {real} "$@"\n')
        wrapper.chmod(0o755)

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        key, socket_path = munge / "munge.key", munge / "munge.socket"
        if not key.exists():
            subprocess.run(["/usr/sbin/mungekey", "--create", f"--keyfile={key}"], check=True)
        key.chmod(0o600)
        munge.chmod(0o700)
        self._start("munged", ["/usr/sbin/munged", f"--key-file={key}", f"--socket={socket_path}",
                               f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                               f"--seed-file={munge / 'munged.seed'}", "--force"], munge / "munged.pid")

    def _start(self, name: str, command: list[str], pid_file: Path) -> None:
        subprocess.run(command, check=True, env=self.env, capture_output=True)
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} wrote no pid file; see {self.root}/log")
            time.sleep(0.1)
        self.pids[name] = int(pid_file.read_text().strip())

    def _wait_for_idle_node(self) -> None:
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
            state = result.stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"node never became idle (last state {state!r}); see {self.root}/log")

    def stop(self) -> None:
        """Stop every daemon this object started, by pid, and wait until each is gone."""
        for name in reversed(list(self.pids)):
            pid = self.pids.pop(name)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def running(self) -> list[str]:
        return [name for name, pid in self.pids.items() if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child is gone for our purposes
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the daemons too
    with LocalSlurm(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/snaketune-slurm")) as cluster:
        print(f"export SLURM_CONF={cluster.root / 'slurm.conf'}   # then sinfo, sbatch ...; Ctrl-C stops it")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
