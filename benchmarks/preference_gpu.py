#!/usr/bin/env python
"""DPO and ORPO on a GPU, through scripts/train.py exactly as the train rule runs it: lora, qlora and full
(DeepSpeed ZeRO-3, torchrun), on a random-init model of a real shape (benchmarks/train_gpu.py builds it) and the
bundled greeting pairs (data/greeting_pairs.jsonl) tokenized by the dataset stage with ChatML.

Per case it records whether the run finished, tokens/s (median of the logged intervals), peak GPU memory, trl's
reward accuracy and margin on the eval pairs, and the model's own preference accuracy before and after.

Example (one H100, about 5 minutes):
    python benchmarks/preference_gpu.py --out benchmarks/results/preference_gpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))

CASES = {  # stage, method, settings beyond the common ones
    "dpo-lora": ("dpo", "lora", {"learning_rate": 2e-4}),
    "dpo-qlora": ("dpo", "qlora", {"learning_rate": 2e-4}),
    "dpo-full-zero3": ("dpo", "full", {"learning_rate": 1e-5, "deepspeed": "zero3"}),
    "orpo-lora": ("orpo", "lora", {"learning_rate": 2e-4}),
    "orpo-qlora": ("orpo", "qlora", {"learning_rate": 2e-4}),
    "orpo-full-zero3": ("orpo", "full", {"learning_rate": 1e-5, "deepspeed": "zero3"}),
}


def build_pairs(manifest: Path, folder: Path) -> Path:
    from transformers import AutoTokenizer

    from snaketune.dataset import build
    from snaketune.layout import dataset_outputs
    from snaketune.settings import DatasetSettings

    if not (folder / "stats.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(json.loads(manifest.read_text())["path"])
        build(DatasetSettings(path=str(REPO / "data" / "greeting_pairs.jsonl"), format="preference", template="chatml",
                              max_seq_length=64, eval_size=64, test_size=16), tokenizer, dataset_outputs(folder))
    return folder


def run_case(name: str, manifest: Path, data: Path, work: Path, steps: int) -> dict:
    from train_gpu import read_run, train_command

    stage, method, extra = CASES[name]
    settings = {"stage": stage, "method": method, "max_steps": steps, "per_device_train_batch_size": 8,
                "logging_steps": 2, "save_steps": 10_000, "precision": "bf16", "warmup_steps": 0,
                "lr_scheduler_type": "constant", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                "pref_beta": 0.1, **extra}
    run_dir = work / "runs" / name
    began = time.monotonic()
    completed = subprocess.run(train_command(manifest, data, run_dir, settings), capture_output=True, text=True)
    result = {"case": name, "settings": settings, "wall_seconds": round(time.monotonic() - began, 1)}
    if completed.returncode != 0:
        result["error"] = completed.stderr[-3000:]
        return result
    summary = json.loads((run_dir / "train_summary.json").read_text())
    result.update(read_run(run_dir))
    result.update({key: summary.get(key) for key in ("reward_accuracy", "reward_margin", "preference", "speedups")})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--work", default="/tmp/preference_gpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from train_gpu import build_model

    work = Path(args.work)
    manifest = build_model(args.shape, work / "models" / args.shape)
    data = build_pairs(manifest, work / "data")
    results = {"gpu": torch.cuda.get_device_name(0), "shape": args.shape, "steps": args.steps, "cases": []}
    for name in args.cases:
        results["cases"].append(run_case(name, manifest, data, work, args.steps))
        print(json.dumps({k: v for k, v in results["cases"][-1].items() if k not in ("losses", "settings")}),
              flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
