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

``--static`` adds the strongest ``generate`` a user has (issue 36): transformers' static KV cache
(``cache_implementation="static"``), whose decoding step ``generate`` then compiles (torch.compile,
``reduce-overhead``: CUDA graphs), in the stage's compute dtype (bf16 on a GPU), batches of ``--baseline-batch``
rows in the same length order. Every batch is padded to the longest prompt of all rows and the last one filled up
to the full batch with copies of its last row (cut again after), so the compiled step keeps one shape and compiles
once. One pass compiles (``cold``: the whole call, model loading included); the best of ``--repeats`` further
passes is its generation time (``warm``).
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
    parser.add_argument("--static", action="store_true",
                        help="also run generate with the static KV cache and its compiled decoding step")
    parser.add_argument("--fp32-check", action="store_true",
                        help="also compare, in float32, the stage default's answers on the reference rows with "
                        "generate one row at a time (bf16 near-ties of a random-init model flip greedy picks)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    import pandas as pd
    import torch

    from snaketune.download import fetch
    from snaketune.predict import predict
    from snaketune.settings import GenerationSettings
    from snaketune.templates import render

    corpus = [str(REPO / "data" / "identity.jsonl"), str(REPO / "data" / "text_matching.json")]
    settings = {"source": "builtin", "architecture": "qwen2", "seed": 0, "vocab_size": 2048,
                "max_position_embeddings": 2048, "initializer_range": 0.2 if args.shape == "tiny" else 0.02,
                "tokenizer_corpus": corpus, "trust_remote_code": False,
                "tie_word_embeddings": False, **SHAPES[args.shape]}  # untied: the schema's default
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
        static = None
        if args.static:
            static = static_generate(tmp / "model", prompts, args.max_new_tokens, args.baseline_batch, args.repeats)
            outputs["generate-static-compiled"] = static.pop("answers")
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
        fp32 = None
        if args.fp32_check:  # the same comparison with both sides in float32
            answers = {}
            for name, generation in {"stage-default": GenerationSettings(max_new_tokens=args.max_new_tokens,
                                                                          dtype="float32"),
                                     "one-at-a-time": GenerationSettings(max_new_tokens=args.max_new_tokens,
                                                                         batch_size=1, decoder="generate",
                                                                         dtype="float32")}.items():
                predict(generation, tmp / "model", tmp / "reference.parquet", tmp / f"{name}-fp32.csv",
                        tmp / f"{name}-fp32.partial")
                answers[name] = pd.read_csv(tmp / f"{name}-fp32.csv", keep_default_na=False)["prediction"].tolist()
            fp32 = {"rows": reference_rows, "answers_that_differ": sum(
                a != b for a, b in zip(answers["stage-default"], answers["one-at-a-time"], strict=True))}
    import subprocess

    from snaketune.predict import compute_dtype

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    result = {
        "date": time.strftime("%Y-%m-%d"), "commit": commit, "torch": torch.__version__,
        "shape": args.shape, "dtype": str(compute_dtype()).removeprefix("torch."), "rows": args.rows,
        "max_new_tokens": args.max_new_tokens,
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
    result["answers_that_differ_between_stage_default_and_baseline"] = sum(
        a != b for a, b in zip(outputs["stage-default"], outputs[baseline], strict=True))
    if static is not None:
        answers = outputs["generate-static-compiled"]
        static["answers_that_differ_from_one_at_a_time"] = sum(
            a != b for a, b in zip(answers[:reference_rows], one, strict=True))
        static["answers_that_differ_from_stage_default"] = sum(
            a != b for a, b in zip(answers, outputs["stage-default"], strict=True))
        static["answers_that_differ_from_dynamic_generate"] = sum(
            a != b for a, b in zip(answers, outputs[baseline], strict=True))
        result["stacks"]["generate-static-compiled"] = static
        # the stage's whole call against the static cache's first (compiling) call, and generation against its
        # best warm pass (compiled, CUDA graphs captured)
        result["speedup_over_static_call"] = round(static["seconds"] / timings["stage-default"], 2)
        result["generation_speedup_over_static"] = round(
            static["generation_seconds"] / generating["stage-default"], 2)
    if fp32 is not None:
        result["float32_stage_default_against_one_at_a_time"] = fp32
    if profile:
        result["profile"] = profile.splitlines()
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def static_generate(model_dir: Path, prompts: list[str], max_new_tokens: int, batch: int, repeats: int) -> dict:
    """transformers' ``generate`` with the static KV cache and its compiled decoding step (see the module doc):
    the answers in the rows' order, the first call's seconds (loading and compiling included) and the best
    warm pass's."""
    import torch

    from snaketune.predict import load_for_generation

    start = time.perf_counter()
    tokenizer, model = load_for_generation(model_dir, None)  # the stage's loader: bf16 on a GPU, left padding
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    width = max(lengths)

    def one_pass() -> tuple[list[str], float]:
        answers = [""] * len(prompts)
        torch.cuda.synchronize() if device == "cuda" else None
        began = time.perf_counter()
        for first in range(0, len(order), batch):
            chunk = order[first : first + batch]
            filled = chunk + [chunk[-1]] * (batch - len(chunk))  # one shape for the compiled step
            inputs = tokenizer([prompts[i] for i in filled], return_tensors="pt", padding="max_length",
                               max_length=width, add_special_tokens=False).to(device)
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, use_cache=True,
                                        cache_implementation="static")
            texts = tokenizer.batch_decode(output[: len(chunk), width:], skip_special_tokens=True)
            for i, text in zip(chunk, texts, strict=True):
                answers[i] = text.strip()
        torch.cuda.synchronize() if device == "cuda" else None
        return answers, time.perf_counter() - began

    answers, cold = one_pass()
    call = time.perf_counter() - start
    warm = min(one_pass()[1] for _ in range(max(1, repeats)))
    rows = len(prompts)
    return {"settings": {"batch_size": batch, "decoder": "generate", "cache_implementation": "static",
                         "compiled": "generate's own (torch.compile, reduce-overhead)", "padded_to": width},
            "seconds": round(call, 2), "rows_per_second": round(rows / call, 2),
            "cold_generation_seconds": round(cold, 2), "generation_seconds": round(warm, 2),
            "generation_rows_per_second": round(rows / warm, 2), "answers": answers}


if __name__ == "__main__":
    sys.exit(main())
