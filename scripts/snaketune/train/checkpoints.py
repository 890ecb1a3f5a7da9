"""Resumable checkpoints: which ones a resume can read, and whose they are.

Checkpoints live in a folder of their own (``results/runs/{run}/checkpoints/``), beside the adapter folder and not
in it, because Snakemake deletes a job's declared outputs before starting it again. They carry a fingerprint of
the settings, the data and the starting model, so a rerun after a config change starts over instead of resuming
someone else's optimizer state.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from snaketune.io import file_problem, sha256_file
from snaketune.settings import TrainSettings
from snaketune.train import distributed

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def model_stamp(model_dir: Path) -> list:
    """Names, sizes and modification times of a model folder's files: a starting model built again (another
    run's merged model, retrained) does not resume checkpoints of the old one."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(model_dir).iterdir() if p.is_file())


def fingerprint(settings: TrainSettings, train_split: Path, model_dir: Path) -> str:
    """Whose checkpoints these are: the settings, the train split's content and the starting model's files."""
    return hashlib.sha256(
        json.dumps([asdict(settings), sha256_file(train_split), model_stamp(model_dir)], sort_keys=True).encode()
    ).hexdigest()


def resume_point(folder: Path, stamp: str) -> Path | None:
    """The checkpoint every process resumes from, or None: rank 0 clears the folder of others' and unreadable
    checkpoints (``prepare_checkpoints``) while the others wait, then each reads what is left."""
    if distributed.is_first_process():
        prepare_checkpoints(folder, stamp)
    distributed.barrier()
    return (complete_checkpoints(folder) or [None])[-1]


WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "latest")  # one of them: the weights (``latest``: a DeepSpeed checkpoint)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when every file the resume reads is there and readable.

    The Trainer writes trainer_state.json last, but a kill during a later copy, a full disk or a bad sync can
    still leave a truncated file behind; each file is checked the way the resume will read it.
    """
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (it was still being written)"
    if not any((checkpoint / name).exists() for name in WEIGHT_FILES):
        return f"no weights ({', '.join(WEIGHT_FILES)})"
    if (checkpoint / "latest").is_file():  # DeepSpeed: `latest` names the folder of the sharded states
        tag = (checkpoint / "latest").read_text().strip()
        if not (checkpoint / tag).is_dir():
            return f"`latest` names {tag}, which is missing"
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        problem = file_problem(path)
        if problem:
            return f"{path.relative_to(checkpoint)}: {problem}"
    return None


def complete_checkpoints(folder: Path, warn: bool = False) -> list[Path]:
    """Checkpoints a resume can read, oldest first; with ``warn``, one line for each one skipped."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    usable = []
    for _, checkpoint in sorted(found):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            usable.append(checkpoint)
        elif warn:
            print(f"warning: skipping checkpoint {checkpoint}: {problem}", file=sys.stderr)
    return usable


def prepare_checkpoints(folder: Path, fingerprint: str) -> Path | None:
    """Return the checkpoint to resume from, or None; checkpoints of other settings or data are discarded, and
    unreadable ones removed (with a warning) so the resume takes the newest readable one."""
    stamp = folder / "fingerprint.txt"
    if folder.exists() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        print(f"checkpoints in {folder} belong to other settings or data: starting over", file=sys.stderr)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint + "\n")
    usable = complete_checkpoints(folder, warn=True)
    for checkpoint in folder.iterdir():
        if CHECKPOINT_RE.match(checkpoint.name) and checkpoint.is_dir() and checkpoint not in usable:
            shutil.rmtree(checkpoint)
    return usable[-1] if usable else None
