#!/usr/bin/env python
"""Build a tokenized dataset: read, split, render with the model's chat template, mask, write parquet.

Example:
    python scripts/dataset.py --model-manifest results/models/tiny/manifest.json \\
        --out results/datasets/identity/tiny --settings '{"path": "data/identity.jsonl", "format": "messages"}'
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
    parser.add_argument("--out", required=True, help="folder for train/eval/test.parquet and stats.json")
    settings_argument(parser)
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard, make_settings

    args = build_parser().parse_args(argv)

    def body():
        from transformers import AutoTokenizer

        from snaketune.dataset import DatasetSettings, build
        from snaketune.download import model_path

        settings = make_settings(DatasetSettings, args.settings)
        folder, trust = model_path(args.model_manifest)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
        print(json.dumps(build(settings, tokenizer, args.out)["splits"]))

    return main_guard(body)


if __name__ == "__main__":
    sys.exit(main())
