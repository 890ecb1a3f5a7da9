#!/usr/bin/env python
"""Generate answers for the test split with a merged model; writes predictions.csv.

Example:
    python scripts/predict.py --model results/runs/identity-lora/merged \\
        --test results/datasets/identity/tiny/test.parquet --out results/runs/identity-lora/predictions.csv
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    from snaketune.cli import settings_argument

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="merged model folder")
    parser.add_argument("--test", required=True, help="test.parquet written by the dataset stage")
    parser.add_argument("--out", required=True, help="predictions.csv to write")
    settings_argument(parser)
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard, make_settings

    args = build_parser().parse_args(argv)

    def body():
        from snaketune.generation import GenerationSettings, predict
        from snaketune.gpus import claim

        claim(1)
        rows = predict(make_settings(GenerationSettings, args.settings), Path(args.model), Path(args.test),
                       Path(args.out))
        print(f"predictions: {rows}")

    return main_guard(body)


if __name__ == "__main__":
    sys.exit(main())
