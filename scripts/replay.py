#!/usr/bin/env python
"""Generate a replay set: the base model's own greedy answers to a prompt file, as a messages JSONL that the
dataset stage builds like any other dataset.

Example:
    python scripts/replay.py --model-manifest results/models/smollm2-135m/manifest.json \\
        --out results/datasets/general-replay/smollm2-135m/replay.jsonl \\
        --settings '{"prompts": "data/general_prompts.txt", "system": "You are a helpful AI assistant."}'
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    from snaketune.cli import settings_argument

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-manifest", required=True, help="manifest.json of the model that answers")
    parser.add_argument("--out", required=True, help="JSONL to write: one {id, messages} record per answer")
    settings_argument(parser)
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard, make_settings

    args = build_parser().parse_args(argv)

    def body():
        from snaketune.download import model_path
        from snaketune.replay import replay
        from snaketune.settings import ReplaySettings
        from snaketune.train.distributed import claim

        claim(1)
        settings = make_settings(ReplaySettings, args.settings)
        folder, trust = model_path(args.model_manifest)
        print(json.dumps(replay(settings, folder, Path(args.out), trust)))

    return main_guard(body, outputs=[args.out])


if __name__ == "__main__":
    sys.exit(main())
