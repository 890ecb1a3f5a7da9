"""Predict stage: batched generation on the test split into ``predictions.csv``.

Prompts are the ones the dataset stage rendered with the model's chat template, so inference sees exactly
what training saw. Batches are sorted by length and left-padded so each batch wastes little compute.
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PREDICTION_COLUMNS = ["id", "prompt", "reference", "prediction", "generation_seconds"]


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def predict(settings: GenerationSettings, model_dir: Path, test_path: Path, out_csv: Path) -> int:
    """Generate an answer for every test row and write ``out_csv`` atomically; return the row count."""
    import pandas as pd
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from snaketune.io import atomic_file

    set_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    test = pd.read_parquet(test_path, columns=["id", "prompt", "reference"])
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in test["prompt"]]
    order = sorted(range(len(test)), key=lambda i: lengths[i])
    sampling = {"temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample else {}
    predictions: dict[int, tuple[str, float]] = {}
    for start in tqdm(range(0, len(order), settings.batch_size), desc="generate", file=sys.stderr):
        batch = order[start : start + settings.batch_size]
        inputs = tokenizer([test["prompt"][i] for i in batch], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(device)
        began = time.perf_counter()
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                                    pad_token_id=tokenizer.pad_token_id, **sampling)
        seconds = (time.perf_counter() - began) / len(batch)
        texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for index, text in zip(batch, texts, strict=True):
            predictions[index] = (text.strip(), round(seconds, 4))
    frame = test.assign(prediction=[predictions[i][0] for i in range(len(test))],
                        generation_seconds=[predictions[i][1] for i in range(len(test))])
    with atomic_file(out_csv) as tmp:
        # Quote every field: generated text can hold a bare "\r", which unquoted would split a row in two.
        frame[PREDICTION_COLUMNS].to_csv(tmp, index=False, quoting=csv.QUOTE_ALL)
    return len(frame)
