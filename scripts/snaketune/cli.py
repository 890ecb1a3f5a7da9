"""Shared command-line plumbing for the stage scripts: settings parsing and the exit-code contract."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from snaketune.errors import UserError


def settings_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings", type=json.loads, default={},
                        help="stage settings as a JSON object (the workflow passes the resolved config)")


def make_settings(settings_class, values: dict[str, Any]):
    """Build a settings dataclass; an unknown or missing key is a user error naming the key."""
    try:
        return settings_class(**values)
    except TypeError as exc:
        raise UserError(f"--settings: {exc}".replace("__init__()", settings_class.__name__)) from None


def main_guard(body: Callable[[], Any]) -> int:
    """Run a script body: 0 on success, 1 with a one-line ``error:`` for user mistakes, traceback for bugs."""
    try:
        body()
    except UserError as exc:
        # start on a fresh line: a progress bar may have left the cursor mid-line
        print(f"\nerror: {exc}", file=sys.stderr)
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
