#!/usr/bin/env python
"""Fine-tune a base model on a built dataset: LoRA, QLoRA or full (optionally DeepSpeed ZeRO).

Runs as one process, or relaunches itself under torchrun with one process per GPU when the settings ask for
`"gpus": N` with N > 1 or for DeepSpeed. Started again after a kill, it resumes from the newest complete checkpoint in
<run-dir>/checkpoints/.

Example:
    python scripts/train.py --model-manifest results/models/tiny/manifest.json \\
        --data results/datasets/identity/tiny --run-dir results/runs/identity-lora \\
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
    parser.add_argument("--data", required=True, help="folder with train.parquet and eval.parquet")
    parser.add_argument("--run-dir", required=True,
                        help="run folder: adapter/, train_log.csv, loss.png and checkpoints/ go here")
    settings_argument(parser)
    return parser


def relaunch_command(processes: int, argv: list[str]) -> list[str]:
    """The torchrun command that runs this script once per process on this node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            str(Path(__file__).resolve()), *argv]


def main(argv=None) -> int:
    from snaketune.cli import main_guard, make_settings

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)

    def body():
        from snaketune.download import model_path
        from snaketune.gpus import claim
        from snaketune.train import TrainSettings, prepare_environment, train

        settings = make_settings(TrainSettings, args.settings)
        if "LOCAL_RANK" not in os.environ:  # torchrun's workers inherit the launcher's GPUs
            claim(settings.gpus)
        # DeepSpeed wants a launcher's environment even for one process, so it always goes through torchrun
        if (settings.gpus > 1 or settings.deepspeed) and "LOCAL_RANK" not in os.environ:
            prepare_environment(settings)
            sys.stdout.flush()
            os.execv(sys.executable, relaunch_command(settings.gpus, argv))
        folder, trust = model_path(args.model_manifest)
        data, run_dir = Path(args.data), Path(args.run_dir)
        summary = train(settings, folder, trust, data / "train.parquet", data / "eval.parquet", run_dir,
                        run_name=run_dir.name)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({k: v for k, v in summary.items() if k != "settings"}))

    return main_guard(body)


if __name__ == "__main__":
    sys.exit(main())
