"""Report stage: one leaderboard row per run and a self-contained HTML page with metrics and loss curves."""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any

from snaketune.io import atomic_file

RUN_COLUMNS = ["run", "model", "dataset", "method", "learning_rate", "num_train_epochs", "max_steps"]
METRIC_COLUMNS = ["n", "exact_match", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "text_tokenizer"]


def run_row(run: dict[str, Any], metrics_path: Path, log_path: Path) -> dict[str, Any]:
    """The leaderboard row of one run: its settings, its training length and final loss, its metrics."""
    metrics = json.loads(Path(metrics_path).read_text(encoding="utf-8"))
    with open(log_path, newline="") as handle:
        log = list(csv.DictReader(handle))
    row = {key: run.get(key, "") for key in RUN_COLUMNS}
    row["train_steps"] = int(log[-1]["step"]) if log else 0
    row["final_loss"] = float(log[-1]["loss"]) if log else ""
    row.update({key: metrics.get(key, "") for key in METRIC_COLUMNS})
    return row


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def write_report(runs: list[dict[str, Any]], metrics: list[Path], logs: list[Path], curves: list[Path],
                 leaderboard: Path, page: Path) -> list[dict[str, Any]]:
    """Write ``leaderboard.csv`` and ``report.html``; ``runs``, ``metrics``, ``logs`` and ``curves`` align."""
    rows = [run_row(run, m, log) for run, m, log in zip(runs, metrics, logs, strict=True)]
    columns = RUN_COLUMNS + ["train_steps", "final_loss"] + METRIC_COLUMNS
    with atomic_file(leaderboard) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    header = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r[c])}</td>" for c in columns) + "</tr>" for r in rows)
    figures = "".join(
        f"<figure><img alt='loss curve of {html.escape(r['run'])}' src='data:image/png;base64,"
        f"{base64.b64encode(Path(curve).read_bytes()).decode()}'><figcaption>{html.escape(r['run'])}"
        f"</figcaption></figure>"
        for r, curve in zip(rows, curves, strict=True)
    )
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>snaketune report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}figure{{display:inline-block;margin:1em}}</style>
</head><body><h1>snaketune report</h1>
<h2>Leaderboard</h2><p>exact_match is a fraction; BLEU and ROUGE are percentages.</p>
<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>
<h2>Training loss</h2>{figures}
</body></html>
"""
    with atomic_file(page) as tmp:
        tmp.write_text(document, encoding="utf-8")
    return rows
