#!/usr/bin/env python
"""Predict stage speed: the stage's default (``batch_size: auto``: batches sized to the free GPU memory, and its
lean greedy loop) against Hugging Face batched ``generate`` at a fixed batch size (length-sorted, left-padded,
KV cache: the predict stage with ``batch_size: 128, decoder: generate``), and both against ``generate`` one row
at a time, greedy, in float32.

    python benchmarks/predict_speed.py --repeats 3                       # tiny default model, CPU
    python benchmarks/predict_speed.py --shape qwen2.5-0.5b --rows 500 --max-new-tokens 64 \
        --out benchmarks/results/predict_gpu_qwen2.5-0.5b.json          # one GPU

Builds a random-init float32 model of the given shape with the builtin tokenizer, writes a test split of chat
prompts of varied length, runs snaketune.predict.predict over all rows with the stage's defaults and with the
baseline, and over the first ``--reference-rows`` rows one at a time, and prints (and with --out writes) one JSON
object: seconds and rows/s of each (the whole call, model loading included, and the generation alone: the sum of the
batches' times), the default's speedup over the baseline for both, and how many answers differ from the
one-at-a-time ones. ``--profile`` adds the top operators of one more run of the default. Target (issue 17): at
least 2x the baseline on 500 rows of 64 new tokens, no answer different.
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
    parser.add_argument("--baseline-batch", type=int, default=128,
                        help="batch size of the baseline: transformers' generate, length-sorted")
    parser.add_argument("--reference-rows", type=int, default=48, help="rows generated one at a time to compare")
    parser.add_argument("--repeats", type=int, default=1, help="times each stack runs, in turns; the best counts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--profile", action="store_true",
                        help="also profile one more run of the stage default (torch.profiler): the top operators")
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
        timings, outputs, generating = {}, {}, {}
        pd.read_parquet(tmp / "test.parquet").head(8).to_parquet(tmp / "warm.parquet")  # load, CUDA init
        predict(GenerationSettings(max_new_tokens=4, batch_size=8), tmp / "model", tmp / "warm.parquet",
                tmp / "warm.csv", tmp / "warm.partial")
        stacks = {"stage-default": GenerationSettings(max_new_tokens=args.max_new_tokens),
                  f"generate-batch-{args.baseline_batch}": GenerationSettings(
                      max_new_tokens=args.max_new_tokens, batch_size=args.baseline_batch, decoder="generate")}
        for _ in range(args.repeats):  # stacks take turns; each keeps its best time
            for name, generation in stacks.items():
                start = time.perf_counter()
                predict(generation, tmp / "model", tmp / "test.parquet", tmp / f"{name}.csv",
                        tmp / f"{name}.partial")
                timings[name] = min(timings.get(name, float("inf")), time.perf_counter() - start)
                written = pd.read_csv(tmp / f"{name}.csv", keep_default_na=False)
                outputs[name] = written["prediction"].tolist()
                # the batches' own time (the CSV's per-row share of its batch), without loading the model
                generating[name] = min(generating.get(name, float("inf")), written["generation_seconds"].sum())
        profile = None
        if args.profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as profiler

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            with profiler(activities=activities) as recorded:
                predict(stacks["stage-default"], tmp / "model", tmp / "test.parquet", tmp / "profiled.csv",
                        tmp / "profiled.partial")
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            profile = recorded.key_averages().table(sort_by=sort, row_limit=25)
            print(profile)
        reference_rows = min(args.reference_rows, args.rows)
        pd.read_parquet(tmp / "test.parquet").head(reference_rows).to_parquet(tmp / "reference.parquet")
        start = time.perf_counter()
        predict(GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=1, decoder="generate"), tmp / "model",
                tmp / "reference.parquet", tmp / "p1.csv", tmp / "p1.partial")
        one_seconds = time.perf_counter() - start
        one = pd.read_csv(tmp / "p1.csv", keep_default_na=False)["prediction"].tolist()
    result = {
        "shape": args.shape, "dtype": "float32", "rows": args.rows, "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
        f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "stacks": {name: {"settings": {"batch_size": generation.batch_size, "decoder": generation.decoder},
                          "seconds": round(timings[name], 2), "rows_per_second": round(args.rows / timings[name], 2),
                          "generation_seconds": round(generating[name], 2),
                          "generation_rows_per_second": round(args.rows / generating[name], 2),
                          "answers_that_differ_from_one_at_a_time":
                              sum(a != b for a, b in zip(outputs[name][:reference_rows], one, strict=True))}
                   for name, generation in stacks.items()},
        "one_at_a_time": {"rows": reference_rows, "seconds": round(one_seconds, 2),
                          "rows_per_second": round(reference_rows / one_seconds, 2)},
    }
    baseline = f"generate-batch-{args.baseline_batch}"
    result["speedup"] = round(timings[baseline] / timings["stage-default"], 2)
    result["generation_speedup"] = round(generating[baseline] / generating["stage-default"], 2)
    if profile:
        result["profile"] = profile.splitlines()
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
