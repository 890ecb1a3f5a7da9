#!/usr/bin/env python
"""Training stacks side by side, in one process, on the same rows and seed (one GPU):

- ``recipe``: the hand-written recipes' loop: rows padded to the longest of 8, sdpa, transformers' loss;
- ``library-<attention>-ckpt|nockpt``: what a user gets by switching on libraries: Liger Kernel (RoPE, RMSNorm,
  SwiGLU, fused linear cross-entropy) + padding-free packing (packs of ``--pack-tokens``) + flex or sdpa
  attention, gradient checkpointing on or off;
- ``stage-<variant>-ckpt|nockpt``: ``snaketune.train.train``, the train stage itself (the Trainer, its data
  loader, the Arrow rows), with its default speed settings (``default``) or a variant of them
  (``STAGE_VARIANTS``), gradient checkpointing on or off.

Workload: a random-init Qwen2.5-1.5B shape in bf16, LoRA r16 on every linear layer, rows of lognormal length
(median 300, sigma 0.8, 16 to 2048 tokens), the first quarter of each row a prompt (label -100), about 16k real
tokens per optimizer step. Each stack trains ``--steps`` optimizer steps; tokens/s is the median over steps after
the first two, counting real (non-padding) tokens, prompt included.

MFU (model FLOPs utilisation) = tokens/s x FLOPs per token / peak, with FLOPs per token = 6 x N + 6 x layers x
hidden x (mean attended length), N the parameters of the dense model (embeddings excluded, head included; the
PaLM convention, which counts a LoRA run as if every weight trained and ignores recomputation), and peak the GPU's
dense bf16 rate (989 TFLOP/s for an H100 SXM).

    python benchmarks/train_stacks.py --out benchmarks/results/train_stacks_h100.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A40": 149.7}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}


def make_rows(count: int, vocab: int, seed: int, prompt_share: float) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(math.log(300), 0.8, count)), 16, 2048).astype(int)
    rows = []
    for length in lengths:
        ids = rng.integers(3, vocab, size=length).tolist()
        prompt = int(length * prompt_share)
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def optimizer_steps(rows: list[dict], tokens_per_step: int) -> list[list[int]]:
    """Consecutive rows grouped into steps of about ``tokens_per_step`` tokens: the same steps for every stack."""
    steps, current, used = [], [], 0
    for index, row in enumerate(rows):
        current.append(index)
        used += len(row["input_ids"])
        if used >= tokens_per_step:
            steps.append(current)
            current, used = [], 0
    return steps


def flops_per_token(config, rows: list[dict]) -> float:
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    per_layer = hidden * (heads * head_dim + 2 * kv * head_dim) + heads * head_dim * hidden \
        + 3 * hidden * config.intermediate_size
    dense = layers * per_layer + hidden * config.vocab_size
    lengths = [len(r["input_ids"]) for r in rows]
    attended = sum(n * n / 2 for n in lengths) / sum(lengths)  # mean keys a causal token attends to
    return 6 * dense + 6 * layers * hidden * attended


def load_lora(model_dir: Path, attention: str, checkpointing: bool, liger: bool = False):
    """The model in bf16 on the GPU, Liger's kernels patched in when asked, then wrapped in LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=attention)
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(model=model, rope=True, rms_norm=True, swiglu=True,
                                    fused_linear_cross_entropy=True)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    torch.manual_seed(0)
    return get_peft_model(model.cuda(), LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **LORA))


def padded_batches(batch_rows):
    import torch

    width = max(len(r["input_ids"]) for r in batch_rows)
    ids = [r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in batch_rows]
    labels = [r["labels"] + [-100] * (width - len(r["labels"])) for r in batch_rows]
    mask = [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch_rows]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def train_loop(model, rows, steps, micro_batches) -> dict:
    """Plain loop: for each step, its micro-batches, the loss of each weighted by its share of the step's
    supervised tokens (so every stack optimises the same per-step mean), AdamW lr 1e-4."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times, losses, tokens = [], [], []
    torch.cuda.reset_peak_memory_stats()
    for step in steps:
        step_rows = [rows[i] for i in step]
        supervised = sum(sum(t != -100 for t in r["labels"][1:]) for r in step_rows)
        torch.cuda.synchronize()
        began = time.perf_counter()
        total = 0.0
        for batch in micro_batches(step_rows):
            batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in batch.items()}
            share = int((batch["labels"][:, 1:] != -100).sum()) / supervised
            loss = model(**batch).loss * share
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
        losses.append(round(total, 5))
        tokens.append(sum(len(r["input_ids"]) for r in step_rows))
    speeds = [t / s for t, s in zip(tokens[2:], times[2:], strict=True)]
    return {"tokens_per_second": round(statistics.median(speeds), 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "losses": losses}


def run_recipe(model_dir, rows, steps, checkpointing=True) -> dict:
    model = load_lora(model_dir, "sdpa", checkpointing)
    return train_loop(model, rows, steps, lambda step_rows: (padded_batches(step_rows[i : i + 8])
                                                             for i in range(0, len(step_rows), 8)))


def pack_rows(lengths: list[int], capacity: int, seed: int, open_packs: int = 8) -> list[list[int]]:
    """The library stacks' packing: rows in a seeded shuffle, each into the first of the last ``open_packs`` packs
    of at most ``capacity`` tokens that has room, else a new pack (first fit over a window)."""
    import random

    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    packs: list[list[int]] = []
    room: list[int] = []
    for index in order:
        window = range(max(0, len(packs) - open_packs), len(packs))
        target = next((p for p in window if room[p] >= lengths[index]), None)
        if target is None:
            packs.append([])
            room.append(max(capacity, lengths[index]))
            target = len(packs) - 1
        packs[target].append(index)
        room[target] -= lengths[index]
    return packs


def run_library(model_dir, rows, steps, attention: str, checkpointing: bool, pack_tokens: int) -> dict:
    from snaketune.packing import flatten_rows

    model = load_lora(model_dir, attention, checkpointing, liger=True)

    def micro_batches(step_rows):
        for pack in pack_rows([len(r["input_ids"]) for r in step_rows], pack_tokens, seed=0):
            yield {k: v for k, v in flatten_rows([step_rows[i] for i in pack]).items() if k != "use_cache"}

    return train_loop(model, rows, steps, micro_batches)


STAGE_VARIANTS = {"default": {}, "nocompile": {"torch_compile": False, "liger_kernels": False},
                  "liger": {"torch_compile": False, "liger_kernels": True}, "chunked": {"fused_loss": "chunked"},
                  # QLoRA through the stage: its default (compiled layers), and as it was before (Liger, eager);
                  # run qlora before qloraliger, as Liger patches transformers' classes for the whole process
                  "qlora": {"method": "qlora"}, "qloraliger": {"method": "qlora", "torch_compile": False}}


def run_stage(model_dir, rows, n_steps, checkpointing: bool, pack_tokens: int, work: Path, variant: str) -> dict:
    """The train stage's function itself, default speed settings, on the same rows written as a parquet split."""
    import pandas as pd
    import torch

    from snaketune.train import TrainFiles, TrainSettings, train

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(data / "train.parquet")
    pd.DataFrame(rows[:2]).to_parquet(data / "eval.parquet")
    mean_row = sum(len(r["input_ids"]) for r in rows) / len(rows)
    per_device = max(1, round(pack_tokens / mean_row))  # micro-batches of about pack_tokens: per_device mean rows
    accumulation = max(1, round(16_384 / (per_device * mean_row)))
    run = work / f"stage-{checkpointing}"
    files = TrainFiles(train=data / "train.parquet", eval=data / "eval.parquet", stats=None,
                       adapter=run / "adapter", train_log=run / "train_log.csv", summary=run / "summary.json",
                       curve=run / "loss.png", checkpoints=run / "checkpoints")
    settings = TrainSettings(**{
        "method": "lora", "lora_rank": LORA["r"], "lora_alpha": LORA["lora_alpha"], "lora_dropout": 0.0,
        "learning_rate": 1e-4, "max_steps": n_steps, "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation, "logging_steps": 1, "save_steps": 10_000,
        "lr_scheduler_type": "constant", "precision": "bf16", "gradient_checkpointing": checkpointing,
        **STAGE_VARIANTS[variant]})
    torch.cuda.reset_peak_memory_stats()
    summary = train(settings, model_dir, False, files, run_name="stage-default")
    log = pd.read_csv(files.train_log)
    speeds = log["tokens_per_second"].dropna().tolist()[2:]
    return {"tokens_per_second": round(statistics.median(speeds), 1), "peak_memory_gib": summary["peak_memory_gib"],
            "losses": [round(x, 5) for x in log["loss"]], "speedups": summary["speedups"],
            "per_device_train_batch_size": per_device, "gradient_accumulation_steps": accumulation}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--pack-tokens", type=int, default=4096, help="tokens per packed micro-batch (the stage's: "
                        "about this many, per_device_train_batch_size mean rows)")
    parser.add_argument("--prompt-share", type=float, default=0.25)
    # Liger patches transformers' classes for the whole process: stacks without it run first
    parser.add_argument("--stacks", nargs="+", default=[
        "recipe", "stage-default-ckpt", "stage-default-nockpt", "library-sdpa-ckpt", "library-sdpa-nockpt",
        "library-flex_attention-ckpt", "library-flex_attention-nockpt"])
    parser.add_argument("--work", default="/tmp/snaketune-stacks")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from train_gpu import build_model
    from transformers import AutoConfig

    work = Path(args.work)
    model_dir = build_model("qwen2.5-1.5b", work / "model").parent
    config = AutoConfig.from_pretrained(model_dir)
    rows = make_rows(4000, vocab=1100, seed=0, prompt_share=args.prompt_share)
    steps = optimizer_steps(rows, 16_384)[: args.steps]
    rows = [rows[i] for step in steps for i in step]  # exactly the rows the steps use, in order
    steps = optimizer_steps(rows, 16_384)
    per_token = flops_per_token(config, rows)
    device = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    result = {"date": time.strftime("%Y-%m-%d"), "device": device, "commit": commit, "torch": torch.__version__,
              "shape": "qwen2.5-1.5b", "lora": LORA, "steps": len(steps), "rows": len(rows),
              "tokens_per_step": round(sum(len(r["input_ids"]) for r in rows) / len(steps)),
              "prompt_share": args.prompt_share, "flops_per_token": per_token, "peak_tflops": peak, "stacks": {}}
    for name in args.stacks:
        print(f"== {name}", flush=True)
        began = time.monotonic()
        try:
            if name == "recipe":
                measured = run_recipe(model_dir, rows, steps)
            elif name.startswith("library-"):
                _, attention, ckpt = name.split("-")
                measured = run_library(model_dir, rows, steps, attention, ckpt == "ckpt", args.pack_tokens)
            else:
                with tempfile.TemporaryDirectory(dir=work) as scratch:
                    measured = run_stage(model_dir, rows, len(steps), name.endswith("-ckpt"), args.pack_tokens,
                                         Path(scratch), variant=name.split("-")[1])
        except Exception as exc:  # one stack failing still leaves the others' figures
            measured = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
        measured["wall_seconds"] = round(time.monotonic() - began, 1)
        if measured.get("tokens_per_second") and peak:
            measured["mfu"] = round(measured["tokens_per_second"] * per_token / (peak * 1e12), 4)
        print(json.dumps({k: v for k, v in measured.items() if k != "losses"}), flush=True)
        result["stacks"][name] = measured
        gc.collect()
        torch.cuda.empty_cache()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
