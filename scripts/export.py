#!/usr/bin/env python
"""Export a model folder as a GGUF file (llama.cpp's format, for llama.cpp, Ollama and LM Studio) and write an
Ollama Modelfile beside it whose template renders the model's chat template.

Example:
    python scripts/export.py --model results/runs/smollm2-identity/merged --type q8_0 --name smollm2-identity \\
        --out results/runs/smollm2-identity/gguf/q8_0/model.gguf \\
        --modelfile results/runs/smollm2-identity/gguf/q8_0/Modelfile
    ollama create snaky -f results/runs/smollm2-identity/gguf/q8_0/Modelfile
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    from snaketune.cli import model_source_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_source_arguments(parser)
    parser.add_argument("--source-gguf", help="the GGUF file the base model came from (its pre-tokenizer name)")
    parser.add_argument("--type", required=True, help="how the weights are stored: f16, bf16, q8_0 or f32")
    parser.add_argument("--name", help="the model's name in the file (general.name)")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--modelfile", required=True, help="the Ollama Modelfile to write beside it")
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard, model_source

    args = build_parser().parse_args(argv)

    def body():
        from snaketune.errors import UserError
        from snaketune.export import export_gguf, modelfile
        from snaketune.io import atomic_file

        folder, _, adapter = model_source(args)
        if adapter is not None:
            raise UserError("export reads a merged model folder (--model) or a base (--model-manifest), not an adapter")
        out = Path(args.out)
        written = export_gguf(folder, out, args.type, Path(args.source_gguf) if args.source_gguf else None,
                              name=args.name)
        text = modelfile(out.name, folder)
        with atomic_file(Path(args.modelfile)) as tmp:
            tmp.write_text(text, encoding="utf-8")
        print(json.dumps(written))

    return main_guard(body, outputs=[args.out, args.modelfile])


if __name__ == "__main__":
    sys.exit(main())
