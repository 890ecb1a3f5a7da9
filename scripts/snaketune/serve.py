"""Talk to a trained model: a chat session (the terminal CLI uses it) and an OpenAI-compatible HTTP service.

The service speaks the chat-completions API (``POST /v1/chat/completions``, streaming as server-sent events or
not; ``GET /v1/models``) and serves a small chat page at ``/``. One model, one generation at a time: requests
wait their turn in a queue (a lock) instead of competing for the GPU. With an API key set, every ``/v1`` request
needs ``Authorization: Bearer <key>``. Bad requests get a 4xx JSON error in OpenAI's shape.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PAGE = Path(__file__).with_name("chat_page.html")


@dataclass
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0


class ChatModel:
    """A model, its tokenizer and chat template, generating one request at a time."""

    def __init__(self, model_dir: Path, adapter_dir: Path | None = None, trust_remote_code: bool = False,
                 name: str | None = None):
        import torch

        from snaketune.predict import load_for_generation
        from snaketune.templates import ChatTemplate

        self.tokenizer, self.model = load_for_generation(model_dir, adapter_dir, trust_remote_code)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.template = ChatTemplate.of(self.tokenizer)
        self.name = name or (adapter_dir or model_dir).name
        self.lock = threading.Lock()

    def prompt_ids(self, messages: list[dict[str, str]]):
        text = self.template.render(messages, add_generation_prompt=True)
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)

    def stream(self, messages: list[dict[str, str]], sampling: SamplingSettings) -> Iterator[str]:
        """Yield the answer piece by piece as it is generated (waits for the model to be free first)."""
        from transformers import TextIteratorStreamer

        inputs = self.prompt_ids(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        options = {"do_sample": sampling.temperature > 0}
        if sampling.temperature > 0:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p)
        failure = []

        def run():
            try:
                self.model.generate(**inputs, max_new_tokens=sampling.max_new_tokens, streamer=streamer,
                                    pad_token_id=self.tokenizer.pad_token_id, **options)
            except Exception as exc:  # reported to the caller, never a dead thread and a hung stream
                failure.append(exc)
                streamer.end()

        with self.lock:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            yield from (piece for piece in streamer if piece)
            worker.join()
        if failure:
            raise failure[0]

    def complete(self, messages: list[dict[str, str]], sampling: SamplingSettings) -> str:
        return "".join(self.stream(messages, sampling)).strip()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Conversation:
    """Multi-turn history for the terminal chat: ``/reset`` keeps only the system prompt."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, chat: ChatModel, text: str, sampling: SamplingSettings) -> Iterator[str]:
        self.messages.append({"role": "user", "content": text})
        answer = []
        for piece in chat.stream(self.messages, sampling):
            answer.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(answer).strip()})


# -- the HTTP service ---------------------------------------------------------------------------------------
@dataclass
class ServiceSettings:
    api_key: str | None = None
    max_body_bytes: int = 1_000_000
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def parse_request(body: bytes, settings: ServiceSettings) -> tuple[list[dict[str, str]], SamplingSettings, bool]:
    """Validate a chat-completions body; every problem is a RequestError naming the field."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise RequestError(400, "the body must be a JSON object")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "`messages` is required: a non-empty list of {role, content}")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(400, f"`messages[{index}].role` must be system, user or assistant")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI's content parts: keep the text ones
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise RequestError(400, f"`messages[{index}].content` must be a string")
        clean.append({"role": message["role"], "content": content})
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens", settings.default_max_tokens))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise RequestError(400, "`max_tokens` must be a positive integer")
    if max_tokens > settings.max_tokens_limit:
        raise RequestError(400, f"`max_tokens` {max_tokens} is above this service's limit of "
                                f"{settings.max_tokens_limit}")
    temperature, top_p = request.get("temperature", 0.0), request.get("top_p", 1.0)
    for name, value, high in (("temperature", temperature, 2.0), ("top_p", top_p, 1.0)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= high:
            raise RequestError(400, f"`{name}` must be a number from 0 to {high}")
    stream = request.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "`stream` must be true or false")
    return clean, SamplingSettings(max_tokens, float(temperature), float(top_p or 1.0)), stream


def error_body(error: RequestError) -> dict:
    return {"error": {"message": error.message, "type": error.kind, "code": error.status}}


def create_app(chat: ChatModel, settings: ServiceSettings):
    """The Starlette application: API routes, key check, size limit, and the chat page."""
    from starlette.applications import Starlette
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    def fail(error: RequestError) -> JSONResponse:
        return JSONResponse(error_body(error), status_code=error.status)

    def authorized(request: Request) -> bool:
        if not settings.api_key:
            return True
        return request.headers.get("authorization", "") == f"Bearer {settings.api_key}"

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise RequestError(413, f"the body is larger than {settings.max_body_bytes} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise RequestError(413, f"the body is larger than {settings.max_body_bytes} bytes")
        return body

    async def models(request: Request):
        if not authorized(request):
            return fail(RequestError(401, "missing or wrong API key", "authentication_error"))
        return JSONResponse({"object": "list", "data": [{"id": chat.name, "object": "model", "created": 0,
                                                         "owned_by": "snaketune"}]})

    async def completions(request: Request):
        if not authorized(request):
            return fail(RequestError(401, "missing or wrong API key", "authentication_error"))
        try:
            messages, sampling, stream = parse_request(await read_body(request), settings)
        except RequestError as error:
            return fail(error)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": ident, "created": created, "model": chat.name}
        if not stream:
            text = await run_in_threadpool(chat.complete, messages, sampling)
            prompt_tokens = int(chat.prompt_ids(messages)["input_ids"].shape[1])
            completion_tokens = chat.count_tokens(text)
            return JSONResponse({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}})

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            async for piece in iterate_in_threadpool(chat.stream(messages, sampling)):
                yield chunk({"content": piece})
            yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def page(request: Request):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def not_found(request: Request, exc):
        return fail(RequestError(404, f"no route {request.url.path}", "not_found_error"))

    async def wrong_method(request: Request, exc):
        return fail(RequestError(405, f"{request.method} is not allowed on {request.url.path}"))

    return Starlette(routes=[Route("/", page), Route("/v1/models", models),
                             Route("/v1/chat/completions", completions, methods=["POST"])],
                     exception_handlers={404: not_found, 405: wrong_method})


def add_model_arguments(parser) -> None:
    """--run (with --configfile), or --model, or --model-manifest with --adapter: which model to talk to."""
    from snaketune.cli import model_source_arguments

    model_source_arguments(parser).add_argument(
        "--run", help="a run of the workflow's config: the model its predictions came from (shared jobs included)")
    parser.add_argument("--configfile", default="config/config.yaml",
                        help="the workflow config --run is looked up in (as given to snakemake); paths are "
                             "relative to the working directory, as in the workflow")
    parser.add_argument("--name", help="the model name the service reports (default: the run or folder name)")


def run_model(run: str, configfile: str | Path) -> dict[str, Path]:
    """What the workflow built for ``run`` to predict with (layout.Layout.run_model), checked to exist."""
    import yaml

    from snaketune.config import load
    from snaketune.errors import UserError
    from snaketune.layout import Layout

    configfile = Path(configfile)
    if not configfile.is_file():
        raise UserError(f"--configfile: `{configfile}` not found (--run looks the run up in the workflow's config)")
    cfg = load(yaml.safe_load(configfile.read_text(encoding="utf-8")) or {}, [configfile])
    if run not in cfg.runs:
        raise UserError(f"--run: `{run}` is not a run of {configfile} (runs: {', '.join(cfg.runs)})")
    found = {key: Path(path) for key, path in Layout(cfg).run_model(run).items()}
    missing = [str(path) for path in found.values() if not path.exists()]
    if missing:
        raise UserError(f"run `{run}` is not built yet ({', '.join(missing)} missing); build it with "
                        f"`snakemake --profile profiles/local --configfile {configfile} {' '.join(missing)}`")
    return found


def load_chat_model(args) -> ChatModel:
    """The ChatModel the command line names; a missing model is a UserError saying what to run."""
    from snaketune.cli import model_source
    from snaketune.download import model_path
    from snaketune.errors import UserError
    from snaketune.gpus import claim

    claim(1)
    if args.run:
        found = run_model(args.run, args.configfile)
        if "model" in found:
            return ChatModel(found["model"], name=args.name or args.run)
        folder, trust = model_path(found["manifest"])
        return ChatModel(folder, found["adapter"], trust, name=args.name or args.run)
    folder, trust, adapter = model_source(args)
    if adapter is None and not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not a model folder (no config.json)")
    return ChatModel(folder, adapter, trust, name=args.name)
