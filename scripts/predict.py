#!/usr/bin/env python
"""Generate answers for the test split with a merged model, or a base model and its adapter; writes
predictions.csv. A restarted job generates only the rows a killed one had not finished.

Example:
    python scripts/predict.py --model results/runs/identity-lora/merged \\
        --test results/datasets/identity/tiny/test.parquet --out results/runs/identity-lora/predictions.csv
    python scripts/predict.py --model-manifest results/models/tiny-qwen2/manifest.json \\
        --adapter results/runs/identity-lora/adapter --test ... --out ...
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    from snaketune.cli import model_source_arguments, settings_argument

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_source_arguments(parser)
    parser.add_argument("--test", required=True, help="test.parquet written by the dataset stage")
    parser.add_argument("--out", required=True, help="predictions.csv to write")
    parser.add_argument("--partial", required=True,
                        help="rows generated so far (kept after a kill, so a rerun generates only the rest)")
    settings_argument(parser)
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard, make_settings, model_source

    args = build_parser().parse_args(argv)

    def body():
        from snaketune.predict import predict
        from snaketune.settings import GenerationSettings
        from snaketune.train.distributed import claim

        claim(1)
        folder, trust, adapter = model_source(args)
        settings = make_settings(GenerationSettings, args.settings)
        rows = predict(settings, folder, Path(args.test), Path(args.out), Path(args.partial), adapter_dir=adapter,
                       trust_remote_code=trust)
        print(f"predictions: {rows}")

    return main_guard(body, outputs=[args.out, args.partial])


if __name__ == "__main__":
    sys.exit(main())
