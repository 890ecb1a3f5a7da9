"""Shared command-line plumbing for the stage scripts: settings parsing and the exit-code contract."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from snaketune.errors import UserError


def settings_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings", type=json.loads, default={},
                        help="stage settings as a JSON object (the workflow passes the resolved config)")


def make_settings(settings_class, values: dict[str, Any]):
    """Build a settings dataclass; an unknown or missing key is a user error naming the key."""
    from dataclasses import MISSING, fields

    known = {item.name: item for item in fields(settings_class) if item.init}
    unknown = sorted(set(values) - set(known))
    missing = [name for name, item in known.items() if name not in values
               and item.default is MISSING and item.default_factory is MISSING]
    if unknown or missing:
        problem = f"unknown key `{unknown[0]}`" if unknown else f"`{missing[0]}` is required"
        raise UserError(f"--settings: {problem} ({settings_class.__name__} takes: {', '.join(known)})")
    try:
        return settings_class(**values)
    except TypeError as exc:  # a value of the wrong type, met by a check in __post_init__
        raise UserError(f"--settings: {exc}") from None


# Messages the libraries print on every run that say nothing about this run: a user reading a failed job's log
# should see the failure. (logger name, or warning category and message pattern)
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)  # "Failed to load CPU gemm_4bit_forward from kernels-community"
QUIET_WARNINGS = ((FutureWarning, r"`(is_)?gradient_checkpointing\w*` is deprecated"),)


def quiet_known_noise() -> None:
    """Silence the library messages in QUIET_LOGGERS and QUIET_WARNINGS (their errors still show)."""
    import logging
    import warnings

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category, pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)


ERROR_FD = "SNAKETUNE_ERROR_FD"  # the workflow's jobs: a file descriptor of Snakemake's own terminal (rules: 3>&2)


def disk_full(exc: BaseException) -> bool:
    """A write that failed for want of space: OSError ENOSPC, or a library's error that carries it as text
    (safetensors: 'No space left on device (os error 28)')."""
    import errno

    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc)


def disk_full_line(exc: BaseException, outputs: Sequence[str] = ()) -> str:
    """One line for a full disk: which file (the error's, else the script's first output), and how much room is
    left where it was written."""
    import shutil
    from pathlib import Path

    named = getattr(exc, "filename", None) or (outputs[0] if outputs else None)
    target = Path(named or ".")
    folder = next((p for p in [target, *target.absolute().parents] if p.is_dir()), Path("."))
    free = shutil.disk_usage(folder).free / 2**20
    what = f"writing {target}" if named else f"({str(exc).splitlines()[0][:200]})"
    return f"no space left on device {what}; {free:.0f} MB free on {folder}: free some space and run again"


def report_error(line: str, to_terminal: bool) -> None:
    """Print ``error: line`` to stderr (the job's log); also straight to Snakemake's terminal when asked, or when
    the log cannot be written (a full disk holds the log too)."""
    text = f"\nerror: {line}\n"  # on a fresh line: a progress bar may have left the cursor mid-line
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except OSError:
        to_terminal = True
    if to_terminal and os.environ.get(ERROR_FD, "").isdigit():
        try:
            os.write(int(os.environ[ERROR_FD]), text.lstrip("\n").encode("utf-8", "replace"))
        except OSError:
            pass


def main_guard(body: Callable[[], Any], outputs: Sequence[str | None] = ()) -> int:
    """Run a script body: 0 on success, 1 with a one-line ``error:`` for user mistakes (and a full disk, also on
    Snakemake's terminal, naming the file or else the first of ``outputs``), traceback for bugs."""
    quiet_known_noise()
    try:
        body()
    except UserError as exc:
        report_error(str(exc), to_terminal=False)
        return 1
    except Exception as exc:  # noqa: BLE001 - a full disk is no bug: one line; anything else re-raises
        if not disk_full(exc):
            raise
        report_error(disk_full_line(exc, [str(path) for path in outputs if path]), to_terminal=True)
        return 1
    return 0


def model_source_arguments(parser: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """--model (a model folder), or --model-manifest with --adapter (a base and its adapter)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="merged (or any Hugging Face) model folder")
    source.add_argument("--model-manifest", help="base model's manifest.json (with --adapter, or alone: the base)")
    parser.add_argument("--adapter", help="adapter folder written by the train stage (with --model-manifest)")
    return source


def model_source(args: argparse.Namespace):
    """(model folder, trust_remote_code, adapter folder or None) from model_source_arguments."""
    from pathlib import Path

    from snaketune.download import model_path

    if args.adapter and not args.model_manifest:
        raise UserError("--adapter needs --model-manifest: the base model it sits on")
    if args.model_manifest:  # the base with its adapter, or alone (a baseline run)
        folder, trust = model_path(args.model_manifest)
        return folder, trust, Path(args.adapter) if args.adapter else None
    folder = Path(args.model).absolute()  # a folder on disk, never a hub name
    if not (folder / "config.json").is_file():
        raise UserError(f"--model: `{args.model}` is not a model folder (no config.json)")
    return folder, False, None
