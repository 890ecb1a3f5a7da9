#!/usr/bin/env python
"""Fine-tune a base model on a built dataset: LoRA, QLoRA or full (optionally DeepSpeed ZeRO).

Runs as one process, or relaunches itself under torchrun with one process per GPU when the settings ask for
`"gpus": N` with N > 1 or for DeepSpeed. Started again after a kill, it resumes from the newest complete checkpoint in
<run-dir>/checkpoints/.

Example:
    d=results/datasets/identity/tiny r=results/runs/identity-lora
    python scripts/train.py --model-manifest results/models/tiny/manifest.json --train $d/train.parquet \\
        --eval $d/eval.parquet --stats $d/stats.json --adapter $r/adapter --train-log $r/train_log.csv \\
        --summary $r/train_summary.json --curve $r/loss.png --checkpoints $r/checkpoints \\
        --settings '{"method": "lora", "learning_rate": 0.005, "num_train_epochs": 10}'
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    from snaketune.cli import settings_argument

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-manifest", required=True, help="manifest.json written by the download stage")
    parser.add_argument("--start-model", help="a model folder to start from instead of the manifest's (another run's "
                        "merged model, from_run); the manifest still says whether it runs remote code")
    parser.add_argument("--train", required=True, help="train split (parquet) written by the dataset stage")
    parser.add_argument("--eval", required=True, help="eval split (parquet) written by the dataset stage")
    parser.add_argument("--stats", help="the dataset build's stats.json (its chat template goes into the tokenizer)")
    parser.add_argument("--adapter", required=True, help="folder to write: the adapter (or full weights)")
    parser.add_argument("--train-log", required=True, help="train_log.csv to write")
    parser.add_argument("--summary", required=True, help="train_summary.json to write")
    parser.add_argument("--curve", required=True, help="loss.png to write")
    parser.add_argument("--checkpoints", required=True,
                        help="folder of resumable checkpoints (kept after a kill, removed after success)")
    parser.add_argument("--tensorboard", help="folder for TensorBoard events (with tensorboard: true)")
    parser.add_argument("--name", default="run", help="the run's name (the loss curve's title)")
    settings_argument(parser)
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard, make_settings

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)

    def body():
        from snaketune.download import model_path
        from snaketune.settings import TrainSettings
        from snaketune.train.distributed import start_processes
        from snaketune.train.guard import snakemake_ancestor, watch_snakemake
        from snaketune.train.recipe import TrainFiles, train

        settings = make_settings(TrainSettings, args.settings)
        # lock the run folder, claim GPUs; with gpus > 1, DeepSpeed or nodes > 1, become torchrun (or srun): no return
        start_processes(settings, str(Path(__file__).resolve()), argv, Path(args.checkpoints))
        watch_snakemake(snakemake_ancestor())  # a trainer whose Snakemake is killed checkpoints and stops
        folder, trust = model_path(args.model_manifest)
        folder = Path(args.start_model).absolute() if args.start_model else folder
        files = TrainFiles(
            train=Path(args.train), eval=Path(args.eval), stats=Path(args.stats) if args.stats else None,
            adapter=Path(args.adapter), train_log=Path(args.train_log), summary=Path(args.summary),
            curve=Path(args.curve), checkpoints=Path(args.checkpoints),
            tensorboard=Path(args.tensorboard) if args.tensorboard else None)
        summary = train(settings, folder, trust, files, run_name=args.name)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({k: v for k, v in summary.items() if k != "settings"}))

    return main_guard(body, outputs=[args.adapter, args.checkpoints])


if __name__ == "__main__":
    sys.exit(main())
