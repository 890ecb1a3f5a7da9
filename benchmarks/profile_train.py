#!/usr/bin/env python
"""Where the train stage's time and memory go on one GPU: the workload of ``train_stacks.py`` (random-init
Qwen2.5-1.5B shape, LoRA r16 on every linear layer, about 16.9k tokens a step) through the stage itself, with

- ``--kernels``: torch.profiler over the run; the GPU's kernel time by kind (matrix multiplies, attention,
  Triton kernels of the compiled layers, copies, the rest), the top kernels, and how much of the steps' wall time
  the GPU was busy;
- ``--memory``: the CUDA caching allocator's history; the tensors alive at the peak, grouped by the innermost
  frame of this project, transformers, peft or torch that allocated them;
- ``--phases``: each step's memory by phase (``train_stacks.PhaseMeter``), without the history, which made the
  recompute of a compiled layer fail on an H100 (issue 36, session 13).

    python benchmarks/profile_train.py --variant default-nockpt --kernels --out profile_nockpt.json
    python benchmarks/profile_train.py --variant default-ckpt --memory --out memory_ckpt.json

``--variant`` is a stage stack of train_stacks.py without its ``stage-`` prefix (``default-ckpt``,
``default-nockpt-8k``, ...). One GPU call runs both (benchmarks/issue36_call.sh, part d).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))

KERNEL_KINDS = (("matmul", ("gemm", "nvjet", "cutlass", "sm90_", "matmul", "cublas")),
                ("attention", ("flash", "fmha", "attention", "varlen")),
                ("copy", ("memcpy", "memset", "copy_")),
                ("compiled (Triton)", ("triton",)))


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(mark in lowered for mark in marks)), "other")


SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize",
         "cudaDeviceSynchronize", "cudaMemcpy", "aten::tolist", "cudaEventSynchronize")


def kernels(recorded, steps: int) -> dict:
    """Over the profiled steps: kernel time by kind, the top kernels, how much of the window the GPU was busy
    (the union of kernel intervals), the CPU operators that wait for the GPU, and who calls the top kernels'
    CPU operators (``fill_``, ``zero_``, copies) with their Python stacks."""
    totals: collections.Counter = collections.Counter()
    per_kernel: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    intervals, cpu_calls = [], collections.Counter()
    on_gpu, on_host = [], []
    for event in recorded.events():
        (on_gpu if str(getattr(event, "device_type", "")) == "DeviceType.CUDA" else on_host).append(event)
    for event in on_host:
        if event.name.startswith(("aten::", "cuda", "Memcpy", "Memset")):
            cpu_calls[event.name] += 1
    # the GPU side of record_function ranges (ProfilerStep#, Optimizer.step#...) spans whole steps: not kernels
    host_names = {event.name for event in on_host}
    for event in on_gpu:
        if event.name in host_names or event.name.startswith("ProfilerStep"):
            continue
        duration = event.time_range.elapsed_us()
        intervals.append((event.time_range.start, event.time_range.end))
        totals[kernel_kind(event.name)] += duration
        per_kernel[event.name[:120]] += duration
        calls[event.name[:120]] += 1
    intervals.sort()
    busy, end = 0, None
    for start, stop in intervals:
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    window = (intervals[-1][1] - intervals[0][0]) if intervals else 0
    idle = idle_gaps(intervals, on_host)
    stacks = []
    for average in recorded.key_averages(group_by_stack_n=6):
        if average.key in ("aten::fill_", "aten::zero_", "aten::copy_", "aten::index_put_", "aten::nonzero",
                           "aten::_local_scalar_dense") and average.count >= steps:
            stacks.append({"op": average.key, "calls": average.count, "stack": list(average.stack)[:6],
                           "cuda_us": round(getattr(average, "device_time_total", 0) or 0)})
    stacks.sort(key=lambda item: -item["cuda_us"])
    return {"steps": steps, "window_seconds": round(window / 1e6, 3), "gpu_busy_seconds": round(busy / 1e6, 3),
            "kernel_seconds_by_kind": {k: round(v / 1e6, 3) for k, v in totals.most_common()},
            "top_kernels": [{"name": name, "seconds": round(t / 1e6, 4), "calls": calls[name]}
                            for name, t in per_kernel.most_common(30)],
            "idle": idle,
            "waits_for_gpu": {name: count for name, count in cpu_calls.items() if any(s in name for s in SYNCS)},
            "cpu_ops_by_calls": dict(cpu_calls.most_common(40)), "stacks": stacks[:25]}


def idle_gaps(intervals: list[tuple[int, int]], cpu_events, least_us: int = 20) -> dict:
    """The GPU's idle gaps of at least ``least_us`` between kernels: their count and total by size, and what the
    host was running meanwhile (the innermost CPU operators overlapping each gap, weighted by the overlap)."""
    gaps, end = [], None
    for start, stop in intervals:
        if end is not None and start - end >= least_us:
            gaps.append((end, start))
        end = stop if end is None else max(end, stop)
    sizes = collections.Counter()
    for start, stop in gaps:
        size = stop - start
        sizes["<100us" if size < 100 else "<1ms" if size < 1000 else "<10ms" if size < 10_000 else ">=10ms"] += size
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in cpu_events
                   if e.time_range.end > e.time_range.start)
    host: collections.Counter = collections.Counter()
    starts = [s for s, _, _ in spans]
    for start, stop in gaps:
        first = max(0, bisect.bisect_left(starts, start) - 2000)
        for s, e, name in spans[first: bisect.bisect_right(starts, stop)]:
            overlap = min(e, stop) - max(s, start)
            if overlap > 0:
                host[name[:100]] += overlap
    return {"gaps": len(gaps), "idle_seconds": round(sum(b - a for a, b in gaps) / 1e6, 4),
            "idle_seconds_by_gap_size": {k: round(v / 1e6, 4) for k, v in sizes.most_common()},
            "largest_gaps_us": sorted((b - a for a, b in gaps), reverse=True)[:20],
            "host_during_gaps_seconds": {k: round(v / 1e6, 4) for k, v in host.most_common(40)}}


def profiled_window(first: int, active: int):
    """A Trainer callback that profiles optimizer steps ``first`` to ``first + active - 1`` (CPU operators with
    their stacks, CUDA kernels); the profile is on ``callback.recorded`` afterwards."""
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    class Window(TrainerCallback):
        recorded = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.recorded = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True,
                                    schedule=schedule(wait=first - 1, warmup=1, active=active, repeat=1))
            self.recorded.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self.recorded.step()

        def on_train_end(self, args, state, control, **kwargs):
            self.recorded.__exit__(None, None, None)

    return Window()


def where(frames: list[dict]) -> str:
    """The innermost frames of interest, as ``file:line function`` (three of them)."""
    marks = ("snaketune", "transformers/", "peft/", "torch/optim", "torch/utils/checkpoint", "accelerate/",
             "torch/_inductor", "torch/autograd", "liger")
    picked = [f"{f['filename'].split('site-packages/')[-1]}:{f['line']} {f['name']}" for f in frames
              if any(mark in f["filename"] for mark in marks)]
    return " <- ".join(picked[:3]) or (f"{frames[0]['filename']}:{frames[0]['line']}" if frames else "?")


def memory_at_peak(snapshot: dict) -> dict:
    """Replay the allocator's trace; the tensors alive at the traced peak, grouped by where they were made."""
    trace = snapshot["device_traces"][0]
    live: dict[int, tuple[int, str]] = {}
    current = peak = 0
    peak_index = -1
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], where(event.get("frames", [])))
            current += event["size"]
            if current > peak:
                peak, peak_index = current, index
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])[0]
    live.clear()
    for event in trace[: peak_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], where(event.get("frames", [])))
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    groups: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for size, place in live.values():
        groups[place] += size
        counts[place] += 1
    return {"traced_peak_gib": round(peak / 2**30, 3), "events": len(trace), "peak_event": peak_index,
            "alive_at_peak": [{"where": place, "mib": round(size / 2**20, 1), "tensors": counts[place]}
                              for place, size in groups.most_common(30)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="default-nockpt")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kernels", action="store_true")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--memory-stacks", default="all", choices=["all", "python"],
                        help="stacks the allocator's history keeps (--memory)")
    parser.add_argument("--phases", action="store_true", help="memory peaks by phase of each step (no history)")
    parser.add_argument("--work", default="/tmp/snaketune-stacks")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from train_gpu import build_model
    from train_stacks import make_rows, optimizer_steps, pack_size, run_stage

    work = Path(args.work)
    model_dir = build_model("qwen2.5-1.5b", work / "model-qwen2.5-1.5b").parent
    rows = make_rows(4000, vocab=1100, seed=0, prompt_share=0.25)
    steps = optimizer_steps(rows, 16_384)[: args.steps]
    rows = [rows[i] for step in steps for i in step]
    parts = args.variant.split("-")
    result: dict = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0),
                    "variant": args.variant, "steps": len(steps)}
    if args.memory:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks=args.memory_stacks)
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        run = lambda: run_stage(model_dir, rows, len(steps), parts[1] == "ckpt",  # noqa: E731
                                pack_size(args.variant, 4096), Path(scratch), variant=parts[0], phases=args.phases)
        from snaketune.train import recipe

        added = [profiled_window(first=3, active=2)] if args.kernels else []  # steps 3 and 4: compiled
        make_callbacks = recipe.make_callbacks  # the callbacks the stage is handed, and these
        recipe.make_callbacks = lambda **kwargs: (*make_callbacks(**kwargs), *added)
        measured = run()
        if args.kernels:
            result["kernels"] = kernels(added[0].recorded, steps=2)
    result["measured"] = {k: v for k, v in measured.items() if k != "losses"}
    if args.memory:
        result["memory"] = memory_at_peak(torch.cuda.memory._snapshot())
        torch.cuda.memory._record_memory_history(enabled=None)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
