#!/usr/bin/env python
"""Merge a LoRA adapter into its base model and save a standalone Hugging Face model folder.

Example:
    python scripts/merge.py --model-manifest results/models/tiny/manifest.json \\
        --adapter results/runs/identity-lora/adapter --out results/runs/identity-lora/merged
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    from snaketune.cli import settings_argument

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-manifest", required=True, help="manifest.json of the base model")
    parser.add_argument("--start-model", help="a model folder to start from instead of the manifest's (another run's "
                        "merged model, from_run); the manifest still says whether it runs remote code")
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder written by the train stage")
    parser.add_argument("--out", required=True, help="merged model folder to write")
    settings_argument(parser)
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard, make_settings

    args = build_parser().parse_args(argv)

    def body():
        from snaketune.download import model_path
        from snaketune.merge import merge
        from snaketune.settings import MergeSettings

        folder, trust = model_path(args.model_manifest)
        folder = Path(args.start_model).absolute() if args.start_model else folder
        merge(make_settings(MergeSettings, args.settings), folder, trust, Path(args.adapter), Path(args.out))

    return main_guard(body, outputs=[args.out])


if __name__ == "__main__":
    sys.exit(main())
