#!/usr/bin/env python
"""Serve a trained model with the OpenAI chat-completions API and a chat page (Starlette + uvicorn).

Binds 127.0.0.1 unless told otherwise. With --api-key-env NAME (or SNAKETUNE_API_KEY set), every /v1 request
needs "Authorization: Bearer <key>". Requests are served one generation at a time, in arrival order.

Example:
    python scripts/serve.py --run identity-lora --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Who are you?"}]}'
    # or any OpenAI client with base_url="http://127.0.0.1:8000/v1"; the chat page is http://127.0.0.1:8000/
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    from snaketune.serve import add_model_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-env", default="SNAKETUNE_API_KEY",
                        help="environment variable holding the API key (unset or empty: no key needed)")
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger requests get 413")
    parser.add_argument("--max-tokens-limit", type=int, default=2048, help="larger max_tokens get 400")
    parser.add_argument("--max-context", type=int,
                        help="prompt + max_tokens cap (default: the model's context); longer requests get 400")
    parser.add_argument("--max-batch", type=int, default=32, help="requests decoded together at each step")
    parser.add_argument("--max-waiting", type=int, default=256,
                        help="requests waiting for a batch slot; beyond that new ones get 429 with Retry-After")
    parser.add_argument("--allowed-host", action="append", default=[],
                        help="another name clients reach the service by (the Host header); repeatable")
    parser.add_argument("--allowed-origin", action="append", default=[],
                        help="a web origin (https://example.org) whose pages may call the API; repeatable")
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard

    args = build_parser().parse_args(argv)

    def body():
        import uvicorn

        from snaketune.serve import create_app, load_chat_model
        from snaketune.settings import ServiceSettings

        chat = load_chat_model(args, max_batch=args.max_batch, max_waiting=args.max_waiting)
        settings = ServiceSettings(api_key=os.environ.get(args.api_key_env) or None,
                                   max_body_bytes=args.max_body_bytes, max_tokens_limit=args.max_tokens_limit,
                                   max_context=args.max_context, host=args.host, allowed_hosts=args.allowed_host,
                                   allowed_origins=args.allowed_origin)
        print(f"serving {chat.name} on http://{args.host}:{args.port}/ (API at /v1, key "
              f"{'required' if settings.api_key else 'not required'})", file=sys.stderr, flush=True)
        # on SIGTERM, running streams get 3 s to end, then are cancelled (and their generations with them)
        uvicorn.run(create_app(chat, settings), host=args.host, port=args.port, log_level="info",
                    timeout_graceful_shutdown=3)

    return main_guard(body)


if __name__ == "__main__":
    sys.exit(main())
