#!/usr/bin/env python
"""Load on the OpenAI-compatible service with the tiny default model on this machine's CPU.

    python benchmarks/serve_load.py [--requests 200] [--concurrency 16] [--max-tokens 16]

Builds the tiny model, starts scripts/serve.py's app in-process, sends chat-completion requests from
--concurrency threads, and prints one JSON line: requests/s and p50/p95 latency (requests queue for the model,
so latency grows with concurrency while throughput stays that of one generation at a time).
"""

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    import socket

    import uvicorn
    import yaml

    from snaketune.download import fetch
    from snaketune.serve import ChatModel, ServiceSettings, create_app

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
    model = {**config["models"]["tiny-qwen2"], "trust_remote_code": False, "max_position_embeddings": 1024}
    model["tokenizer_corpus"] = [str(REPO / p) for p in model["tokenizer_corpus"]]
    with tempfile.TemporaryDirectory() as tmp:
        fetch(model, Path(tmp) / "model")
        app = create_app(ChatModel(Path(tmp) / "model", name="tiny"), ServiceSettings())
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)

        def one(i: int) -> float:
            body = json.dumps({"messages": [{"role": "user", "content": f"第{i}个问题：你是谁？"}],
                               "max_tokens": args.max_tokens}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(request, timeout=600) as response:
                assert response.status == 200
                json.loads(response.read())
            return time.perf_counter() - start

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            latencies = sorted(pool.map(one, range(args.requests)))
        seconds = time.perf_counter() - start
        server.should_exit = True
    print(json.dumps({"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                      "requests_per_second": round(args.requests / seconds, 2),
                      "p50_seconds": round(statistics.median(latencies), 3),
                      "p95_seconds": round(latencies[int(0.95 * (len(latencies) - 1))], 3), "errors": 0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
