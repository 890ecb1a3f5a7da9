"""Dataset build: canonical records -> tokenized train/eval/test parquet with loss masks, plus stats.json.

Tokenizing happens once here, keyed by dataset and model, so every run that shares them reuses the result.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snaketune.errors import UserError, located
from snaketune.formats import Record, read_records
from snaketune.io import atomic_file, write_json
from snaketune.templates import TemplateError, encode_conversation, render, template_sha256, with_system

SPLITS = ("train", "eval", "test")
COLUMNS = ["id", "line", "input_ids", "labels", "n_tokens", "n_supervised", "truncated", "prompt", "reference",
           "messages"]


@dataclass
class DatasetSettings:
    path: str
    format: str
    system: str | None = None
    max_seq_length: int = 512
    eval_size: float = 0.1
    test_size: float = 0.1
    seed: int = 0


def split_sizes(n: int, eval_size: float, test_size: float) -> tuple[int, int]:
    """Rows for eval and test: a fraction of ``n`` when below 1, a row count otherwise."""

    def count(size: float) -> int:
        return int(size) if size >= 1 else round(size * n)

    return count(eval_size), count(test_size)


def split_records(records: list[Record], settings: DatasetSettings) -> dict[str, list[Record]]:
    """Shuffle with the dataset seed and cut test, eval, then train; the same seed gives the same split."""
    n_eval, n_test = split_sizes(len(records), settings.eval_size, settings.test_size)
    if n_eval + n_test >= len(records):
        raise UserError(
            f"{settings.path}: {len(records)} rows leave none for training after eval_size={settings.eval_size} "
            f"and test_size={settings.test_size}"
        )
    order = list(range(len(records)))
    random.Random(settings.seed).shuffle(order)
    test, evaluation, train = order[:n_test], order[n_test : n_test + n_eval], order[n_test + n_eval :]
    cuts = (train, evaluation, test)
    return {name: [records[i] for i in sorted(rows)] for name, rows in zip(SPLITS, cuts, strict=True)}


def encode_record(tokenizer, record: Record, settings: DatasetSettings) -> dict[str, Any]:
    """One parquet row: token ids, labels, and the prompt/reference that predict and evaluate use."""
    conversation = with_system(record.system, record.messages)
    try:
        encoded = encode_conversation(tokenizer, conversation, settings.max_seq_length)
    except TemplateError as exc:
        raise located(settings.path, record.line, str(exc)) from None
    if not encoded.eos_supervised:
        raise located(
            settings.path, record.line,
            f"the chat template does not end assistant turns with the tokenizer's eos token "
            f"`{tokenizer.eos_token}`; a model trained on it would never stop. Set the model's eos_token to the "
            f"template's end-of-turn token",
        )
    return {
        "id": record.id,
        "line": record.line,
        "input_ids": encoded.input_ids,
        "labels": encoded.labels,
        "n_tokens": len(encoded.input_ids),
        "n_supervised": encoded.n_supervised,
        "truncated": encoded.truncated,
        "prompt": render(tokenizer, conversation[:-1], add_generation_prompt=True),
        "reference": record.messages[-1]["content"],
        "messages": json.dumps(conversation, ensure_ascii=False),
    }


def build(settings: DatasetSettings, tokenizer, out_dir: str | Path) -> dict[str, Any]:
    """Read, split, tokenize and write ``{train,eval,test}.parquet`` and ``stats.json`` under ``out_dir``."""
    import pandas as pd
    from tqdm import tqdm

    records = read_records(settings.path, settings.format, settings.system)
    splits = split_records(records, settings)
    out_dir = Path(out_dir)
    stats: dict[str, Any] = {
        "source": settings.path, "format": settings.format, "max_seq_length": settings.max_seq_length,
        "chat_template_sha256": template_sha256(tokenizer), "eos_token": tokenizer.eos_token, "splits": {},
    }
    frames = {}
    for name, rows in splits.items():
        encoded = [encode_record(tokenizer, r, settings) for r in tqdm(rows, desc=f"tokenize {name}", file=sys.stderr)]
        dropped = [row for row in encoded if row["n_supervised"] == 0]
        for row in dropped:
            print(f"warning: {settings.path}:{row['line']}: dropped from {name}: no assistant token left within "
                  f"max_seq_length={settings.max_seq_length}", file=sys.stderr)
        kept = [row for row in encoded if row["n_supervised"] > 0]
        if name == "train" and not kept:
            raise UserError(f"{settings.path}: no training row keeps an assistant token within max_seq_length")
        frames[name] = pd.DataFrame(kept, columns=COLUMNS)
        stats["splits"][name] = {
            "rows": len(kept),
            "tokens": int(sum(r["n_tokens"] for r in kept)),
            "supervised_tokens": int(sum(r["n_supervised"] for r in kept)),
            "truncated": int(sum(r["truncated"] for r in kept)),
            "dropped_no_target": len(dropped),
            "max_tokens": int(max((r["n_tokens"] for r in kept), default=0)),
        }
    for name, frame in frames.items():
        with atomic_file(out_dir / f"{name}.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
    write_json(out_dir / "stats.json", stats)
    return stats
