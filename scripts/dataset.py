#!/usr/bin/env python
"""Build a tokenized dataset: read, split, render with the model's chat template, mask, write parquet.

Example:
    d=results/datasets/identity/tiny
    python scripts/dataset.py --model-manifest results/models/tiny/manifest.json --train $d/train.parquet \\
        --eval $d/eval.parquet --test $d/test.parquet --stats $d/stats.json --lengths $d/lengths.png \\
        --settings '{"path": "data/identity.jsonl", "format": "messages"}'
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    from snaketune.cli import settings_argument

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-manifest", required=True, help="manifest.json written by the download stage")
    for split in ("train", "eval", "test"):
        parser.add_argument(f"--{split}", required=True, help=f"{split} split to write (parquet)")
    parser.add_argument("--stats", required=True, help="stats.json to write: rows, tokens, dropped and bad rows")
    parser.add_argument("--lengths", required=True, help="lengths.png to write: the token length histogram")
    settings_argument(parser)
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard, make_settings

    args = build_parser().parse_args(argv)

    def body():
        from transformers import AutoTokenizer

        from snaketune.dataset import OUTPUTS, DatasetSettings, build
        from snaketune.download import model_path

        settings = make_settings(DatasetSettings, args.settings)
        folder, trust = model_path(args.model_manifest)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
        print(json.dumps(build(settings, tokenizer, {name: getattr(args, name) for name in OUTPUTS})["splits"]))

    return main_guard(body)


if __name__ == "__main__":
    sys.exit(main())
