#!/usr/bin/env python
"""The headline recipe on its machine's budget: QLoRA of Qwen-14B-Chat (random init, its converted Qwen2 shape)
through the project's own stage scripts, each stage's peak measured against an A40 (48 GB; 44 GiB usable):

    dataset.py -> train.py (qlora, r64, batch 2 x 1024 tokens, gradient checkpointing) -> merge.py (bf16, shard by
    shard) -> predict.py (from the merged bf16 folder, 500 rows) -> exam.py (the bundled MMCU sample, 2 shots)

Measured per stage: peak GPU memory in use on the device (NVML, every process: CUDA context included), the stage
process's peak RSS and peak anonymous RSS (its own copies; memory-mapped weight files are page cache), wall time,
and beside them what `snakemake plan` (snaketune/plan.py) expects for config/examples/qwen-14b-chat-qlora.yaml.
Training rows are random ids of the full 1024 tokens (the plan's worst case); predict and exam read the real
bundled data through the dataset stage's tokenizer, built as in benchmarks/train_gpu.py.

Example (one H100, about 9 minutes; 60 GB of disk):
    python benchmarks/fits_a40.py --out benchmarks/results/fits_a40_qwen14b.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))

A40_USABLE_GIB = 44.0
EXAMPLE = REPO / "config" / "examples" / "qwen-14b-chat-qlora.yaml"


class PeakSampler:
    """Samples the GPU memory in use (NVML) and one process's RSS / anonymous RSS every 0.1 s."""

    def __init__(self, pid: int):
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle, self.pid = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0), pid
        self.gpu = self.rss = self.anon = 0
        self.running = True
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while self.running:
            self.gpu = max(self.gpu, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                self.rss = max(self.rss, int(fields["VmRSS"].split()[0]) * 1024)
                self.anon = max(self.anon, int(fields["RssAnon"].split()[0]) * 1024)
            except (OSError, KeyError):
                pass
            time.sleep(0.1)

    def stop(self) -> dict:
        self.running = False
        self.thread.join()
        return {"peak_gpu_gib": round(self.gpu / 2**30, 2), "peak_rss_gib": round(self.rss / 2**30, 2),
                "peak_anon_rss_gib": round(self.anon / 2**30, 2)}


def run_stage(name: str, command: list[str], work: Path) -> dict:
    began = time.monotonic()
    with open(work / f"{name}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        sampler = PeakSampler(process.pid)
        code = process.wait()
    result = {"stage": name, **sampler.stop(), "seconds": round(time.monotonic() - began, 1), "returncode": code}
    text = (work / f"{name}.log").read_text(errors="replace")
    if code != 0:
        result["error"] = text[-3000:]
    result["log_tail"] = [line for line in text.splitlines() if "memory held" in line or "logits" in line][-3:]
    print(json.dumps(result), flush=True)
    return result


def script(name: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / f"{name}.py")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/snaketune-a40", help="scratch folder (60 GB)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import pandas as pd
    import torch
    import yaml
    from train_gpu import build_dataset, build_model

    from snaketune.config import load
    from snaketune.layout import train_arguments
    from snaketune.plan import plan
    from snaketune.settings import DatasetSettings

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = load(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")), [EXAMPLE])
    run = next(iter(cfg.runs.values()))
    planned = {need.stage: asdict(need) for need in next(iter(plan(cfg).values()))}
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "budget_gib": A40_USABLE_GIB,
               "recipe": str(EXAMPLE.relative_to(REPO)), "stages": []}

    def record(stage: dict) -> None:
        stage["planned"] = planned.get(stage["stage"])
        results["stages"].append(stage)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    began = time.monotonic()
    manifest = build_model("qwen-14b-chat", work / "models" / "qwen-14b-chat")
    torch.cuda.empty_cache()
    record({"stage": "build", "seconds": round(time.monotonic() - began, 1)})

    data = work / "data"
    settings = DatasetSettings(path=str(REPO / "data" / "text_matching.json"), format="alpaca", max_seq_length=1024,
                               eval_size=0.05, test_size=0.2)
    record(run_stage("dataset", [*script("dataset"), "--model-manifest", str(manifest),
                                 *[f"--{s}={data / f'{s}.parquet'}" for s in ("train", "eval", "test")],
                                 "--stats", str(data / "stats.json"), "--lengths", str(data / "lengths.png"),
                                 "--settings", json.dumps(asdict(settings))], work))
    full_length = build_dataset(work / "train_rows", rows=64, length=1024, vocab=1100)
    train = {key: getattr(run.train, key) for key in ("method", "lora_rank", "lora_alpha", "learning_rate",
                                                     "per_device_train_batch_size", "gradient_checkpointing")}
    train.update(max_steps=args.steps, logging_steps=1, save_steps=10_000, precision="bf16", warmup_steps=0)
    run_dir = work / "run"
    stage = run_stage("train", [*script("train"), "--model-manifest", str(manifest),
                                *train_arguments(full_length, run_dir), "--settings", json.dumps(train)], work)
    if (run_dir / "train_summary.json").is_file():
        summary = json.loads((run_dir / "train_summary.json").read_text())
        stage.update(torch_peak_allocated_gib=summary.get("peak_memory_gib"),
                     tokens_per_second=summary.get("tokens_per_second"), settings=train)
    record(stage)

    merged = run_dir / "merged"
    record(run_stage("merge", [*script("merge"), "--model-manifest", str(manifest), "--adapter",
                               str(run_dir / "adapter"), "--out", str(merged), "--settings", "{}"], work))

    test = pd.read_parquet(data / "test.parquet")
    rows = pd.concat([test] * (500 // len(test) + 1), ignore_index=True).head(500)
    if "id" in rows:
        rows["id"] = [f"row-{i}" for i in range(len(rows))]
    rows.to_parquet(work / "test500.parquet")
    generation = {**asdict(run.generation)}
    stage = run_stage("predict", [*script("predict"), "--model", str(merged), "--test", str(work / "test500.parquet"),
                                  "--out", str(work / "predictions.csv"), "--partial", str(work / "partial.jsonl"),
                                  "--settings", json.dumps(generation)], work)
    if (work / "predictions.csv").is_file():
        stage["rows"] = len(pd.read_csv(work / "predictions.csv"))
    stage["settings"] = generation
    record(stage)

    exam = {"shots": 2, "batch_size": run.generation.batch_size}
    stage = run_stage("exam", [*script("exam"), "--model", str(merged), "--exam", str(REPO / "data" / "mmcu_sample"),
                               "--name", "mmcu-sample", "--out", str(work / "exam.json"),
                               "--settings", json.dumps(exam)], work)
    stage["settings"] = exam
    record(stage)
    results["fits"] = all(s.get("returncode", 0) == 0 and s.get("peak_gpu_gib", 0) < A40_USABLE_GIB
                          for s in results["stages"])
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
