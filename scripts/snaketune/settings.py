"""How stage settings become their jobs' params, so that upgrading snaketune reruns only what it changes.

A rule passes its stage's settings as a ``params`` value, and Snakemake reruns a job whose params changed. Were
that every field of the settings dataclass, each new setting would change every finished job's params and rerun
the whole DAG after an upgrade, though no output would change. So a setting added after the first release is
declared with ``added(default)``: while a run's value is the one that gives the outputs snaketune gave before the
setting existed, the setting is left out of the params. A run that sets another value, or a later default that
changes what runs compute (``added(new_default, same_output_at=old_value)``), has it in its params and reruns.
"""

from __future__ import annotations

from dataclasses import field, fields
from typing import Any

SAME_OUTPUT_AT = "same_output_at"  # field metadata: the value at which the setting changes no output


def added(default: Any, *, same_output_at: Any = None, **metadata: Any) -> Any:
    """A dataclass field for a setting added after jobs were already run: left out of its jobs' params while it
    holds ``same_output_at`` (the default itself unless given)."""
    neutral = default if same_output_at is None else same_output_at
    return field(default=default, metadata={SAME_OUTPUT_AT: neutral, **metadata})


def job_params(settings: Any) -> dict[str, Any]:
    """The settings dataclass ``settings`` as a job's params: every field, but an ``added`` one at its
    same-output value. Values are JSON-ready (nested dataclasses are not used in settings)."""
    params = {}
    for spec in fields(settings):
        value = getattr(settings, spec.name)
        if SAME_OUTPUT_AT in spec.metadata and value == spec.metadata[SAME_OUTPUT_AT]:
            continue
        params[spec.name] = value
    return params
