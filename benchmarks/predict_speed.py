#!/usr/bin/env python
"""Predict stage speed: batched generation (left padding, length-sorted batches, KV cache) against generating the
same rows one at a time, with the same greedy settings; checks both give the same answers.

    python benchmarks/predict_speed.py                                   # tiny default model, CPU, 500 rows
    python benchmarks/predict_speed.py --shape qwen2.5-0.5b --rows 200 --out benchmarks/results/predict_gpu.json

Builds a random-init model of the given shape with the builtin tokenizer, writes a test split of chat prompts of
varied length, runs snaketune.predict.predict with batch_size B and with batch_size 1, and prints (and with
--out writes) one JSON object: seconds for each, rows/s, speedup, and how many answers differ.
Target (issue 5): 500 rows on the 2-core CPU at least 8x faster batched, same greedy outputs.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

SHAPES = {  # random-init shapes: the default tiny model, and Qwen2.5-0.5B's layers with the builtin vocabulary
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
    "qwen2.5-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    import pandas as pd
    import torch

    from snaketune.download import fetch
    from snaketune.predict import GenerationSettings, predict
    from snaketune.templates import render

    corpus = [str(REPO / "data" / "identity.jsonl"), str(REPO / "data" / "text_matching.json")]
    settings = {"source": "builtin", "architecture": "qwen2", "seed": 0, "vocab_size": 2048,
                "max_position_embeddings": 2048, "initializer_range": 0.2 if args.shape == "tiny" else 0.02,
                "tokenizer_corpus": corpus, "trust_remote_code": False, **SHAPES[args.shape]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fetch(settings, tmp / "model")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tmp / "model")
        questions = [f"第{i}个问题：" + "请详细说明。" * (i % 13) + f" Question {i}: tell me about item {i}."
                     for i in range(args.rows)]
        prompts = [render(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
        pd.DataFrame({"id": [f"q{i}" for i in range(args.rows)], "prompt": prompts,
                      "reference": [""] * args.rows}).to_parquet(tmp / "test.parquet")
        timings, outputs = {}, {}
        for batch_size in (args.batch_size, 1):
            generation = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=batch_size)
            start = time.perf_counter()
            predict(generation, tmp / "model", tmp / "test.parquet", tmp / f"p{batch_size}.csv")
            timings[batch_size] = time.perf_counter() - start
            outputs[batch_size] = list(pd.read_csv(tmp / f"p{batch_size}.csv", keep_default_na=False)["prediction"])
    differ = sum(a != b for a, b in zip(outputs[args.batch_size], outputs[1], strict=True))
    result = {
        "shape": args.shape, "rows": args.rows, "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
        f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "batched_seconds": round(timings[args.batch_size], 2), "one_at_a_time_seconds": round(timings[1], 2),
        "batched_rows_per_second": round(args.rows / timings[args.batch_size], 1),
        "one_at_a_time_rows_per_second": round(args.rows / timings[1], 1),
        "speedup": round(timings[1] / timings[args.batch_size], 2), "answers_that_differ": differ,
    }
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
