"""Merge stage: fold a LoRA adapter into its base and save a standalone Hugging Face model folder.

The merged folder must load with ``AutoModelForCausalLM``/``AutoTokenizer`` alone, so the tokenizer files,
chat template and generation config are saved with it, and a logits check against base+adapter guards the merge.

By default the merged weights keep the base model's dtype (bf16 for every classic recipe: a 14B model is a
28 GB folder, not 56 GB), and the merge holds one copy of the model in that dtype: the adapter is folded into
the loaded base in place, and the saved shards are checked by reading them back tensor by tensor instead of
loading a second model.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from snaketune.io import atomic_dir, process_status, safetensors_problem

CHECK_PROMPTS = ["Hello, who are you?", "你好，请介绍一下你自己。", "1 2 3 4 5"]


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class MergeSettings:
    dtype: str = "auto"  # dtype of the merged weights; auto: the base model's own (its config's torch_dtype)
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


def anonymous_memory_mib() -> float | None:
    """This process's anonymous resident memory (Linux), in MiB: the weights it holds as its own.

    Weights read from safetensors are memory-mapped; until changed they are page cache the kernel can drop, so
    plain RSS would count the base's file on top of the model.
    """
    found = process_status("RssAnon")  # in kB
    return int(found) / 1024 if found is not None else None


def base_dtype(model_dir: Path, wanted: str):
    """The torch dtype to merge and save in: ``wanted``, or for ``auto`` the dtype the base was saved in."""
    import torch

    if wanted != "auto":
        return getattr(torch, wanted)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return getattr(torch, name) if name in DTYPES else torch.float32


def check_saved(model, folder: Path) -> None:
    """Every tensor of ``model`` is in the saved shards, equal, read back one at a time (no second model)."""
    import torch
    from safetensors import safe_open

    expected = model.state_dict()
    found = set()
    for shard in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(shard)
        if problem:
            raise RuntimeError(f"{shard}: {problem}")
        with safe_open(shard, "pt") as weights:
            for key in weights.keys():
                found.add(key)
                if key in expected and not torch.equal(weights.get_tensor(key), expected[key].cpu()):
                    raise RuntimeError(f"{shard}: `{key}` differs from the merged model")
    tied = {key for key in expected if key.endswith("lm_head.weight")} if getattr(
        model.config, "tie_word_embeddings", False) else set()
    missing = set(expected) - found - tied
    if missing:
        raise RuntimeError(f"{folder}: merged tensors missing from the saved shards: {sorted(missing)[:5]}")


def merge(settings: MergeSettings, model_dir: Path, trust_remote_code: bool, adapter_dir: Path, out: Path) -> float:
    """Merge ``adapter_dir`` into the base at ``model_dir`` and save to ``out``; return the logits difference.

    The base is loaded from its own full-precision files, also for QLoRA: merging into 4-bit weights would round
    the update away. A folder without ``adapter_config.json`` holds full fine-tuned weights and is linked as is.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if not (adapter_dir / "adapter_config.json").is_file():
        link_full_model(adapter_dir, out)
        return 0.0
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
    start_memory = anonymous_memory_mib()
    dtype = base_dtype(model_dir, settings.dtype)
    base = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code, dtype=dtype)
    adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
    reference = prompt_logits(adapted, tokenizer)
    merged = adapted.merge_and_unload().eval()
    print(f"merged in {dtype} (base: {base_dtype(model_dir, 'auto')})", file=sys.stderr)
    difference = max_difference(prompt_logits(merged, tokenizer), reference)
    # bf16/fp16 storage rounds every merged weight (relative error ~2^-8), and the rounding adds up over the
    # layers: in half precision the tolerance is 2% of the largest logit (a wrong merge is off by the update)
    scale = max(logits.abs().max().item() for logits in reference)
    tolerance = settings.tolerance if dtype == torch.float32 else max(settings.tolerance, 0.02 * scale)
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
        check_saved(merged, staging)
        if start_memory is not None:
            print(f"memory held by the merge: {anonymous_memory_mib() - start_memory:.0f} MiB (weights saved: "
                  f"{sum(p.stat().st_size for p in staging.glob('*.safetensors')) / 2**20:.0f} MiB)",
                  file=sys.stderr)
    return difference
