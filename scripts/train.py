#!/usr/bin/env python
"""Fine-tune a base model on a built dataset (LoRA); resumes from the newest complete checkpoint.

Example:
    python scripts/train.py --model-manifest results/models/tiny/manifest.json \\
        --data results/datasets/identity/tiny --run-dir results/runs/identity-lora \\
        --settings '{"learning_rate": 0.005, "num_train_epochs": 10}'
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
    parser.add_argument("--data", required=True, help="folder with train.parquet and eval.parquet")
    parser.add_argument("--run-dir", required=True,
                        help="run folder: adapter/, train_log.csv, loss.png and checkpoints/ go here")
    settings_argument(parser)
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard, make_settings

    args = build_parser().parse_args(argv)

    def body():
        from snaketune.models import model_path
        from snaketune.training import TrainSettings, train

        settings = make_settings(TrainSettings, args.settings)
        folder, trust = model_path(args.model_manifest)
        data, run_dir = Path(args.data), Path(args.run_dir)
        summary = train(settings, folder, trust, data / "train.parquet", data / "eval.parquet",
                        adapter_out=run_dir / "adapter", log_csv=run_dir / "train_log.csv",
                        loss_png=run_dir / "loss.png", checkpoints=run_dir / "checkpoints", run_name=run_dir.name)
        print(json.dumps({k: v for k, v in summary.items() if k != "settings"}))

    return main_guard(body)


if __name__ == "__main__":
    sys.exit(main())
