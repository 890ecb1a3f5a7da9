#!/usr/bin/env python
"""GPU training benchmark: random-init models of real shapes, trained through scripts/train.py exactly as the
train rule runs it (same CLI, same settings JSON, torchrun for DeepSpeed).

For each case it builds the model folder once (real config dimensions, random bf16 weights, the project's small
BPE tokenizer: token ids stay below its vocabulary, which is all a throughput and memory benchmark needs),
writes a dataset of full-length rows (every token supervised, so tokens/s counts real tokens only), trains,
and records tokens/s, peak allocated GPU memory and the loss of every step.

Example (one H100; about 6 minutes for the small cases, 6 more for qlora-14b):
    python benchmarks/train_gpu.py --cases lora-0.5b qlora-0.5b lora-1.5b qlora-1.5b zero3-1.5b \\
        zero3-offload-1.5b zero3-resume-1.5b --out benchmarks/results/train_gpu_small.json
    python benchmarks/train_gpu.py --cases qlora-14b --out benchmarks/results/train_gpu_qlora14b.json

Two GPUs of one host (the issue "Full fine-tune with ZeRO-3 across two GPUs"; not yet run, no such machine was
lent): Baichuan2-7B's shape, full fine-tune, bf16, gradient checkpointing, sequence 2048, 20 steps each:
    python benchmarks/train_gpu.py --seq-len 2048 --steps 20 --cases zero2-7b-2gpu zero3-7b-2gpu \
        zero3-offload-7b-2gpu zero3-resume-7b-2gpu --out benchmarks/results/train_multi_gpu.json
Acceptance: ZeRO-3's per-GPU peak <= 0.6 x ZeRO-2's; the first 20 losses of both agree within 2% on average;
the resumed run ends at step 20 with its final loss within 1% of zero3-7b-2gpu's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

# Real config dimensions. Qwen-14B-Chat is given in the native Qwen2 layout its conversion produces.
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
    # Baichuan2-7B-Chat in the Llama layout its conversion produces (W_pack split into q/k/v, NormHead folded)
    "baichuan2-7b": dict(architecture="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=125696,
                         tie_word_embeddings=False, rope_theta=1e4),
    "qwen-14b-chat": dict(hidden_size=5120, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=40,
                          num_key_value_heads=40, vocab_size=152064, tie_word_embeddings=False, rope_theta=1e4),
}
LORA = {"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 1e-4}
FULL = {"learning_rate": 1e-5}
CASES = {
    "lora-0.5b": ("qwen2.5-0.5b", {"method": "lora", **LORA}),
    "qlora-0.5b": ("qwen2.5-0.5b", {"method": "qlora", **LORA}),
    "lora-1.5b": ("qwen2.5-1.5b", {"method": "lora", **LORA}),
    "qlora-1.5b": ("qwen2.5-1.5b", {"method": "qlora", **LORA}),
    "zero3-1.5b": ("qwen2.5-1.5b", {"method": "full", "deepspeed": "zero3", **FULL}),
    "zero3-offload-1.5b": ("qwen2.5-1.5b", {"method": "full", "deepspeed": "zero3_offload", **FULL}),
    "zero3-resume-1.5b": ("qwen2.5-1.5b", {"method": "full", "deepspeed": "zero3", **FULL}),
    "qlora-14b": ("qwen-14b-chat", {"method": "qlora", **LORA}),
    # two GPUs of one host, as the Baichuan2 recipe (deepspeed --num_gpus=2); run with --seq-len 2048
    "zero2-7b-2gpu": ("baichuan2-7b", {"method": "full", "deepspeed": "zero2", "gpus": 2, **FULL}),
    "zero3-7b-2gpu": ("baichuan2-7b", {"method": "full", "deepspeed": "zero3", "gpus": 2, **FULL}),
    "zero3-offload-7b-2gpu": ("baichuan2-7b", {"method": "full", "deepspeed": "zero3_offload", "gpus": 2, **FULL}),
    "zero3-resume-7b-2gpu": ("baichuan2-7b", {"method": "full", "deepspeed": "zero3", "gpus": 2, **FULL}),
}


def build_model(shape: str, folder: Path) -> Path:
    """A random-init Qwen2 model of ``shape`` with the project's tokenizer; returns its manifest."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from snaketune.download import build_tokenizer

    manifest = folder / "manifest.json"
    if manifest.is_file():
        return manifest
    tokenizer = build_tokenizer([str(REPO / "data" / "identity.jsonl"), str(REPO / "data" / "text_matching.json")],
                                vocab_size=2048)
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    dims = dict(SHAPES[shape])
    config_class = LlamaConfig if dims.pop("architecture", "qwen2") == "llama" else Qwen2Config
    config = config_class(**dims, max_position_embeddings=8192, rms_norm_eps=1e-6, eos_token_id=eos,
                         pad_token_id=pad, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    manifest.write_text(json.dumps({"source": "builtin", "path": str(folder), "trust_remote_code": False}))
    return manifest


def build_dataset(folder: Path, rows: int, length: int, vocab: int) -> Path:
    import numpy as np
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", rows), ("eval", 2)):
        ids = [rng.integers(3, vocab, size=length).tolist() for _ in range(n)]
        pd.DataFrame({"input_ids": ids, "labels": ids}).to_parquet(folder / f"{split}.parquet")
    (folder / "stats.json").write_text("{}")  # no chat template: the rows are random ids
    return folder


def train_command(manifest: Path, data: Path, run_dir: Path, settings: dict) -> list[str]:
    from snaketune.layout import train_arguments

    return [sys.executable, str(REPO / "scripts" / "train.py"), "--model-manifest", str(manifest),
            *train_arguments(data, run_dir), "--settings", json.dumps(settings)]


def read_run(run_dir: Path) -> dict:
    import pandas as pd

    log = pd.read_csv(run_dir / "train_log.csv")
    summary = json.loads((run_dir / "train_summary.json").read_text())
    speeds = log["tokens_per_second"].dropna().tolist()[1:]  # the first interval includes warm-up
    return {
        "steps": int(summary["global_step"]),
        "tokens_per_second": round(sorted(speeds)[len(speeds) // 2], 1) if speeds else None,
        "peak_memory_gib": summary.get("peak_memory_gib"),
        "peak_memory_gib_per_process": summary.get("peak_memory_gib_per_process"),
        "losses": [round(x, 5) for x in log["loss"].tolist()],
        "finite": bool(log["loss"].map(lambda x: x == x and abs(x) != float("inf")).all()),
    }


def run_case(name: str, work: Path, steps: int, length: int, overrides: dict | None = None,
             profile: str | None = None) -> dict:
    shape, method_settings = CASES[name]
    manifest = build_model(shape, work / "models" / shape)
    data = build_dataset(work / "data" / f"len{length}", rows=64, length=length, vocab=1100)
    settings = {**method_settings, "max_steps": steps, "per_device_train_batch_size": 1, "logging_steps": 1,
                "save_steps": 10_000, "precision": "bf16", "gradient_checkpointing": True, "warmup_steps": 0,
                "lr_scheduler_type": "constant", **(overrides or {})}
    run_dir = work / "runs" / name
    result = {"case": name, "shape": shape, "config": SHAPES[shape], "settings": settings, "seq_len": length,
              "batch": 1}
    began = time.monotonic()
    if name.startswith("zero3-resume"):
        settings["save_steps"] = steps // 2
        log = open(work / f"{name}.first.log", "w")
        process = subprocess.Popen(train_command(manifest, data, run_dir, settings), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        checkpoint = run_dir / "checkpoints" / f"checkpoint-{steps // 2}" / "trainer_state.json"
        while not checkpoint.is_file() and process.poll() is None:
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        result["killed_after_checkpoint"] = steps // 2
    environment = dict(os.environ)
    if profile:  # benchmarks/profiling/sitecustomize.py profiles these steps of every process
        environment.update(SNAKETUNE_PROFILE=str(work / f"{name}.profile.json"), SNAKETUNE_PROFILE_STEPS=profile,
                           PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "benchmarks" / "profiling"),
                                                                    os.environ.get("PYTHONPATH")])))
    completed = subprocess.run(train_command(manifest, data, run_dir, settings), capture_output=True, text=True,
                               env=environment)
    result["wall_seconds"] = round(time.monotonic() - began, 1)
    if completed.returncode != 0:
        result["error"] = completed.stderr[-3000:]
        return result
    result["resumed_from"] = next((line.split("resume from ")[1] for line in completed.stderr.splitlines()
                                   if "resume from " in line), None)
    result.update(read_run(run_dir))
    if profile and (work / f"{name}.profile.json").is_file():
        result["profile"] = json.loads((work / f"{name}.profile.json").read_text())
    if settings["method"] == "full":  # the consolidated folder must load on its own, in a fresh process
        check = subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoModelForCausalLM; "
                                "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
                                "print(sum(p.numel() for p in m.parameters()))", str(run_dir / "adapter")],
                               capture_output=True, text=True)
        result["loads_in_fresh_process"] = check.returncode == 0
        result["parameters"] = int(check.stdout.split()[-1]) if check.returncode == 0 else None
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--work", default="/tmp/snaketune-bench", help="scratch folder for models and runs")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON",
                        help="override train settings of every case, e.g. gradient_checkpointing=false")
    parser.add_argument("--profile", metavar="FIRST-LAST",
                        help="profile these optimizer steps (torch.profiler and cProfile), e.g. 6-9; kept in the JSON")
    parser.add_argument("--out", required=True, help="results JSON")
    args = parser.parse_args()

    import torch

    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cases": []}
    for name in args.cases:
        print(f"== {name}", flush=True)
        overrides = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
        case = run_case(name, Path(args.work), args.steps, args.seq_len, overrides, args.profile)
        print(json.dumps({k: v for k, v in case.items() if k not in ("config", "settings", "profile")}), flush=True)
        results["cases"].append(case)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
