"""What a training run leaves to read: train_log.csv (one row per logged step), the loss curve, and the numbers of
the whole run that go into train_summary.json."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from snaketune.io import atomic_file, save_png

LOG_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second"]


def write_log_csv(history: list[dict[str, Any]], path: Path, columns: list[str] = LOG_COLUMNS) -> list[dict[str, Any]]:
    """train_log.csv: one row per logged step; a column named ``a/b`` in the log is written ``a_b``."""
    rows = [{key.replace("/", "_"): entry.get(key, "") for key in columns} for entry in history if "loss" in entry]
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[key.replace("/", "_") for key in columns])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def plot_loss(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """loss.png: the training loss of each logged step (a note when the run took none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if rows:
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    else:
        ax.text(0.5, 0.5, "no training steps", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    save_png(fig, path)


def run_summary(trainer, result, log_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Steps, losses and speed of the whole run (not of the last logging window)."""
    seconds = result.metrics.get("train_runtime") or 0.0
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"global_step": trainer.state.global_step, "train_loss": result.training_loss,
            "final_loss": log_rows[-1]["loss"] if log_rows else None, "tokens_seen": tokens,
            "train_seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None}


def peak_memory() -> dict[str, Any]:
    """Each process's peak GPU memory in GiB, gathered from every GPU (ZeRO's promise is about each of them), and
    the largest; nothing on the CPU. Every process must call it."""
    import torch

    if not torch.cuda.is_available():
        return {}
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
    if torch.distributed.is_initialized():
        peaks = [torch.zeros_like(peak) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(peaks, peak)
    else:
        peaks = [peak]
    per_process = [round(p.item(), 3) for p in peaks]
    return {"peak_memory_gib_per_process": per_process, "peak_memory_gib": max(per_process)}
