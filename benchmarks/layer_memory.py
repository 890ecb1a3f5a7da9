#!/usr/bin/env python
"""Peak memory of one decoder layer's forward and backward on a CPU: the recompute-and-backward that sets a
checkpointed LoRA run's peak. A random-init layer at a real shape (default Qwen2.5-1.5B's: hidden 1536, MLP 8960,
12 heads, 2 key-value heads), LoRA r16 on every linear layer, bf16 under autocast as the Trainer runs it, one
sequence of ``--tokens``; with the MLP through autograd and through ``train/lean_mlp.py``, compiled as the stage
compiles layers or eager.

The peak is the process's resident memory above what it held before the step (``VmHWM`` reset through
``/proc/self/clear_refs``), with glibc's mmap threshold fixed so each large tensor is its own mapping, returned
when freed. Linux only.

    python benchmarks/layer_memory.py --tokens 4096 --out benchmarks/results/layer_memory_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
SHAPES = {"qwen2.5-1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
                           "num_key_value_heads": 2},
          "qwen2.5-7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                         "num_key_value_heads": 4}}


def resident_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def measure(shape: str, tokens: int, lean: bool, compiled: bool) -> dict:
    """One layer's forward and backward, once to warm up (and compile), then measured."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from snaketune.train.lean_mlp import use_lean_mlps

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=1024, num_hidden_layers=1, max_position_embeddings=max(8192, tokens),
                         **SHAPES[shape])
    model = get_peft_model(Qwen2ForCausalLM(config).to(torch.bfloat16),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    if lean:
        assert use_lean_mlps(model) == 1
    layer = model.base_model.model.model.layers[0]
    if compiled:
        layer.compile(dynamic=True)
    x = torch.randn(1, tokens, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens)[None]
    rotary = model.base_model.model.model.rotary_emb(x, positions)
    grad = torch.randn_like(x)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x, position_embeddings=rotary, attention_mask=None, position_ids=positions)
        (out[0] if isinstance(out, tuple) else out).backward(grad)
        for parameter in model.parameters():
            parameter.grad = None
        x.grad = None

    step()
    gc.collect()
    before = resident_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak
    began = time.perf_counter()
    step()
    return {"mlp": "lean" if lean else "autograd", "compiled": compiled,
            "peak_mib": round(resident_mib("VmHWM") - before, 1), "seconds": round(time.perf_counter() - began, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "lean,compiled": one measurement, in this process
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.one:
        lean, compiled = (flag == "1" for flag in args.one.split(","))
        print(json.dumps(measure(args.shape, args.tokens, lean, compiled)))
        return 0
    runs = []
    for compiled in (False, True):
        for lean in (False, True):  # each in a fresh process, so one's memory does not hide the next one's
            command = [sys.executable, __file__, "--shape", args.shape, "--tokens", str(args.tokens),
                       "--one", f"{int(lean)},{int(compiled)}"]
            done = subprocess.run(command, capture_output=True, text=True, check=True,
                                  env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "shape": args.shape, "tokens": args.tokens, "lora_rank": 16,
              "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), "?"), "runs": runs}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
