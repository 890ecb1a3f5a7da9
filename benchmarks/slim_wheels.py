#!/usr/bin/env python
"""Slim the wheels a GPU call carries, so the whole set fits what one call can take (64 MiB with the repo).

- ``unsloth-*.whl``: drops ``studio/`` (Unsloth Studio, a web UI; the library never imports it);
- ``bitsandbytes-*.whl``: keeps the CPU library and one CUDA build (``--cuda``, default 130 for torch 2.11+cu130),
  drops the other CUDA, ROCm and XPU builds.

Each wheel is rewritten in place (same name) with its RECORD listing only the files kept; running it again on a
slimmed wheel changes nothing. Usage, after ``pip download`` into ``.whl``:

    python benchmarks/slim_wheels.py .whl --cuda 130
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path


def drop_rule(wheel: str, cuda: str):
    """A predicate over archive names: True for what to leave out of ``wheel``, or None to leave it alone."""
    if wheel.startswith("unsloth-"):
        return lambda name: name.startswith("studio/")
    if wheel.startswith("bitsandbytes-"):
        native = re.compile(r"bitsandbytes/libbitsandbytes_(\w+)\.(so|dll|dylib)$")

        def drop(name: str) -> bool:
            match = native.match(name)
            return bool(match) and match.group(1) not in ("cpu", f"cuda{cuda}")

        return drop
    return None


def slim(path: Path, drop) -> tuple[int, int]:
    """Rewrite ``path`` without the entries ``drop`` selects; returns (bytes before, bytes after)."""
    before = path.stat().st_size
    with zipfile.ZipFile(path) as source:
        names = source.namelist()
        dropped = {name for name in names if drop(name)}
        if not dropped:
            return before, before
        record = next(name for name in names if name.endswith(".dist-info/RECORD"))
        temporary = path.with_suffix(".tmp")
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as target:
            for info in source.infolist():
                if info.filename in dropped or info.filename == record:
                    continue
                target.writestr(info, source.read(info.filename))
            kept = [line for line in source.read(record).decode().splitlines()
                    if line and line.split(",", 1)[0] not in dropped]
            target.writestr(record, "\n".join(kept) + "\n")
    temporary.replace(path)
    return before, path.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--cuda", default="130", help="the CUDA build of bitsandbytes to keep (torch.version.cuda "
                        "without the dot)")
    args = parser.parse_args()
    for path in sorted(args.folder.glob("*.whl")):
        rule = drop_rule(path.name, args.cuda)
        if rule is None:
            continue
        before, after = slim(path, rule)
        print(f"{path.name}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    total = sum(p.stat().st_size for p in args.folder.glob("*.whl"))
    print(f"all wheels: {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
