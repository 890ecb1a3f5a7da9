#!/usr/bin/env python
"""Score a model on a multiple-choice exam (C-Eval / CMMLU layout) by the log-likelihood of the option
letters; writes accuracy per subject and overall as JSON.

Example:
    python scripts/exam.py --model results/runs/identity-lora/merged --exam data/mmcu_sample \\
        --name mmcu-sample --out results/runs/identity-lora/exams/mmcu-sample.json --settings '{"shots": 2}'
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    from snaketune.cli import model_source_arguments, settings_argument

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_source_arguments(parser)
    parser.add_argument("--exam", required=True, help="folder with test/ (or val/) and dev/ subject CSVs")
    parser.add_argument("--name", required=True, help="the exam's name in the config")
    parser.add_argument("--out", required=True, help="JSON to write")
    settings_argument(parser)
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard, make_settings, model_source

    args = build_parser().parse_args(argv)

    def body():
        import torch

        from snaketune.exam import load_exam, score_exam
        from snaketune.io import write_json
        from snaketune.predict import load_for_generation
        from snaketune.settings import ExamSettings
        from snaketune.train.distributed import claim

        settings = make_settings(ExamSettings, args.settings)
        exam = load_exam(args.name, args.exam)  # bad CSVs fail before the model loads
        folder, trust, adapter = model_source(args)
        claim(1)
        tokenizer, model = load_for_generation(folder, adapter, trust, settings.dtype)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        result = score_exam(model, tokenizer, exam, settings.shots, settings.batch_size)
        write_json(args.out, result)
        print(json.dumps({k: v for k, v in result.items() if k != "subjects"}))

    return main_guard(body, outputs=[args.out])


if __name__ == "__main__":
    sys.exit(main())
