#!/usr/bin/env python
"""Make a base model available and write its manifest.

Example:
    python scripts/download.py --manifest results/models/tiny/manifest.json \\
        --settings '{"source": "builtin", "tokenizer_corpus": ["data/identity.jsonl"], ...}'
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    from snaketune.cli import settings_argument

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True,
                        help="manifest.json to write; the folder that holds it is where a built or converted model "
                             "is written (local and hub models stay where they are)")
    settings_argument(parser)
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard
    from snaketune.download import fetch

    args = build_parser().parse_args(argv)
    return main_guard(lambda: print(f"files: {len(fetch(args.settings, Path(args.manifest).parent)['files'])}"),
                      outputs=[args.manifest])


if __name__ == "__main__":
    sys.exit(main())
