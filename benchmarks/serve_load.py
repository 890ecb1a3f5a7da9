#!/usr/bin/env python
"""Load on the OpenAI-compatible service: streaming clients, as the chat page is one.

For each engine (continuous batching with --max-batch, and one request at a time: --max-batch 1) and each number
of concurrent clients (1, 16, 64, 256), lets that many clients stream
chat completions at once (each sends its next request when its stream ends, --rounds requests per client), and
reports requests/s, generated tokens/s (from each response's usage), and p50/p95 time to first token and total
latency. The service runs as users run it (scripts/serve.py, its own process). Sampling is off (temperature 0);
a random-init model rarely picks its end-of-turn token, so answers run about --max-tokens: tokens/s counts the
tokens each response's usage reports.

    python benchmarks/serve_load.py --out benchmarks/results/serve_load_cpu_tiny.json          # tiny model, CPU
    python benchmarks/serve_load.py --shape qwen2.5-0.5b --out benchmarks/results/serve_load_gpu_qwen2.5-0.5b.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))


def tiny_model(folder: Path) -> Path:
    import yaml

    from snaketune.download import fetch

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
    model = {**config["models"]["tiny-qwen2"], "trust_remote_code": False, "max_position_embeddings": 1024}
    model["tokenizer_corpus"] = [str(REPO / p) for p in model["tokenizer_corpus"]]
    fetch(model, folder)
    return folder


def confine_output_head(folder: Path) -> None:
    """Make a random-init model of a real shape answer in text: its benchmark tokenizer has 2,048 ids and the
    shape's vocabulary ~150k, and ids past the tokenizer decode to nothing. Rows of the output head past the
    tokenizer are zeroed and the others scaled up, so the argmax lands on a real token; the head's size and
    cost stay the shape's."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(folder))
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        for key in ("lm_head.weight", "model.embed_tokens.weight"):
            if key in tensors:
                head = tensors[key].float()
                head[size:] = 0
                head[:size] *= 50
                tensors[key] = head.to(tensors[key].dtype)
        save_file(tensors, shard, metadata={"format": "pt"})


async def client_loop(client, url: str, rounds: int, max_tokens: int, index: int, records: list) -> None:
    for turn in range(rounds):
        body = {"messages": [{"role": "user", "content": f"第{index}-{turn}个问题：你是谁？"}], "stream": True,
                "max_tokens": max_tokens, "temperature": 0, "stream_options": {"include_usage": True}}
        began, first, tokens = time.perf_counter(), None, 0
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                records.append({"status": response.status_code})
                await response.aread()
                continue
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if first is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - began
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        records.append({"status": 200, "ttft": first, "latency": time.perf_counter() - began, "tokens": tokens})


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else None


def start_service(folder: Path, max_batch: int):
    """scripts/serve.py in its own process, as users run it; returns (process, url) once it answers."""
    import subprocess
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py"), "--model", str(folder),
                                "--name", "bench", "--port", str(port), "--max-batch", str(max_batch),
                                "--max-waiting", "4096", "--max-tokens-limit", "4096"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=1).read()
            return process, url
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("scripts/serve.py exited") from None
            time.sleep(0.1)
    raise RuntimeError("scripts/serve.py did not start")


def measure(url: str, concurrency: int, rounds: int, max_tokens: int) -> dict:
    import httpx

    async def main():
        records: list = []
        limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
        async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
            began = time.perf_counter()
            await asyncio.gather(*(client_loop(client, url, rounds, max_tokens, i, records)
                                   for i in range(concurrency)))
            return records, time.perf_counter() - began

    records, seconds = asyncio.run(main())
    done = [r for r in records if r["status"] == 200]
    return {"clients": concurrency, "requests": len(records), "errors": len(records) - len(done),
            "seconds": round(seconds, 2), "requests_per_second": round(len(done) / seconds, 2),
            "generated_tokens_per_second": round(sum(r["tokens"] for r in done) / seconds, 1),
            "ttft_p50": percentile([r["ttft"] for r in done if r["ttft"] is not None], 0.5),
            "ttft_p95": percentile([r["ttft"] for r in done if r["ttft"] is not None], 0.95),
            "latency_p50": percentile([r["latency"] for r in done], 0.5),
            "latency_p95": percentile([r["latency"] for r in done], 0.95)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", help="a random-init model of this shape (benchmarks/train_gpu.py SHAPES), on GPU")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after the other")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--one-at-a-time-clients", type=int, nargs="*", default=[1, 64],
                        help="client counts to run on the one-request-at-a-time engine too (the baseline)")
    parser.add_argument("--out", help="results JSON")
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        if args.shape:
            from train_gpu import build_model

            folder = Path(json.loads(build_model(args.shape, Path(tmp) / "model").read_text())["path"])
            confine_output_head(folder)
        else:
            folder = tiny_model(Path(tmp) / "model")
        results = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                   "model": args.shape or "tiny (config/config.yaml, context 1024)", "max_tokens": args.max_tokens,
                   "rounds": args.rounds, "runs": []}
        for engine, batch, clients in (("continuous batching", args.max_batch, args.clients),
                                       ("one at a time", 1, args.one_at_a_time_clients)):
            process, url = start_service(folder, batch)
            try:
                for count in clients:
                    run = {"engine": engine, "max_batch": batch, **measure(url, count, args.rounds, args.max_tokens)}
                    print(json.dumps(run), flush=True)
                    results["runs"].append(run)
            finally:
                process.terminate()
                process.wait(timeout=30)
        batched = {r["clients"]: r for r in results["runs"] if r["max_batch"] > 1}
        single = {r["clients"]: r for r in results["runs"] if r["max_batch"] == 1}
        results["speedup_tokens_per_second"] = {
            count: round(batched[count]["generated_tokens_per_second"] / single[count]["generated_tokens_per_second"],
                         2) for count in single if count in batched}
        print(json.dumps({"speedup_tokens_per_second": results["speedup_tokens_per_second"]}))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
