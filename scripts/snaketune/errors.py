"""User-facing errors: one line that names the file, the line and the field.

A ``UserError`` is a mistake in the user's config or data. Scripts catch it and print ``error: <message>``
with exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix: bad config, bad data, a missing file."""


def located(path: str | Path, line: int | None, message: str) -> UserError:
    """Build a ``UserError`` that starts with ``path:line:`` (the line is left out when unknown)."""
    where = f"{path}:{line}" if line else f"{path}"
    return UserError(f"{where}: {message}")
