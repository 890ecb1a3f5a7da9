"""Atomic output writing (a killed job never leaves a file or folder that looks finished), with the modes the
umask gives, and checks that a written file is whole."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def process_status(field: str) -> str | None:
    """One field of /proc/self/status (Linux), e.g. ``Umask`` or ``RssAnon``; None where there is none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return line.split()[1]
    except OSError:
        pass
    return None


def current_umask() -> int:
    """The process umask, read without changing it (Linux), else by setting and restoring it."""
    if (found := process_status("Umask")) is not None:
        return int(found, 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path, folder: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have: mkstemp and mkdtemp make 0600 / 0700, which
    would hide results from everyone else on a shared cluster."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    follow_umask(tmp_path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    follow_umask(tmp, folder=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_png(figure, path: str | Path) -> None:
    """Lay out a matplotlib figure, write it as a PNG atomically, and free it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented UTF-8 JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks so multi-GB shards stay out of memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_problem(path: str | Path) -> str | None:
    """Why a .safetensors file is not whole (header unreadable, or data shorter or longer than the header says),
    or None. Reads the header only: cheap on a 10 GB shard."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes: too short for a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"header says {length} bytes of metadata, the file has {size - 8} (truncated)"
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "unreadable safetensors header"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end != size:
        return f"{size} bytes, the header describes {8 + length + end} (truncated or padded)"
    return None


def file_problem(path: str | Path) -> str | None:
    """Why a saved file cannot be read back, for the formats a checkpoint holds (safetensors, torch zip, JSON),
    or None. Files of other kinds only need to exist."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        if not zipfile.is_zipfile(path):  # torch.save writes a zip; a cut file loses its central directory
            return "not a whole torch file (truncated?)"
        return None
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"not valid JSON ({exc})"
    return None
