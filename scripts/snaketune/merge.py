"""Merge stage: fold a LoRA adapter into its base and save a standalone Hugging Face model folder.

The merged folder must load with ``AutoModelForCausalLM``/``AutoTokenizer`` alone, so the tokenizer files,
chat template and generation config are saved with it, and a logits check against base+adapter guards the merge.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from snaketune.io import atomic_dir

CHECK_PROMPTS = ["Hello, who are you?", "你好，请介绍一下你自己。", "1 2 3 4 5"]


@dataclass
class MergeSettings:
    dtype: str = "float32"  # dtype of the saved weights; the merge itself runs in float32
    max_shard_size: str = "2GB"
    tolerance: float = 1e-3  # max abs logit difference allowed between merged and base+adapter (float32)


def prompt_logits(model, tokenizer) -> list:
    """Logits of the check prompts, computed in float32 without gradients."""
    import torch

    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits.float() for p in CHECK_PROMPTS]


def max_difference(logits_a: list, logits_b: list) -> float:
    return max((a - b).abs().max().item() for a, b in zip(logits_a, logits_b, strict=True))


def check_close(name: str, difference: float, tolerance: float) -> None:
    print(f"max |logits({name})| difference = {difference:.3g}", file=sys.stderr)
    if difference > tolerance:
        raise RuntimeError(f"{name}: max logit difference {difference:.3g} > {tolerance}: the merge is wrong")


def link_full_model(trained: Path, out: Path) -> None:
    """A full fine-tune is already the model: link its files into ``out`` (copy across filesystems)."""
    with atomic_dir(out) as staging:
        for path in trained.iterdir():
            if path.is_file() and path.name not in ("training_args.bin", "train_summary.json"):
                try:
                    os.link(path, staging / path.name)
                except OSError:
                    shutil.copy2(path, staging / path.name)


def copy_remote_code(model_dir: Path, out: Path) -> list[str]:
    """Copy the Python files a remote-code base needs (its config names them in ``auto_map``) into ``out``,
    so the folder loads with ``trust_remote_code=True`` like the base did; returns the names copied."""
    config_path = model_dir / "config.json"
    if not config_path.is_file() or "auto_map" not in json.loads(config_path.read_text(encoding="utf-8")):
        return []
    copied = []
    for source in sorted(model_dir.glob("*.py")):
        if not (out / source.name).exists():
            shutil.copy2(source, out / source.name)
            copied.append(source.name)
    return copied


def merge(settings: MergeSettings, model_dir: Path, trust_remote_code: bool, adapter_dir: Path, out: Path) -> float:
    """Merge ``adapter_dir`` into the base at ``model_dir`` and save to ``out``; return the logits difference.

    The base is loaded in full precision, also for QLoRA: merging into 4-bit weights would round the update away.
    A folder without ``adapter_config.json`` holds full fine-tuned weights and is linked as it is.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if not (adapter_dir / "adapter_config.json").is_file():
        link_full_model(adapter_dir, out)
        return 0.0
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
    base = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
    reference = prompt_logits(adapted, tokenizer)
    merged = adapted.merge_and_unload().eval().to(getattr(torch, settings.dtype))
    difference = max_difference(prompt_logits(merged, tokenizer), reference)
    # bf16/fp16 storage rounds the weights; the tolerance is for float32, so scale it for half precision
    tolerance = settings.tolerance if settings.dtype == "float32" else max(settings.tolerance, 5e-2)
    check_close("merged vs base+adapter", difference, tolerance)
    with atomic_dir(out) as staging:
        merged.save_pretrained(staging, max_shard_size=settings.max_shard_size)
        tokenizer.save_pretrained(staging)
        copy_remote_code(model_dir, staging)
        try:
            GenerationConfig.from_pretrained(model_dir).save_pretrained(staging)
        except OSError:
            print("base model has no generation_config.json; the merged model uses transformers' defaults",
                  file=sys.stderr)
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype="auto").eval()
        check_close("reloaded vs merged", max_difference(prompt_logits(reloaded, tokenizer),
                                                         prompt_logits(merged, tokenizer)), 1e-6)
    return difference
