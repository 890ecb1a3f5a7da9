"""Finished runs' files, written as the stages write them, for the report's tests: a base run and tuned runs of
one model and dataset, answering the same test rows (a run's answer is right on the rows its index allows)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

QUESTIONS = [f"What is {n} plus {n}?" for n in range(30)]


def answer(run_index: int, row: int) -> str:
    """Run 0 (the base) gets nothing right; run k answers the first 3k rows right and the rest "I do not know"."""
    return str(2 * row) if row < 3 * run_index else "I do not know"


def write_run(folder: Path, name: str, index: int, trains: bool, image: str | None = None) -> dict:
    """One run's metrics, predictions and (trained) log and summary; returns its report record."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for row, text in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": str(2 * row)}]
        rows.append({"id": f"q{row:03d}", "prompt": f"<user>{text}<assistant>", "reference": str(2 * row),
                     "prediction": answer(index, row), "messages": json.dumps(messages),
                     **({"images": json.dumps([image])} if image else {})})
    with open(folder / "predictions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    right = sum(r["prediction"] == r["reference"] for r in rows) / len(rows)
    (folder / "metrics.json").write_text(json.dumps({"n": len(rows), "exact_match": right, "bleu-4": 100 * right,
                                                     "rouge-l": 100 * right}))
    files = {"metrics": str(folder / "metrics.json"), "predictions": str(folder / "predictions.csv")}
    if trains:
        with open(folder / "train_log.csv", "w", newline="") as handle:
            handle.write("step,epoch,loss,learning_rate,grad_norm,tokens_per_second\n")
            handle.writelines(f"{step},{step / 40},{3.0 / (1 + step * index / 10)},1e-4,1.0,13912.4\n"
                              for step in range(1, 41))
        (folder / "train_summary.json").write_text(json.dumps({
            "global_step": 40, "final_loss": 3.0 / (1 + 4 * index), "tokens_per_second": 13912.4 + index,
            "eval_loss": 3.2 / (1 + 4 * index)}))
        files.update(train_log=str(folder / "train_log.csv"), train_summary=str(folder / "train_summary.json"))
    return {"run": name, "model": "tiny", "dataset": "sums", "baseline": "", "trains": trains,
            "method": "lora" if trains else "none", "stage": "sft", "from_run": "", "learning_rate": 1e-4 * (index + 1),
            "num_train_epochs": 3, "max_steps": -1 if trains else 0,
            "settings": {"model": "tiny", "dataset": "sums", "method": "lora" if trains else "none",
                         **({"learning_rate": 1e-4 * (index + 1), "lora_rank": 16} if trains else {}),
                         "generation.max_new_tokens": 32},
            "files": files, "exams": {}, "test_sets": {}, "serve": {"model": str(folder / "merged")}}


def ten_runs(folder: Path, image: str | None = None) -> list[dict]:
    """A base run (``base``) and nine tuned runs (``tuned-1`` ... ``tuned-9``) of the same model and dataset."""
    return [write_run(folder / "base", "base", 0, trains=False, image=image)] + [
        write_run(folder / f"tuned-{index}", f"tuned-{index}", index, trains=True, image=image)
        for index in range(1, 10)]
