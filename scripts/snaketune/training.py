"""Train stage: LoRA through PEFT and the Hugging Face Trainer, resumable from the newest complete checkpoint.

Read top to bottom: settings -> model -> data -> trainer -> train (resuming if a checkpoint of the *same*
settings exists) -> save adapter, train_log.csv, loss.png. Checkpoints live beside the adapter folder, not in
it, because Snakemake deletes a job's declared outputs before starting it again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from snaketune.errors import UserError
from snaketune.io import atomic_dir, atomic_file, sha256_file, write_json

SUPPORTED_METHODS = ("lora",)  # the config model also names qlora and full; they are not trained yet
LOG_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second"]
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainSettings:
    """Hyperparameters, named as in transformers' TrainingArguments and PEFT's LoraConfig."""

    method: str = "lora"
    learning_rate: float = 2e-4
    num_train_epochs: float = 3
    max_steps: int = -1  # -1: run num_train_epochs; 0: no training at all (a baseline run)
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1  # effective batch = per_device * accumulation * processes
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    seed: int = 42
    lora_rank: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_target: str | list[str] = field(default="all")  # "all": every linear layer but the output head

    def __post_init__(self) -> None:
        if self.method not in SUPPORTED_METHODS:
            raise UserError(f"method `{self.method}` is not available in this version "
                            f"(available: {', '.join(SUPPORTED_METHODS)})")


class TokenDataset:
    """Rows of a tokenized parquet split as dicts the collator pads."""

    def __init__(self, path: str | Path):
        import pandas as pd

        frame = pd.read_parquet(path, columns=["input_ids", "labels"])
        self.rows = [{"input_ids": list(map(int, i)), "labels": list(map(int, lab))}
                     for i, lab in zip(frame["input_ids"], frame["labels"], strict=True)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints that finished writing (the Trainer writes trainer_state.json last), oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def prepare_checkpoints(folder: Path, fingerprint: str) -> Path | None:
    """Return the checkpoint to resume from, or None; checkpoints of other settings or data are discarded."""
    stamp = folder / "fingerprint.txt"
    if folder.exists() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        print(f"checkpoints in {folder} belong to other settings or data: starting over", file=sys.stderr)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint + "\n")
    checkpoints = complete_checkpoints(folder)
    return checkpoints[-1] if checkpoints else None


def write_log_csv(history: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    rows = [{key: entry.get(key, "") for key in LOG_COLUMNS} for entry in history if "loss" in entry]
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def plot_loss(rows: list[dict[str, Any]], path: Path, title: str) -> None:
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
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def make_trainer_class():
    from transformers import Trainer

    class LoggingTrainer(Trainer):
        """Adds real (non-padding) tokens per second to every log entry."""

        _last = None

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            now, seen = time.monotonic(), self.state.num_input_tokens_seen
            if "loss" in logs and self._last is not None and now > self._last[0]:
                logs["tokens_per_second"] = round((seen - self._last[1]) / (now - self._last[0]), 1)
            self._last = (now, seen)
            super().log(logs, start_time)

    return LoggingTrainer


def train(settings: TrainSettings, model_dir: Path, trust_remote_code: bool, train_path: Path, eval_path: Path,
          adapter_out: Path, log_csv: Path, loss_png: Path, checkpoints: Path, run_name: str = "run") -> dict:
    """Fine-tune and write the adapter folder, ``train_log.csv`` and ``loss.png``; return a summary."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, TrainingArguments, set_seed

    set_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code,
                                                 dtype=torch.float32)
    lora = LoraConfig(
        r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules="all-linear" if settings.lora_target == "all" else list(settings.lora_target),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    train_data, eval_data = TokenDataset(train_path), TokenDataset(eval_path)
    summary: dict[str, Any] = {"settings": asdict(settings), "train_rows": len(train_data),
                               "eval_rows": len(eval_data), "global_step": 0}

    history: list[dict[str, Any]] = []
    if settings.max_steps != 0:
        fingerprint = hashlib.sha256(
            json.dumps([asdict(settings), sha256_file(train_path), str(model_dir)], sort_keys=True).encode()
        ).hexdigest()
        resume_from = prepare_checkpoints(checkpoints, fingerprint)
        args = TrainingArguments(
            output_dir=str(checkpoints), run_name=run_name, seed=settings.seed, data_seed=settings.seed,
            learning_rate=settings.learning_rate, num_train_epochs=settings.num_train_epochs,
            max_steps=settings.max_steps, per_device_train_batch_size=settings.per_device_train_batch_size,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            lr_scheduler_type=settings.lr_scheduler_type, warmup_steps=settings.warmup_steps,
            weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
            logging_steps=settings.logging_steps, logging_first_step=True, save_strategy="steps",
            save_steps=settings.save_steps, save_total_limit=settings.save_total_limit, report_to=[],
            use_cpu=not torch.cuda.is_available(), include_num_input_tokens_seen="non_padding",
            remove_unused_columns=False, dataloader_num_workers=0, per_device_eval_batch_size=8,
        )
        trainer = make_trainer_class()(
            model=model, args=args, train_dataset=train_data,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        )
        effective = settings.per_device_train_batch_size * settings.gradient_accumulation_steps * args.world_size
        print(f"train rows {len(train_data)}, effective batch {effective}, resume from {resume_from}", file=sys.stderr)
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        history = trainer.state.log_history
        summary.update(global_step=trainer.state.global_step, train_loss=result.training_loss,
                       tokens_seen=int(trainer.state.num_input_tokens_seen))
        if len(eval_data):
            summary["eval_loss"] = trainer.evaluate(eval_dataset=eval_data)["eval_loss"]
        if not trainer.is_world_process_zero():
            return summary

    with atomic_dir(adapter_out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json(staging / "train_summary.json", summary)
    rows = write_log_csv(history, log_csv)
    plot_loss(rows, loss_png, title=run_name)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return summary
