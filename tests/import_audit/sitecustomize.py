"""Loaded by every Python process of the demo run (tests/conftest.py puts this folder on PYTHONPATH): records each
module that code under ``scripts/`` imports, with ``import`` statements anywhere (function bodies too), and writes
them when the process exits, one file per process: ``<stage script>-<pid>.json`` in $SNAKETUNE_IMPORT_AUDIT.
tests/test_envs.py checks them against the env of each rule."""

import atexit
import builtins
import json
import os
import sys

_FOLDER = os.environ.get("SNAKETUNE_IMPORT_AUDIT")
_OURS = os.environ.get("SNAKETUNE_IMPORT_AUDIT_CODE", "")
_found: set[str] = set()
_real_import = builtins.__import__


def _recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and globals and str(globals.get("__file__") or "").startswith(_OURS):
        _found.add(name.split(".")[0])
    return _real_import(name, globals, locals, fromlist, level)


def _write():
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if script.endswith(".py") and _found:
        with open(os.path.join(_FOLDER, f"{script[:-3]}-{os.getpid()}.json"), "w") as handle:
            json.dump(sorted(_found), handle)


if _FOLDER and _OURS:
    builtins.__import__ = _recording_import
    atexit.register(_write)
