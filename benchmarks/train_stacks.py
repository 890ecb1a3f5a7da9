#!/usr/bin/env python
"""Training stacks side by side, in one process, on the same rows and seed (one GPU):

- ``recipe``: the hand-written recipes' loop: rows padded to the longest of 8, sdpa, transformers' loss;
- ``library-<attention>-ckpt|nockpt``: what a user gets by switching on libraries: Liger Kernel (RoPE, RMSNorm,
  SwiGLU, fused linear cross-entropy) + padding-free packing (packs of ``--pack-tokens``) + flex or sdpa
  attention, gradient checkpointing on or off;
- ``stage-<variant>-ckpt|nockpt``: ``snaketune.train.recipe.train``, the train stage itself (the Trainer, its data
  loader, the Arrow rows), with its default speed settings (``default``) or a variant of them
  (``STAGE_VARIANTS``; also ``chunk<N>``: the fused loss's chunks of N MiB of logits, ``nooffload``: checkpointed
  layers keep their inputs on the GPU, ``nolean``: MLPs through autograd, not ``train/lean_mlp.py``), gradient
  checkpointing on or off;
- ``unsloth[-qlora]-ckpt|nockpt``: Unsloth's ``FastLanguageModel`` on the same saved model (bf16, or 4-bit for
  ``qlora``), LoRA of the same rank on every linear layer, its own kernels and its checkpointing
  (``use_gradient_checkpointing="unsloth"``) or none, fed the stage's own micro-batches as padding-free packs
  (``input_ids`` of shape (1, tokens), ``position_ids`` restarting at each row and Unsloth's ``packed_seq_lengths``:
  what its padding-free collator hands the model). Unsloth patches transformers' classes when imported, so these
  stacks run in a child process of their own; the JSON records which attention path its packed batches took.

A ``-<N>k`` suffix sets that stack's packs (or the stage's micro-batches) to N x 1024 tokens instead of
``--pack-tokens``: ``library-flex_attention-nockpt-16k``. A stack named twice is run twice, its second figures under
``<name>#2``.

Workload: a random-init Qwen2.5-1.5B shape in bf16, LoRA r16 on every linear layer, rows of lognormal length
(median 300, sigma 0.8, 16 to 2048 tokens), the first quarter of each row a prompt (label -100), about 16k real
tokens per optimizer step. Every stack trains the same ``--steps`` optimizer steps: the rows the stage's sampler
deals into each step and micro-batch (``stage_steps``; the stage stacks record theirs and say whether they match),
so each step's tokens and, at the stage's pack size, each micro-batch's are the same for all. tokens/s is the
median over steps after the first two, counting real (non-padding) tokens, prompt included; each stack also
reports every step's figure. ``--phases`` adds each step's GPU memory by phase (``PhaseMeter``).

MFU (model FLOPs utilisation) = tokens/s x FLOPs per token / peak, with FLOPs per token = 6 x N + 6 x layers x
hidden x (mean attended length), N the parameters of the dense model (embeddings excluded, head included; the
PaLM convention, which counts a LoRA run as if every weight trained and ignores recomputation), and peak the GPU's
dense bf16 rate (989 TFLOP/s for an H100 SXM).

    python benchmarks/train_stacks.py --out benchmarks/results/train_stacks_h100.json
    python benchmarks/train_stacks.py --steps 10 --stacks stage-default-nockpt stage-default-ckpt unsloth-nockpt \
        unsloth-ckpt library-flex_attention-nockpt-8k library-flex_attention-nockpt-16k --out unsloth.json
    python benchmarks/train_stacks.py --shape qwen-14b-chat --steps 6 --tokens-per-step 8192 \
        --stacks stage-qlora-nockpt unsloth-qlora-nockpt --out qlora14b.json

Unsloth's stacks need unsloth and unsloth_zoo (and trl, datasets) importable; benchmarks/issue36_call.sh runs
these in one GPU call with the wheels benchmarks/slim_wheels.py slims.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# SNAKETUNE_SCRIPTS: the stage's code from elsewhere (an earlier commit's scripts/), to compare in one call
sys.path.insert(0, os.environ.get("SNAKETUNE_SCRIPTS") or str(REPO / "scripts"))
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


class PhaseMeter:
    """Watches a model's training forwards: the tokens of each micro-batch and, with ``memory``, each step's GPU
    memory by phase without the allocator's history (which made the recompute of a compiled layer fail on an
    H100): allocated as each forward begins (weights, optimizer state, gradients), the peak within each forward,
    within each backward but the step's last, and within the last backward with the optimizer's step, in GiB
    (``torch.cuda.max_memory_allocated``, reset at each boundary; ``peak`` keeps the run's)."""

    def __init__(self, model, memory: bool):
        self.memory, self.steps, self.peak = memory, [], 0.0
        self.current = self.fresh()
        model.register_forward_pre_hook(self.forward_begins, with_kwargs=True)
        model.register_forward_hook(self.forward_ends)

    @staticmethod
    def fresh() -> dict:
        return {"tokens": [], "at_forward": [], "forward": [], "backward": []}

    def reading(self, peak: bool) -> float:
        import torch

        value = (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30
        self.peak = max(self.peak, value)
        return round(value, 3)

    @staticmethod
    def restart() -> None:
        import torch

        torch.cuda.reset_peak_memory_stats()

    def phase_ends(self, phase: str) -> None:
        self.current[phase].append(self.reading(peak=True))
        self.restart()

    def forward_begins(self, module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.current["tokens"].append(int(ids.numel()) if ids is not None else None)
        if self.memory:
            if self.current["forward"]:  # a backward ran since the last forward
                self.phase_ends("backward")
            self.current["at_forward"].append(self.reading(peak=False))
            self.restart()

    def forward_ends(self, module, args, output):
        if module.training and self.memory:
            self.phase_ends("forward")

    def step_ends(self) -> None:
        if self.memory:
            self.current["last_backward_and_optimizer"] = self.reading(peak=True)
            self.current["after_step"] = self.reading(peak=False)
            self.restart()
        else:
            self.current = {"tokens": self.current["tokens"]}
        self.steps.append(self.current)
        self.current = self.fresh()

    def report(self) -> dict:
        found = {"micro_batch_tokens": [step["tokens"] for step in self.steps]}
        if self.memory:
            found["phases_gib"] = [{k: v for k, v in step.items() if k != "tokens"} for step in self.steps]
            found["peak_memory_gib"] = round(self.peak, 3)
        return found


def trainable_parameters(model) -> dict:
    """The trainable parameters' element counts by dtype (LoRA in fp32 or in the model's dtype)."""
    counts: dict = {}
    for parameter in model.parameters():
        if parameter.requires_grad:
            counts[str(parameter.dtype)] = counts.get(str(parameter.dtype), 0) + parameter.numel()
    return counts


def train_loop(model, rows, steps, batch_of, phases: bool = False) -> dict:
    """Plain loop: each step's micro-batches (``steps``: each step a list of packs of row indices, ``batch_of`` a
    pack's rows as a batch), the loss of each weighted by its share of the step's supervised tokens (so every
    stack optimises the same per-step mean), AdamW lr 1e-4."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times, losses, tokens = [], [], []
    torch.cuda.reset_peak_memory_stats()
    meter = PhaseMeter(model, memory=phases)
    for step in steps:
        step_rows = [rows[i] for pack in step for i in pack]
        supervised = sum(sum(t != -100 for t in r["labels"][1:]) for r in step_rows)
        torch.cuda.synchronize()
        began = time.perf_counter()
        total = 0.0
        for pack in step:
            batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in batch_of([rows[i] for i in pack]).items()}
            share = int((batch["labels"][:, 1:] != -100).sum()) / supervised
            loss = model(**batch).loss * share
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        meter.step_ends()
        times.append(time.perf_counter() - began)
        losses.append(round(total, 5))
        tokens.append(sum(len(r["input_ids"]) for r in step_rows))
    speeds = [t / s for t, s in zip(tokens, times, strict=True)]
    return {"tokens_per_second": round(statistics.median(speeds[2:] or speeds), 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "losses": losses,
            "step_tokens_per_second": [round(x) for x in speeds], "trainable": trainable_parameters(model),
            **meter.report()}


def run_recipe(model_dir, rows, steps, checkpointing=True, phases: bool = False) -> dict:
    model = load_lora(model_dir, "sdpa", checkpointing)
    members = [[i for pack in step for i in pack] for step in steps]
    padded_steps = [[step[i : i + 8] for i in range(0, len(step), 8)] for step in members]
    return train_loop(model, rows, padded_steps, padded_batches, phases)


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


def repacked(steps, rows, pack_tokens: int) -> list[list[list[int]]]:
    """The same steps, each step's rows packed again into packs of at most ``pack_tokens`` (``pack_rows``)."""
    packed = []
    for step in steps:
        members = [i for pack in step for i in pack]
        packed.append([[members[j] for j in pack]
                       for pack in pack_rows([len(rows[i]["input_ids"]) for i in members], pack_tokens, seed=0)])
    return packed


def stage_steps(rows, pack_tokens: int, tokens_per_step: int) -> tuple[int, int, list[list[list[int]]]]:
    """How the train stage deals ``rows`` into micro-batches, as ``run_stage`` sets it up: rows a micro-batch (about
    ``pack_tokens`` tokens of mean rows), micro-batches a step (about ``tokens_per_step``), and the steps its
    sampler (``train.data.step_packs_sampler``, the run's seed) makes, each a list of packs of row indices. Every
    other stack trains on these steps, at the stage's pack size on these very packs."""
    import types

    import numpy as np

    from snaketune.settings import TrainSettings
    from snaketune.train.data import step_packs_sampler

    mean_row = sum(len(r["input_ids"]) for r in rows) / len(rows)
    per_device = max(1, round(pack_tokens / mean_row))
    accumulation = max(1, round(tokens_per_step / (per_device * mean_row)))
    lengths = types.SimpleNamespace(lengths=np.array([len(r["input_ids"]) for r in rows]))
    arguments = types.SimpleNamespace(world_size=1, gradient_accumulation_steps=accumulation,
                                      per_device_train_batch_size=per_device, process_index=0,
                                      data_seed=TrainSettings.__dataclass_fields__["seed"].default,
                                      dataloader_drop_last=False)
    packs = list(step_packs_sampler(lengths, arguments))
    steps = [packs[i : i + accumulation] for i in range(0, len(packs) - accumulation + 1, accumulation)]
    return per_device, accumulation, steps


def run_library(model_dir, rows, steps, attention: str, checkpointing: bool, phases: bool = False) -> dict:
    from snaketune.train.packing import flatten_rows

    model = load_lora(model_dir, attention, checkpointing, liger=True)
    return train_loop(model, rows, steps, lambda pack: {k: v for k, v in flatten_rows(pack).items()
                                                        if k != "use_cache"}, phases)


UNSLOTH_ENVIRONMENT = {"UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                       "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache"}
ATTENTION_PATHS = ("_torch_varlen_packed", "_sdpa_packed_segments", "build_sdpa_packed_attention_mask",
                   "xformers_attention", "flash_attn_varlen_func", "flash_attn_func")


def count_attention_paths() -> dict:
    """Wrap the functions of Unsloth's attention dispatch that each attention path calls, counting calls."""
    from unsloth.utils import attention_dispatch as dispatch

    counts = {}
    for name in ATTENTION_PATHS:
        original = getattr(dispatch, name, None)
        if not callable(original):
            continue
        counts[name] = 0

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dispatch, name, counted)
    return counts


def unsloth_backends() -> dict:
    from unsloth.utils import attention_dispatch as dispatch

    return {"has_flash_attention": bool(getattr(dispatch, "HAS_FLASH_ATTENTION", None)),
            "has_xformers": bool(getattr(dispatch, "HAS_XFORMERS", None)),
            "torch_varlen_attn": getattr(dispatch, "_TORCH_VARLEN_ATTN", None) is not None,
            "sdpa_packed_segments": bool(getattr(dispatch, "_SDPA_PACKED_SEGMENTS", None)),
            "native_beats_xformers": bool(getattr(dispatch, "_NATIVE_BEATS_XFORMERS", None))}


def run_unsloth(model_dir, rows, steps, checkpointing: bool, qlora: bool = False, phases: bool = False) -> dict:
    """Unsloth's FastLanguageModel, LoRA r16 on every linear layer, fed padding-free packs of the same steps."""
    import torch
    import unsloth  # noqa: F401  (first: it patches transformers and peft)
    from unsloth import FastLanguageModel

    from snaketune.train.packing import flatten_rows

    counts = count_attention_paths()
    longest = max(sum(len(rows[i]["input_ids"]) for i in pack) for step in steps for pack in step)
    torch.manual_seed(0)
    checkpointing_mode = "unsloth" if checkpointing else False  # "unsloth": its own (activations offloaded)
    model, _ = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=max(4096, longest),
                                                 dtype=torch.bfloat16, load_in_4bit=qlora, full_finetuning=False,
                                                 use_gradient_checkpointing=checkpointing_mode)
    torch.manual_seed(0)
    model = FastLanguageModel.get_peft_model(
        model, r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"], bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing=checkpointing_mode, random_state=0)

    def batch_of(packed):
        flat = flatten_rows(packed)
        return {"input_ids": flat["input_ids"], "labels": flat["labels"], "position_ids": flat["position_ids"],
                "packed_seq_lengths": torch.tensor([len(r["input_ids"]) for r in packed], dtype=torch.int32)}

    measured = train_loop(model, rows, steps, batch_of, phases)
    measured["attention_calls"] = dict(counts)
    measured["attention_backends"] = unsloth_backends()
    measured["unsloth"] = unsloth.__version__
    del model
    return measured


def run_children(stacks: list[str], args, work: Path) -> dict:
    """Unsloth's stacks, in one child process (Unsloth patches transformers for the whole process)."""
    out = work / "unsloth-stacks.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--stacks", *stacks, "--out", str(out),
               "--steps", str(args.steps), "--pack-tokens", str(args.pack_tokens), "--prompt-share",
               str(args.prompt_share), "--work", str(work), "--shape", args.shape, "--tokens-per-step",
               str(args.tokens_per_step), *(["--phases"] if args.phases else [])]
    completed = subprocess.run(command, env={**os.environ, **UNSLOTH_ENVIRONMENT})
    stacks_measured = json.loads(out.read_text())["stacks"] if out.is_file() else {}
    for name in stacks:
        stacks_measured.setdefault(name, {"error": f"child process exited {completed.returncode}"})
    return stacks_measured


def pack_size(name: str, default: int) -> int:
    """The ``-<N>k`` suffix of a stack's name in tokens, else ``default``."""
    last = name.rsplit("-", 1)[-1]
    return int(last[:-1]) * 1024 if last.endswith("k") and last[:-1].isdigit() else default


STAGE_VARIANTS = {"default": {}, "nocompile": {"torch_compile": False, "liger_kernels": False},
                  "liger": {"torch_compile": False, "liger_kernels": True}, "chunked": {"fused_loss": "chunked"},
                  # QLoRA through the stage: its default (compiled layers), and as it was before (Liger, eager);
                  # run qlora before qloraliger, as Liger patches transformers' classes for the whole process
                  "qlora": {"method": "qlora"}, "qloraliger": {"method": "qlora", "torch_compile": False}}


def run_stage(model_dir, rows, n_steps, checkpointing: bool, pack_tokens: int, work: Path, variant: str,
              tokens_per_step: int = 16_384, phases: bool = False) -> dict:
    """The train stage's function itself, default speed settings, on the same rows written as a parquet split.
    Records the tokens of each micro-batch it trained on (and says whether they are ``stage_steps``'), what
    torch.compile counted (graphs, graph breaks, recompiles) and, with ``phases``, memory by phase."""
    import pandas as pd
    import torch
    from torch._dynamo.utils import counters
    from transformers import TrainerCallback

    from snaketune.settings import TrainSettings
    from snaketune.train import fused_loss, recipe
    from snaketune.train.recipe import TrainFiles, train

    # chunk<N>: the fused loss's chunks hold at most N MiB of fp32 logits (chunk1: 64 rows, the former rule here)
    fused_loss.CHUNK_LOGITS_BYTES = int(variant[5:]) * 2**20 if variant.startswith("chunk") else \
        128 * 2**20

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(data / "train.parquet")
    pd.DataFrame(rows[:2]).to_parquet(data / "eval.parquet")
    per_device, accumulation, expected = stage_steps(rows, pack_tokens, tokens_per_step)
    run = work / f"stage-{checkpointing}"
    files = TrainFiles(train=data / "train.parquet", eval=data / "eval.parquet", stats=None,
                       adapter=run / "adapter", train_log=run / "train_log.csv", summary=run / "summary.json",
                       curve=run / "loss.png", checkpoints=run / "checkpoints")
    settings = TrainSettings(**{
        "method": "lora", "lora_rank": LORA["r"], "lora_alpha": LORA["lora_alpha"], "lora_dropout": 0.0,
        "learning_rate": 1e-4, "max_steps": n_steps, "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation, "logging_steps": 1, "save_steps": 10_000,
        "lr_scheduler_type": "constant", "precision": "bf16", "gradient_checkpointing": checkpointing,
        **STAGE_VARIANTS.get(variant, {})})

    class Watch(TrainerCallback):
        meter = trainable = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.meter, self.trainable = PhaseMeter(model, memory=phases), trainable_parameters(model)

        def on_step_end(self, args, state, control, **kwargs):
            self.meter.step_ends()

    watch = Watch()
    torch.cuda.reset_peak_memory_stats()
    counters.clear()
    make_callbacks = recipe.make_callbacks
    # nooffload: checkpointed layers keep their inputs on the GPU (the stage before train/offload.py); nolean:
    # the MLPs run through autograd (before train/lean_mlp.py)
    switched_off = {"nooffload": {"offload_checkpoints": False}, "nolean": {"lean_mlps": False}}.get(variant, {})
    recipe.make_callbacks = lambda **kwargs: (*make_callbacks(**{**kwargs, **switched_off}), watch)
    try:
        summary = train(settings, model_dir, False, files, run_name="stage-default")
    finally:
        recipe.make_callbacks = make_callbacks
    log = pd.read_csv(files.train_log)
    speeds = log["tokens_per_second"].dropna().tolist()
    seen = watch.meter.report()
    planned = [[sum(len(rows[i]["input_ids"]) for i in pack) for pack in step] for step in expected[:n_steps]]
    return {"tokens_per_second": round(statistics.median(speeds[2:] or speeds), 1),
            "peak_memory_gib": summary.get("peak_memory_gib"), "losses": [round(x, 5) for x in log["loss"]],
            "step_tokens_per_second": [round(x) for x in speeds], "speedups": summary["speedups"],
            "per_device_train_batch_size": per_device, "gradient_accumulation_steps": accumulation,
            "trainable": watch.trainable, **seen, "micro_batches_as_stage_steps": seen["micro_batch_tokens"] == planned,
            "dynamo": {group: {str(key)[:160]: value for key, value in values.items()}
                       for group, values in counters.items() if values}}


def repeat_key(name: str, done: dict) -> str:
    """The key of a stack's figures: its name, or ``name#2``, ``name#3`` ... when named again in ``--stacks``
    (the same stack first and last in one call shows how far the GPU's speed drifted between them)."""
    key, count = name, 1
    while key in done:
        count += 1
        key = f"{name}#{count}"
    return key


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
    parser.add_argument("--shape", default="qwen2.5-1.5b", help="a shape of train_gpu.SHAPES")
    parser.add_argument("--tokens-per-step", type=int, default=16_384)
    parser.add_argument("--phases", action="store_true", help="each step's GPU memory by phase (PhaseMeter)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # Unsloth's stacks, in a child
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    if args.child:  # Unsloth wants to be imported before transformers and peft
        import unsloth  # noqa: F401
    import torch
    from train_gpu import SHAPES, build_model
    from transformers import AutoConfig

    if args.shape not in SHAPES:
        parser.error(f"--shape: one of {sorted(SHAPES)}")
    work = Path(args.work)
    model_dir = build_model(args.shape, work / f"model-{args.shape}").parent
    config = AutoConfig.from_pretrained(model_dir)
    rows = make_rows(4000, vocab=1100, seed=0, prompt_share=args.prompt_share)
    chosen = optimizer_steps(rows, args.tokens_per_step)[: args.steps]
    rows = [rows[i] for step in chosen for i in step]  # the rows of --steps steps of about --tokens-per-step
    steps = stage_steps(rows, args.pack_tokens, args.tokens_per_step)[2][: args.steps]  # as the stage deals them
    per_token = flops_per_token(config, rows)
    device = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    result = {"date": time.strftime("%Y-%m-%d"), "device": device, "commit": commit, "torch": torch.__version__,
              "shape": args.shape, "lora": LORA, "steps": len(steps), "rows": len(rows),
              "tokens_per_step": round(sum(len(rows[i]["input_ids"]) for step in steps for pack in step
                                           for i in pack) / len(steps)),
              "prompt_share": args.prompt_share, "flops_per_token": per_token, "peak_tflops": peak, "stacks": {}}
    pending = list(args.stacks)
    while pending:
        name = pending.pop(0)
        if name.startswith("unsloth") and not args.child:  # this and the next Unsloth stacks, in one child
            group = [name]
            while pending and pending[0].startswith("unsloth"):
                group.append(pending.pop(0))
            print(f"== {' '.join(group)} (child process)", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            for child_name, measured in run_children(group, args, work).items():
                if measured.get("tokens_per_second") and peak:
                    measured["mfu"] = round(measured["tokens_per_second"] * per_token / (peak * 1e12), 4)
                result["stacks"][child_name] = measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
            continue
        print(f"== {name}", flush=True)
        began = time.monotonic()
        tokens = pack_size(name, args.pack_tokens)
        parts = name.split("-")
        try:
            packs = steps if tokens == args.pack_tokens else repacked(steps, rows, tokens)
            if name == "recipe":
                measured = run_recipe(model_dir, rows, steps, phases=args.phases)
            elif name.startswith("library-"):
                measured = run_library(model_dir, rows, packs, parts[1], parts[2] == "ckpt", args.phases)
            elif name.startswith("unsloth"):
                measured = run_unsloth(model_dir, rows, packs, "ckpt" in parts, "qlora" in parts, args.phases)
            else:
                with tempfile.TemporaryDirectory(dir=work) as scratch:
                    measured = run_stage(model_dir, rows, len(steps), parts[2] == "ckpt", tokens, Path(scratch),
                                         variant=parts[1], tokens_per_step=args.tokens_per_step,
                                         phases=args.phases)
        except Exception as exc:  # one stack failing still leaves the others' figures
            import traceback

            traceback.print_exc()
            measured = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
        measured["pack_tokens"] = tokens
        measured["wall_seconds"] = round(time.monotonic() - began, 1)
        if measured.get("tokens_per_second") and peak:
            measured["mfu"] = round(measured["tokens_per_second"] * per_token / (peak * 1e12), 4)
        print(json.dumps({k: v for k, v in measured.items() if k != "losses"}), flush=True)
        result["stacks"][repeat_key(name, result["stacks"])] = measured
        gc.collect()
        torch.cuda.empty_cache()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
