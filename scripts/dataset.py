#!/usr/bin/env python
"""Build a tokenized dataset: read, split, render with the model's chat template, mask, write parquet.

Example:
    d=results/datasets/identity/tiny
    python scripts/dataset.py --model-manifest results/models/tiny/manifest.json --train $d/train.parquet \\
        --eval $d/eval.parquet --test $d/test.parquet --stats $d/stats.json --lengths $d/lengths.png \\
        --settings '{"path": "data/identity.jsonl", "format": "messages"}'
"""

import argparse
import dataclasses
import json
import os
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
    parser.add_argument("--num-workers", type=int, help="processes that tokenize (default: the job's threads from "
                        "OMP_NUM_THREADS, else the settings' num_workers, else every core this process may run on); "
                        "the rows are the same for any number")
    parser.add_argument("--replay", help="a replay dataset: the answers the replay stage generated (JSONL), read "
                                         "instead of the settings' path")
    mix = parser.add_argument_group("a mix of built datasets (settings' `mix`, in its order)")
    for split in ("train", "eval", "stats"):
        mix.add_argument(f"--mix-{split}", nargs="+", default=[], help=f"each dataset's {split} file")
    mix.add_argument("--mix-test", help="the first dataset's test split: the mix's test split")
    settings_argument(parser)
    return parser


def available_cores() -> int:
    """Cores this process may run on (a Slurm job's allocation, a taskset), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def job_threads() -> int | None:
    """The threads Snakemake gave this job: it sets OMP_NUM_THREADS to them for every shell command."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def main(argv=None) -> int:
    from snaketune.cli import main_guard, make_settings

    args = build_parser().parse_args(argv)

    def body():
        from transformers import AutoTokenizer

        from snaketune.dataset import OUTPUTS, MixPart, build, build_mix
        from snaketune.download import model_path
        from snaketune.errors import UserError
        from snaketune.settings import DatasetSettings

        settings = make_settings(DatasetSettings, args.settings)
        outputs = {name: getattr(args, name) for name in OUTPUTS}
        if settings.mix:
            files = [args.mix_train, args.mix_eval, args.mix_stats]
            if not args.mix_test or any(len(paths) != len(settings.mix) for paths in files):
                raise UserError(f"a mix of {len(settings.mix)} datasets needs that many --mix-train, --mix-eval "
                                "and --mix-stats files, and --mix-test")
            parts = [MixPart(name, weight, Path(train), Path(eval_), Path(stats)) for (name, weight), train, eval_,
                     stats in zip(settings.mix, *files, strict=True)]
            print(json.dumps(build_mix(settings, parts, Path(args.mix_test), outputs)["splits"]))
            return
        if args.replay:
            settings = dataclasses.replace(settings, path=args.replay, format="messages")
        folder, trust = model_path(args.model_manifest)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
        workers = min(args.num_workers or job_threads() or settings.num_workers or os.cpu_count() or 1,
                      available_cores())
        from snaketune.vision import ImageInputs

        print(json.dumps(build(settings, tokenizer, outputs, workers=max(workers, 1),
                               image_inputs=ImageInputs.of(folder, tokenizer))["splits"]))

    return main_guard(body, outputs=[args.train])


if __name__ == "__main__":
    sys.exit(main())
