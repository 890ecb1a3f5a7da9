#!/usr/bin/env python
"""Chat with a trained model in the terminal: streamed answers, multi-turn history with the run's chat template.

Commands: /reset forgets the conversation (the system prompt stays), /image PATH shows an image with the next
question (a vision-language model's run), /exit (or Ctrl-D) quits.

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
    parser.add_argument("--image", help="an image shown with the first question (a vision-language model)")
    return parser


def check_image(chat, path: str) -> str:
    """An image the chat can show: the model takes images, and the file decodes."""
    from snaketune.errors import UserError
    from snaketune.vision import ImageProblem, open_image

    if chat.vision is None:
        raise UserError(f"--image: {chat.name} is a text-only model; it takes no images")
    try:
        open_image(path)
    except ImageProblem as problem:
        raise UserError(f"--image: {problem}") from None
    return path


def main(argv=None) -> int:
    from snaketune.cli import main_guard

    args = build_parser().parse_args(argv)

    def body():
        from snaketune.errors import UserError
        from snaketune.serve import Conversation, SamplingSettings, load_chat_model

        chat = load_chat_model(args)
        sampling = SamplingSettings(args.max_new_tokens, args.temperature, args.top_p)
        conversation = Conversation(args.system)
        interactive = sys.stdin.isatty()
        image = check_image(chat, args.image) if args.image else None
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
            if text.startswith("/image "):
                try:
                    image = check_image(chat, text.removeprefix("/image ").strip())
                    print("(the image goes with your next question)", flush=True)
                except UserError as problem:
                    print(f"error: {problem}", file=sys.stderr, flush=True)
                continue
            if not text:
                continue
            print("assistant> ", end="", flush=True)
            for piece in conversation.ask(chat, text, sampling, image):
                print(piece, end="", flush=True)
            print(flush=True)
            image = None

    return main_guard(body)


if __name__ == "__main__":
    sys.exit(main())
