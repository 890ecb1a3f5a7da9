"""Sweeps: a run with ``sweep:`` becomes ordinary runs, one per point, with stable readable names.

Grid:   ``sweep: {learning_rate: [0.01, 0.005], lora_rank: [8, 16]}``            -> 4 runs
        ``sweep: {generation.max_new_tokens: [16, 64]}`` (a key of a block, dotted)   -> 2 runs
Random: ``sweep: {mode: random, samples: 6, seed: 0, space: {learning_rate: {loguniform: [1e-4, 1e-2]},
                                                              lora_rank: [8, 16]}}``  -> 6 runs
A point's name is the run's name followed by each swept setting and its value, in the order written:
``identity-lora-learning_rate0.01-lora_rank8``. Runs that share a model and dataset share their download and
dataset build through the ordinary DAG; nothing here special-cases that.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from typing import Any

RESERVED = {"mode", "samples", "seed", "space"}
NOT_SWEEPABLE = {"sweep", "select_by", "select_mode"}


def format_value(value: Any) -> str:
    """A value as it appears in a run name: short, and only characters a run name may hold."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        value = format(value, "g").replace("+", "")
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(value))


def point_name(run: str, point: dict[str, Any]) -> str:
    return "-".join([run] + [f"{key}{format_value(value)}" for key, value in point.items()])


def _sample(rng: random.Random, values: Any) -> Any:
    if isinstance(values, list):
        return rng.choice(values)
    lo, hi = values["loguniform"]
    value = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return float(f"{value:.3g}")  # rounded so the name and the value agree


def points(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Every point of a (valid) sweep, in a stable order."""
    if sweep.get("mode", "grid") == "random":
        rng = random.Random(sweep.get("seed", 0))
        space = sweep["space"]
        return [{key: _sample(rng, values) for key, values in space.items()} for _ in range(sweep["samples"])]
    space = {key: values for key, values in sweep.items() if key not in RESERVED}
    return [dict(zip(space, combo, strict=True)) for combo in itertools.product(*space.values())]


def check(run: str, sweep: Any, settings: set[str], report: Callable[[tuple, str], None]) -> bool:
    """Report every problem of one run's sweep; True when it can be expanded."""
    keys = ("runs", run, "sweep")
    if not isinstance(sweep, dict) or not sweep:
        report(keys, "must be a mapping from run settings to lists of values")
        return False
    mode = sweep.get("mode", "grid")
    if mode not in ("grid", "random"):
        report(keys + ("mode",), f"`{mode}` is not grid or random")
        return False
    if mode == "random":
        for key in sorted(set(sweep) - RESERVED):
            report(keys + (key,), f"unknown key `{key}` in a random sweep (allowed: mode, samples, seed, space)")
        samples = sweep.get("samples")
        if not isinstance(samples, int) or samples < 1:
            report(keys + ("samples",), "a random sweep needs `samples`, a whole number of at least 1")
        space = sweep.get("space")
        if not isinstance(space, dict) or not space:
            report(keys + ("space",), "a random sweep needs `space`, a mapping from settings to values")
            return False
        keys = keys + ("space",)
    else:
        for key in sorted(RESERVED & set(sweep) - {"mode"}):
            report(keys + (key,), f"`{key}` belongs to random sweeps (mode: random)")
        space = {key: values for key, values in sweep.items() if key not in RESERVED}
    ok = True
    for key, values in space.items():
        where = keys + (key,)
        if key not in settings or key in NOT_SWEEPABLE:
            report(where, f"`{key}` is not a run setting that can be swept")
            ok = False
        elif isinstance(values, list):
            if not values:
                report(where, "empty list of values")
                ok = False
        elif mode == "random" and isinstance(values, dict) and set(values) == {"loguniform"}:
            bounds = values["loguniform"]
            if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int | float) for b in bounds)
                    and 0 < bounds[0] < bounds[1]):
                report(where, f"loguniform needs [lo, hi] with 0 < lo < hi, got {bounds}")
                ok = False
        else:
            allowed = "a list or {loguniform: [lo, hi]}" if mode == "random" else "a list"
            report(where, f"values must be {allowed}")
            ok = False
    return ok


def with_point(base: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """``base`` with a point's values set; ``generation.max_new_tokens`` sets one key of the generation block."""
    run = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for key, value in point.items():
        block, _, inner = key.partition(".")
        if inner:
            run[block] = {**run.get(block, {}), inner: value}
        else:
            run[key] = value
    return run


def expand(runs: dict[str, dict[str, Any]], settings: set[str], report: Callable[[tuple, str], None]
           ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Replace every run that has ``sweep:`` by its points; return (runs, sweeps).

    ``sweeps[name]`` holds the swept settings of each point (``points``), and ``select_by``/``select_mode``.
    """
    expanded: dict[str, dict[str, Any]] = {}
    sweeps: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    for name, entry in runs.items():
        if not isinstance(entry, dict) or "sweep" not in entry:
            expanded[name] = entry
            origin[name] = name
            continue
        base = {k: v for k, v in entry.items() if k not in NOT_SWEEPABLE}
        if not check(name, entry["sweep"], settings, report):
            continue
        sweep = {"runs": {}, "select_by": entry.get("select_by", "exact_match"),
                 "select_mode": entry.get("select_mode", "max")}
        for point in points(entry["sweep"]):
            run = point_name(name, point)
            if run in origin:
                report(("runs", name, "sweep"), f"two runs expand to one name `{run}` (also from `{origin[run]}`)")
                continue
            origin[run] = name
            expanded[run] = with_point(base, point)
            sweep["runs"][run] = point
        sweeps[name] = sweep
    return expanded, sweeps


def select_best(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """The best row by ``metric`` (``max`` or ``min``); a tie goes to the first run name in sorted order."""
    scored = [row for row in rows if isinstance(row.get(metric), int | float) and not math.isnan(row[metric])]
    if not scored:
        raise ValueError(f"no run has a value for `{metric}`")
    sign = -1 if mode == "max" else 1
    return min(scored, key=lambda row: (sign * row[metric], row["run"]))
