#!/usr/bin/env python
"""Cost as data grows: build a Firefly-layout dataset of N rows through the dataset stage, then start training on
it through scripts/train.py, each in a process of its own, and report seconds and peak RSS of each.

    python benchmarks/dataset_scale.py --rows 100000 1000000 --out benchmarks/results/dataset_scale_cpu.json
    python benchmarks/dataset_scale.py --rows 100000 --workers 1 2 --phases build  # the build over 1 and 2 workers

Rows are synthetic Firefly conversations (``{"conversation_id", "category", "conversation": [{"human",
"assistant"}, ...], "dataset"}``), mixed Chinese and English, one to three turns, distinct. The model is the
tiny builtin one (its tokenizer is what the build runs); training runs 5 steps of LoRA, which is enough to load
the rows (converted once to a memory-mapped Arrow file), plan the packs and start. Target (issue 17): under 4 GB
peak RSS per process at 1,000,000 rows on the 2-core CPU machine. Issue 35: 1,000,000 rows built in <= 200 s at
<= 1.5 GB, 2 workers at least 1.6x one worker's rows/s (peak RSS is the build's own process; its workers' largest is
worker_hwm_mb, their VmHWM sampled while they run; worker_peak_rss_mb, their ru_maxrss, also counts the build's size
when it started them). cpu_s is the build's CPU, its own and its workers' (user + system): on a shared machine
rows_per_cpu_s compares better than rows_per_s; load_average is the machine's at the end of the build.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

TOPICS = ["还款", "天气", "机器学习", "历史", "旅行", "编程", "健康", "音乐"]


def write_firefly(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            topic = TOPICS[i % len(TOPICS)]
            answer = f"关于{topic}（编号{i}）：" + "这是一个详细的回答，包含背景、要点和例子。" * (1 + i % 9)
            turns = [{"human": f"第{i}个问题：请介绍一下{topic}，并举{i % 7 + 1}个例子。 Question {i} about {topic}?",
                      "assistant": answer + f" In short, answer {i}."} for _ in range(1 + i % 3)]
            out.write(json.dumps({"conversation_id": i, "category": topic, "conversation": turns,
                                  "dataset": "synthetic"}, ensure_ascii=False) + "\n")


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def cpu_seconds() -> float:
    """User and system CPU of this process and of its children that have ended (the build's workers)."""
    return sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for field in ("ru_utime", "ru_stime"))


class WorkerPeaks:
    """The largest peak RSS (VmHWM) of this process's children, sampled every half second while open. A spawned
    worker's ru_maxrss also counts its parent's size at the fork before its exec, so it overstates the worker."""

    def __init__(self):
        import threading

        self.peak_kb, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        me = str(os.getpid())
        while not self.done.wait(0.5):
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                        status = (stat.parent / "status").read_text()
                        self.peak_kb = max(self.peak_kb, int(status.split("VmHWM:")[1].split()[0]))
                except (OSError, IndexError, ValueError):
                    continue

    def __enter__(self) -> WorkerPeaks:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def phase_build(work: Path, workers: int) -> dict:
    from transformers import AutoTokenizer

    from snaketune.dataset import build
    from snaketune.layout import dataset_outputs
    from snaketune.settings import DatasetSettings

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    settings = DatasetSettings(path=str(work / "firefly.jsonl"), format="firefly", max_seq_length=512,
                               eval_size=200, test_size=200)
    began, cpu = time.perf_counter(), cpu_seconds()
    with WorkerPeaks() as peaks:
        stats = build(settings, tokenizer, dataset_outputs(work / "data"), workers=workers)
    cpu = cpu_seconds() - cpu
    rows = sum(s["rows"] for s in stats["splits"].values())
    return {"workers": workers, "rows_kept": rows, "train_tokens": stats["splits"]["train"]["tokens"],
            "rows_per_s": round(stats["rows_read"] / (time.perf_counter() - began)),
            "cpu_s": round(cpu, 1), "rows_per_cpu_s": round(stats["rows_read"] / cpu),
            "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "worker_hwm_mb": round(peaks.peak_kb / 1024, 1) if peaks.peak_kb else None,
            "load_average": [round(load, 2) for load in os.getloadavg()]}


def run_phase(name: str, work: Path, workers: int) -> dict:
    began = time.perf_counter()
    if name == "train":
        from snaketune.layout import train_arguments

        run = work / "run"
        settings = {"method": "lora", "max_steps": 5, "per_device_train_batch_size": 2, "logging_steps": 1,
                    "save_steps": 1000, "packing": "tokens"}
        completed = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--model-manifest",
                                    str(work / "model" / "manifest.json"), *train_arguments(work / "data", run),
                                    "--settings", json.dumps(settings)], capture_output=True, text=True)
        if completed.returncode:
            raise SystemExit(completed.stderr[-3000:])
        summary = json.loads((run / "train_summary.json").read_text())
        extra = {"steps": summary["global_step"], "train_rows": summary["train_rows"],
                 "packs": summary["train_batches_per_epoch_per_process"]}
        rss = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    else:
        extra = phase_build(work, workers)
        rss = peak_rss_mb()
    return {"seconds": round(time.perf_counter() - began, 1), "peak_rss_mb": rss, **extra}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="build each size with these worker counts")
    parser.add_argument("--phases", nargs="+", choices=["build", "train"], default=["build", "train"])
    parser.add_argument("--out")
    parser.add_argument("--phase", choices=["build", "train"], help=argparse.SUPPRESS)  # internal: one phase
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, Path(args.work), args.workers[0])))
        return 0

    import yaml

    from snaketune.download import fetch

    results = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "cases": []}
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
    model = dict(config["models"]["tiny-qwen2"])
    model["tokenizer_corpus"] = [str(REPO / p) for p in model["tokenizer_corpus"]]
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            fetch({**model, "trust_remote_code": False, "max_position_embeddings": 1024,
                   "tie_word_embeddings": False}, work / "model")
            write_firefly(work / "firefly.jsonl", rows)
            for workers in args.workers:
                case = {"rows": rows, "file_mb": round((work / "firefly.jsonl").stat().st_size / 2**20, 1)}
                for phase in args.phases:
                    completed = subprocess.run([sys.executable, __file__, "--phase", phase, "--work", str(work),
                                                "--workers", str(workers)], capture_output=True, text=True)
                    if completed.returncode:
                        case[phase] = {"error": completed.stderr[-2000:]}
                        break
                    case[phase] = json.loads(completed.stdout.strip().splitlines()[-1])
                print(json.dumps(case), flush=True)
                results["cases"].append(case)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
