#!/usr/bin/env python
"""Chat with a trained model in the terminal: streamed answers, multi-turn history with the run's chat template.

Commands: /reset forgets the conversation (the system prompt stays), /exit (or Ctrl-D) quits.

Example:
    python scripts/chat.py --run identity-lora
    python scripts/chat.py --model results/runs/identity-lora/merged --system "Answer briefly." --temperature 0.7
    python scripts/chat.py --model-manifest results/models/tiny-qwen2/manifest.json \\
        --adapter results/runs/identity-lora/adapter
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    from snaketune.serve import add_model_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard

    args = build_parser().parse_args(argv)

    def body():
        from snaketune.serve import Conversation, SamplingSettings, load_chat_model

        chat = load_chat_model(args)
        sampling = SamplingSettings(args.max_new_tokens, args.temperature, args.top_p)
        conversation = Conversation(args.system)
        interactive = sys.stdin.isatty()
        print(f"chatting with {chat.name}; /reset to start over, /exit to quit", file=sys.stderr)
        while True:
            try:
                text = input("you> " if interactive else "").strip()
            except EOFError:
                break
            if text == "/exit":
                break
            if text == "/reset":
                conversation.reset()
                print("(conversation reset)", flush=True)
                continue
            if not text:
                continue
            print("assistant> ", end="", flush=True)
            for piece in conversation.ask(chat, text, sampling):
                print(piece, end="", flush=True)
            print(flush=True)

    return main_guard(body)


if __name__ == "__main__":
    sys.exit(main())
