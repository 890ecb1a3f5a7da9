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
        from snaketune.gpus import claim
        from snaketune.launch import NODE_LAUNCHER, launch_command
        from snaketune.settings import TrainSettings
        from snaketune.train import TrainFiles, prepare_environment, train
        from snaketune.trainer_guard import lock_run_folder, snakemake_ancestor, watch_snakemake

        settings = make_settings(TrainSettings, args.settings)
        if "LOCAL_RANK" not in os.environ and os.environ.get(NODE_LAUNCHER) != "1":  # the job's first process
            lock = lock_run_folder(Path(args.checkpoints))  # held (and inherited by torchrun) until the job ends
            print(f"holding {lock.name}", file=sys.stderr)
        command = launch_command(settings.nodes, settings.gpus, bool(settings.deepspeed),
                                 str(Path(__file__).resolve()), argv)
        if "SLURM_JOB_ID" in os.environ and "LOCAL_RANK" not in os.environ:  # which GPUs Slurm gave this job
            gpus = os.environ.get("SLURM_STEP_GPUS") or os.environ.get("SLURM_JOB_GPUS") or "none"
            print(f"Slurm job {os.environ['SLURM_JOB_ID']} on {os.environ.get('SLURMD_NODENAME', '?')}: GPUs {gpus}",
                  file=sys.stderr)
        if "LOCAL_RANK" not in os.environ and "SLURM_JOB_ID" not in os.environ:  # Slurm assigns a job's GPUs
            claim(settings.gpus)  # torchrun's workers inherit the launcher's GPUs
        if command:
            prepare_environment(settings)
            print(f"launching: {' '.join(command[:8])} ...", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os.execvp(command[0], command)
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
