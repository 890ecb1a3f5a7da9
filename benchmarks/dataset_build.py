#!/usr/bin/env python
"""Dataset build throughput: 100,000 alpaca rows through the dataset stage with the tiny builtin tokenizer.

    python benchmarks/dataset_build.py [--rows 100000]

Writes a synthetic alpaca JSON file (distinct Chinese/English rows), builds the tiny model's tokenizer, runs the
same build the workflow runs (read, deduplicate, split, render with the chat template, mask, parquet, stats,
histogram) and prints one JSON line with rows/s. Target: 100,000 rows in under 60 s on a 2-core machine.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()

    import yaml
    from transformers import AutoTokenizer

    from snaketune.dataset import build
    from snaketune.download import fetch
    from snaketune.layout import dataset_outputs
    from snaketune.settings import DatasetSettings

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
    model = dict(config["models"]["tiny-qwen2"])
    model["tokenizer_corpus"] = [str(REPO / p) for p in model["tokenizer_corpus"]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fetch({**model, "trust_remote_code": False, "max_position_embeddings": 1024}, tmp / "model")
        tokenizer = AutoTokenizer.from_pretrained(tmp / "model")
        rows = [{"instruction": f"判断下面两句话的意思是否相同。第{i}组",
                 "input": f"我想还款{i}。\nHow do I repay loan {i}?",
                 "output": "相同" if i % 2 else f"不同, because sentence {i} differs."} for i in range(args.rows)]
        data = tmp / "alpaca.json"
        data.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        settings = DatasetSettings(path=str(data), format="alpaca", max_seq_length=128, eval_size=0.01,
                                   test_size=0.01)
        start = time.perf_counter()
        stats = build(settings, tokenizer, dataset_outputs(tmp / "out"))
        seconds = time.perf_counter() - start
    kept = sum(split["rows"] for split in stats["splits"].values())
    print(json.dumps({"rows": args.rows, "rows_kept": kept, "seconds": round(seconds, 2),
                      "rows_per_second": round(args.rows / seconds)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
