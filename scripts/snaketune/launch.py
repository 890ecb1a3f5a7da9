"""How the train stage starts its processes: in this process, under torchrun on this machine, or as one torchrun
per node of a Slurm allocation.

A run with ``nodes: N`` (N > 1) is one Slurm job of N nodes. Its script first runs on one node of the allocation;
there it starts ``srun`` with one task per node. Each task is that node's launcher: a torchrun joining a static
rendezvous at the first host of ``SLURM_JOB_NODELIST``, with its node rank from ``SLURM_NODEID``. torchrun then
starts ``gpus`` workers on its node, and torch.distributed / DeepSpeed take it from there.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

from snaketune.errors import UserError

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
