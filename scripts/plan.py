#!/usr/bin/env python
"""Print the resource plan: expected peak GPU memory (per GPU), RAM and disk of each stage of every run, from the
model's shape, and what does not fit the machine the config declares (gpu_memory_gib, disk_gib): a run of the
workflow refuses to start then.

Examples:
    snakemake plan --profile profiles/autodl --configfile config/examples/qwen-14b-chat-qlora.yaml
    python scripts/plan.py --configfile config/examples/qwen-14b-chat-qlora.yaml --gpu-memory-gib 48
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", nargs="*", default=[],
                        help="config YAML files, merged in order as snakemake does (default: config/config.yaml)")
    parser.add_argument("--config", help="settings over the files, as JSON (how the workflow passes its --config)")
    parser.add_argument("--gpu-memory-gib", type=float, help="GPU memory of each GPU (overrides the config)")
    parser.add_argument("--disk-gib", type=float, help="disk the runs may fill (overrides the config)")
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard

    args = build_parser().parse_args(argv)

    def body():
        from snaketune.config import load_files
        from snaketune.plan import plan, problems, table

        cfg = load_files(args.configfile, json.loads(args.config) if args.config else None)
        needs = plan(cfg)
        sys.stdout.write(table(needs))
        gpu = args.gpu_memory_gib or cfg.gpu_memory_gib
        disk = args.disk_gib or cfg.disk_gib
        print(f"declared: gpu_memory_gib {gpu if gpu else 'not set'}, disk_gib {disk if disk else 'not set'}")
        found = problems(needs, gpu, disk)
        for line in found:
            print(f"does not fit: {line}")

    return main_guard(body)


if __name__ == "__main__":
    sys.exit(main())
