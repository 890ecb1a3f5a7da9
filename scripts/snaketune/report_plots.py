"""The report's plots (matplotlib, written as PNG files and embedded in report.html): every run's loss on shared
axes per dataset, metric bars per dataset, and each sweep's metric against its swept settings."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

PERCENT_SCALE = 100  # fractions are drawn as percentages, on the same axis as BLEU and ROUGE


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colours(runs: list[str]) -> dict[str, Any]:
    """One colour per run, the same in every chart of the page."""
    palette = _pyplot().get_cmap("tab10" if len(runs) <= 10 else "tab20")
    return {run: palette(index % palette.N) for index, run in enumerate(runs)}


def save(fig, path: str | Path | None = None) -> str:
    """Write ``fig`` to ``path`` (when given) and return it as base64 PNG for an <img> tag."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    _pyplot().close(fig)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(buffer.getvalue())
    return base64.b64encode(buffer.getvalue()).decode()


def _numbers(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    points = [(int(row["step"]), float(row[key])) for row in rows if row.get(key) not in (None, "")]
    return [step for step, _ in points], [value for _, value in points]


def loss_chart(dataset: str, logs: dict[str, list[dict[str, str]]], eval_losses: dict[str, float | None],
               colour: dict[str, Any], log_scale: bool) -> Any:
    """Training loss of every run of ``dataset`` against its step (solid), eval loss where the log has it
    (dashed) and each run's final eval loss as a cross at its last step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for run, rows in logs.items():
        steps, losses = _numbers(rows, "loss")
        ax.plot(steps, losses, color=colour[run], label=f"{run} train")
        eval_steps, eval_values = _numbers(rows, "eval_loss")
        if eval_steps:
            ax.plot(eval_steps, eval_values, color=colour[run], linestyle="--", label=f"{run} eval")
        final = eval_losses.get(run)
        if final is not None and steps:
            ax.scatter([steps[-1]], [final], color=colour[run], marker="x", s=60, zorder=3,
                       label=f"{run} eval (end)")
    ax.set(xlabel="step", ylabel="loss", title=f"{dataset}: loss" + (" (log scale)" if log_scale else ""))
    if log_scale:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def metric_chart(dataset: str, runs: list[str], values: dict[str, dict[str, float]], percent: set[str],
                 colour: dict[str, Any]) -> Any:
    """Grouped bars: one group per metric, one bar per run; fractions drawn as percentages."""
    plt = _pyplot()
    metrics = [m for m in dict.fromkeys(m for run in runs for m in values.get(run, {}))]
    fig, ax = plt.subplots(figsize=(min(7.0, max(4.5, 1.5 + 0.3 * len(metrics) * max(1, len(runs)))), 3.4))
    width = 0.8 / max(1, len(runs))
    for index, run in enumerate(runs):
        heights = [values.get(run, {}).get(m, math.nan) for m in metrics]
        heights = [h if m in percent else h * PERCENT_SCALE for h, m in zip(heights, metrics, strict=True)]
        ax.bar([i + index * width for i in range(len(metrics))], heights, width, color=colour[run], label=run)
    ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(metrics))], metrics, rotation=20,
                  ha="right", fontsize=8)
    ax.set(ylabel="score (%)", title=f"{dataset}: metrics", ylim=(0, 100))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def sweep_chart(name: str, points: dict[str, dict[str, Any]], scores: dict[str, Any], metric: str,
                best: str) -> Any:
    """``metric`` against each swept setting (one panel per setting), the best run's point starred; a setting
    whose values span more than 10x (learning rates) gets a log axis."""
    plt = _pyplot()
    settings = sorted({key for point in points.values() for key in point})
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.2), squeeze=False)
    for ax, key in zip(axes[0], settings, strict=True):
        xs = [points[run][key] for run in points]
        numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
        xs = xs if numeric else [str(x) for x in xs]
        ys = [scores.get(run) if isinstance(scores.get(run), int | float) else math.nan for run in points]
        ax.scatter(xs, ys, color="tab:blue")
        best_x = points[best][key] if numeric else str(points[best][key])
        ax.scatter([best_x], [scores[best]], marker="*", s=220, color="tab:red", zorder=3, label=f"best: {best}")
        if numeric and min(xs) > 0 and max(xs) / min(xs) > 10:
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=metric, title=f"sweep {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig
