#!/usr/bin/env python
"""Score predictions.csv: BLEU-4, ROUGE-1/2/L and exact match; writes metrics.json.

Example:
    python scripts/evaluate.py --predictions results/runs/identity-lora/predictions.csv \\
        --out results/runs/identity-lora/metrics.json --settings '{"text_tokenizer": "char"}'
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    from snaketune.cli import settings_argument

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True, help="predictions.csv written by the predict stage")
    parser.add_argument("--train-summary", help="train_summary.json of the run: its eval split's preference scores "
                                                "(runs on preference pairs) go into metrics.json")
    parser.add_argument("--out", required=True, help="metrics.json to write")
    settings_argument(parser)
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard, make_settings

    args = build_parser().parse_args(argv)

    def body():
        import pandas as pd

        from snaketune.evaluate import evaluate, preference_metrics
        from snaketune.io import write_json
        from snaketune.settings import EvalSettings

        frame = pd.read_csv(args.predictions, keep_default_na=False, dtype=str)
        metrics = evaluate(make_settings(EvalSettings, args.settings), list(frame["reference"]),
                           list(frame["prediction"]))
        if args.train_summary:
            metrics.update(preference_metrics(json.loads(Path(args.train_summary).read_text(encoding="utf-8"))))
        write_json(args.out, metrics)
        print(json.dumps(metrics))

    return main_guard(body, outputs=[args.out])


if __name__ == "__main__":
    sys.exit(main())
