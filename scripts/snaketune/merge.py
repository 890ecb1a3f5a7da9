"""Merge stage: fold a LoRA adapter into its base and save a standalone Hugging Face model folder.

The merged folder must load with ``AutoModelForCausalLM``/``AutoTokenizer`` alone (a vision-language model's
with ``AutoModelForImageTextToText`` and its processor), so the tokenizer files, chat template, generation config
and processor configs are saved with it, and a logits check against base+adapter guards the merge.

By default the merged weights keep the base model's dtype (bf16 for every classic recipe: a 14B model is a
28 GB folder, not 56 GB). A plain LoRA adapter over a safetensors base is merged shard by shard, straight from
the base's files: each shard is read, its adapted weights get ``scaling * B @ A`` added in float32, and it is
written in the output dtype before the next shard is read, so the merge holds one shard at a time. The logits
check then loads base+adapter and the saved folder one after the other: at most one copy of the model is held.
Adapters the shard path does not cover (DoRA, per-module ranks, tied embeddings that were adapted, a base
without safetensors) are folded into the loaded base in place, which also holds one copy.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from snaketune.io import atomic_dir, process_status, safetensors_problem
from snaketune.settings import MergeSettings

CHECK_PROMPTS = ["Hello, who are you?", "你好，请介绍一下你自己。", "1 2 3 4 5"]


DTYPES = ("auto", "float32", "bfloat16", "float16")


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


def release_memory(setup: bool = False) -> None:
    """Hand freed memory back to the OS. glibc serves blocks of a few MB (one weight matrix) from its heap once
    its mmap threshold has grown, and keeps them after they are freed: the previous shard would stay resident.
    ``setup`` pins the threshold at 1 MiB, so every tensor of the merge gets its own mapping, unmapped when freed."""
    import ctypes
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        if setup:
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def base_dtype(model_dir: Path, wanted: str):
    """The torch dtype to merge and save in: ``wanted``, or for ``auto`` the dtype the base was saved in."""
    import torch

    if wanted != "auto":
        return getattr(torch, wanted)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return getattr(torch, name) if name in DTYPES else torch.float32


PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def base_shards(model_dir: Path) -> list[str]:
    """The base's safetensors files, in the order its index names them (or its single file); [] if it has none."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    return ["model.safetensors"] if (model_dir / "model.safetensors").is_file() else []


def shard_plan(model_dir: Path, adapter_dir: Path) -> tuple[dict, dict, float] | str:
    """How to merge shard by shard: ``(updates, replacements, scaling)`` keyed by the base's tensor names, where
    ``updates[name] = (A, B)`` and ``replacements[name]`` is a module trained in full (``modules_to_save``); or the
    reason this adapter needs the in-memory merge."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    unusual = {key: config.get(key) for key in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
               "lora_bias", "trainable_token_indices", "layer_replication", "target_parameters") if config.get(key)}
    if config.get("peft_type") != "LORA" or unusual:
        return f"adapter settings {unusual or config.get('peft_type')}"
    shards = base_shards(model_dir)
    if not shards or not (adapter_dir / "adapter_model.safetensors").is_file():
        return "base or adapter not in safetensors"
    shapes = {}
    for shard in shards:
        with safe_open(model_dir / shard, "pt") as weights:
            shapes.update({key: weights.get_slice(key).get_shape() for key in weights.keys()})
    updates, replacements = {}, {}
    for key, tensor in load_file(adapter_dir / "adapter_model.safetensors").items():
        if not key.startswith(PREFIX):
            return f"adapter tensor `{key}`"
        name = key[len(PREFIX):]
        for suffix in LORA_SUFFIXES:
            if name.endswith(suffix):
                target = name[: -len(suffix)] + ".weight"
                updates.setdefault(target, [None, None])["AB".index(suffix[6])] = tensor
                break
        else:
            replacements[name] = tensor
    for name, pair in updates.items():
        if None in pair or name not in shapes or list(shapes[name]) != [pair[1].shape[0], pair[0].shape[1]]:
            return f"`{name}` has no matching weight in the base's files"
    for name, tensor in replacements.items():
        if name not in shapes or list(shapes[name]) != list(tensor.shape):
            return f"`{name}` has no matching weight in the base's files"
    base_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    touched = {name.rsplit(".", 2)[-2] for name in (*updates, *replacements)}
    if base_config.get("tie_word_embeddings") and touched & {"lm_head", "embed_tokens", "wte", "output"}:
        return "tied embeddings that the adapter changes"
    rank = config["r"]
    scaling = config["lora_alpha"] / (rank ** 0.5 if config.get("use_rslora") else rank)
    return updates, replacements, scaling


def merge_shards(model_dir: Path, plan: tuple[dict, dict, float], dtype, out: Path, memory: list[float]) -> None:
    """Write every shard of the base into ``out`` with the adapter folded in, in ``dtype``, one shard at a time."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    updates, replacements, scaling = plan
    for shard in tqdm(base_shards(model_dir), desc="merge shards", unit="shard"):
        merged = {}
        with safe_open(model_dir / shard, "pt") as weights:
            for key in weights.keys():
                tensor = replacements.get(key)
                if tensor is None:
                    tensor = weights.get_tensor(key)
                if key in updates:
                    lora_a, lora_b = updates[key]
                    tensor = tensor.float() + scaling * (lora_b.float() @ lora_a.float())
                merged[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        save_file(merged, out / shard, metadata={"format": "pt"})
        memory.append(anonymous_memory_mib() or 0.0)
        del merged
        release_memory()
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shutil.copy2(index, out / index.name)  # same tensors in the same files: the base's index holds
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    config.update({key: name for key in ("dtype", "torch_dtype") if key in config} or {"dtype": name})
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_weights(adapted, folder: Path, dtype) -> int:
    """Every weight the adapter changes, as saved in ``folder``, equals the base weight plus the delta that peft
    itself computes (``get_delta_weight``: its keys, scaling and A/B order, not ours), rounded to ``dtype``; and the
    saved shards hold every tensor of the model. Returns the number of adapted weights checked."""
    import torch
    from safetensors import safe_open

    saved = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as weights:
            saved.update({key: shard for key in weights.keys()})
    def plain(key: str) -> str:
        return key.removeprefix(PREFIX).replace(".base_layer.", ".").replace(".original_module.", ".")

    # A tied weight (the output head that is the input embedding) is saved once, under one of its names.
    storage = {plain(key): tensor.data_ptr() for key, tensor in adapted.state_dict().items()
               if "lora_" not in key and ".modules_to_save." not in key}
    stored = {storage[key] for key in saved if key in storage}
    missing = sorted(key for key in storage if key not in saved and storage[key] not in stored)
    if missing:
        raise RuntimeError(f"{folder}: tensors missing from the merged shards: {missing[:5]}")
    checked = 0
    for name, module in adapted.named_modules():
        if not (hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})):
            continue
        key = name.removeprefix(PREFIX) + ".weight"
        with torch.no_grad():
            expected = (module.base_layer.weight.float() + module.get_delta_weight("default").float()).to(dtype)
        with safe_open(saved[key], "pt") as weights:
            found = weights.get_tensor(key)
        if found.dtype != dtype or not torch.allclose(found.float(), expected.float(), rtol=2**-7, atol=1e-6):
            raise RuntimeError(f"`{key}`: the merged weight is not base + the adapter's delta: the merge is wrong")
        checked += 1
    return checked


def merge(settings: MergeSettings, model_dir: Path, trust_remote_code: bool, adapter_dir: Path, out: Path) -> float:
    """Merge ``adapter_dir`` into the base at ``model_dir`` and save to ``out``; return the logits difference
    between the saved folder, loaded back, and base+adapter.

    The base is read from its own full-precision files, also for QLoRA: merging into 4-bit weights would round
    the update away. A folder without ``adapter_config.json`` holds full fine-tuned weights and is linked as is.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig

    from snaketune.vision import copy_processor_files, family_of

    auto_class = AutoModelForImageTextToText if family_of(model_dir) else AutoModelForCausalLM
    if not (adapter_dir / "adapter_config.json").is_file():
        link_full_model(adapter_dir, out)
        return 0.0
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
    release_memory(setup=True)
    start_memory, memory = anonymous_memory_mib(), []
    dtype = base_dtype(model_dir, settings.dtype)
    plan = shard_plan(model_dir, adapter_dir)

    def adapted_model():
        base = auto_class.from_pretrained(model_dir, trust_remote_code=trust_remote_code, dtype=dtype)
        return PeftModel.from_pretrained(base, adapter_dir).eval()

    with atomic_dir(out) as staging:
        if isinstance(plan, str):
            print(f"merging in memory ({plan} rules out the shard-by-shard merge)", file=sys.stderr)
            adapted = adapted_model()
            reference = prompt_logits(adapted, tokenizer)
            adapted.merge_and_unload().save_pretrained(staging, max_shard_size=settings.max_shard_size)
        else:
            print(f"merging shard by shard: {len(plan[0])} adapted weights, {len(plan[1])} replaced",
                  file=sys.stderr)
            merge_shards(model_dir, plan, dtype, staging, memory)
            adapted = adapted_model()
            reference = prompt_logits(adapted, tokenizer)
            checked = check_weights(adapted, staging, dtype)
            print(f"{checked} merged weights equal base + peft's own delta, rounded to {dtype}", file=sys.stderr)
        memory.append(anonymous_memory_mib() or 0.0)
        del adapted
        release_memory()
        print(f"merged in {dtype} (base: {base_dtype(model_dir, 'auto')})", file=sys.stderr)
        tokenizer.save_pretrained(staging)
        copy_processor_files(model_dir, staging)
        copy_remote_code(model_dir, staging)
        try:
            GenerationConfig.from_pretrained(model_dir).save_pretrained(staging)
        except OSError:
            print("base model has no generation_config.json; the merged model uses transformers' defaults",
                  file=sys.stderr)
        for shard in sorted(staging.glob("*.safetensors")):
            problem = safetensors_problem(shard)
            if problem:
                raise RuntimeError(f"{shard}: {problem}")
        # the check reads the folder as a user will: every tensor missing or wrong shows in the logits
        merged = auto_class.from_pretrained(staging, trust_remote_code=trust_remote_code, dtype=dtype)
        difference = max_difference(prompt_logits(merged.eval(), tokenizer), reference)
        memory.append(anonymous_memory_mib() or 0.0)
        del merged
        # In half precision every merged weight is rounded (relative error ~2^-8) and over a deep model that moves
        # the logits by more than any fixed tolerance (0.5 on a random 14B model): there the weight check above is
        # the proof, and the in-memory path allows 2% of the largest logit (a wrong merge is off by the update).
        scale = max(logits.abs().max().item() for logits in reference)
        if dtype == torch.float32:
            tolerance = settings.tolerance
        elif isinstance(plan, str):
            tolerance = max(settings.tolerance, 0.02 * scale)
        else:
            tolerance = float("inf")
        check_close("merged vs base+adapter", difference, tolerance)
        if start_memory is not None:
            print(f"memory held by the merge: {max(memory) - start_memory:.0f} MiB at most (weights saved: "
                  f"{sum(p.stat().st_size for p in staging.glob('*.safetensors')) / 2**20:.0f} MiB)",
                  file=sys.stderr)
    return difference
