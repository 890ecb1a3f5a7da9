"""Talk to a trained model: a chat session (the terminal CLI uses it) and an OpenAI-compatible HTTP service.

The service speaks the chat-completions API (``POST /v1/chat/completions``, streaming as server-sent events or
not; ``GET /v1/models``) and serves a small chat page at ``/``. Generation runs in one engine thread that batches
every running request (snaketune/batching.py: continuous batching); request handlers only await the events the
engine sends them, so no client can tie up a worker thread. A client that goes away cancels its generation at
the next step. Limits answer in OpenAI's error shape: a prompt and ``max_tokens`` beyond the context (400), a full
queue (429 with Retry-After), a key (401), a page of another origin or a foreign Host header (403).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from snaketune.batching import Engine, QueueFull, Request, SamplingSettings
from snaketune.settings import ServiceSettings
from snaketune.vision import ImageProblem

PAGE = Path(__file__).with_name("chat_page.html")
__all__ = ["ChatModel", "Conversation", "SamplingSettings", "create_app"]


class ChatModel:
    """A model, its tokenizer and chat template, and the engine that generates for every caller at once."""

    def __init__(self, model_dir: Path, adapter_dir: Path | None = None, trust_remote_code: bool = False,
                 name: str | None = None, max_batch: int = 32, max_waiting: int = 256):
        import torch

        from snaketune.predict import load_for_generation
        from snaketune.templates import ChatTemplate
        from snaketune.vision import ImageInputs, takes_token_types

        tokenizer, model = load_for_generation(model_dir, adapter_dir, trust_remote_code)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(self.device)
        self.template = ChatTemplate.of(tokenizer)
        self.name = name or (adapter_dir or model_dir).name
        config = getattr(model.config, "text_config", None) or model.config
        self.context = getattr(config, "max_position_embeddings", None) or 2048
        self.vision = ImageInputs.of(model_dir, tokenizer)  # None: a text-only model, which refuses images
        self.token_types = self.vision is not None and takes_token_types(model)
        # a vision-language model answers one request at a time (its image prefill and position offsets were
        # tested alone); a text model batches as many as max_batch
        self.engine = Engine(model, tokenizer, self.device, max_batch=1 if self.vision else max_batch,
                             max_waiting=max_waiting).start()

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.prompt(messages)[0]

    def prompt(self, messages: list[dict[str, str]], images: list[str] = ()) -> tuple[list[int], dict]:
        """The prompt's ids and, with ``images`` (paths or data URLs, one per ``<image>`` in the messages), the
        model's image inputs for the prefill."""
        if not images:
            return self.engine.encode(self.template.render(messages, add_generation_prompt=True)), {}
        import torch

        from snaketune.vision import model_image_inputs, prompt_with_images, with_markers

        if self.vision is None:
            raise ValueError("this model is text-only: it takes no images")
        text = self.template.render(with_markers(messages, self.vision.family), add_generation_prompt=True)
        ids, decoded = prompt_with_images(self.vision, self.engine.encode(text), list(images))
        return ids, model_image_inputs(self.vision, torch.tensor([ids]), decoded, self.token_types)

    def stream(self, messages: list[dict[str, str]], sampling: SamplingSettings,
               images: list[str] = ()) -> Iterator[str]:
        """Yield the answer piece by piece as it is generated (for callers without an event loop)."""
        events: queue.Queue = queue.Queue()
        ids, extra = self.prompt(messages, images)
        request = Request(ids, sampling, events.put, extra=extra)
        self.engine.submit(request)
        try:
            while True:
                kind, value = events.get()
                if kind == "text":
                    yield value
                elif kind == "error":
                    raise RuntimeError(value)
                else:
                    return
        finally:
            request.cancel()  # a caller that stops reading frees the batch slot

    def complete(self, messages: list[dict[str, str]], sampling: SamplingSettings) -> str:
        return "".join(self.stream(messages, sampling)).strip()


@dataclass
class Conversation:
    """Multi-turn history for the terminal chat: ``/reset`` keeps only the system prompt."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # the conversation's images, in the order they were shown

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.images = []

    def ask(self, chat: ChatModel, text: str, sampling: SamplingSettings, image: str | None = None) -> Iterator[str]:
        """Ask ``text`` (with ``image``, a path or data URL, shown before it) and stream the answer."""
        if image is not None:
            from snaketune.vision import PLACEHOLDER

            text = PLACEHOLDER + text
            self.images.append(image)
        self.messages.append({"role": "user", "content": text})
        answer = []
        for piece in chat.stream(self.messages, sampling, self.images):
            answer.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(answer).strip()})


# -- the HTTP service ---------------------------------------------------------------------------------------
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def text_of(content, where: str, images: list[str] | None = None) -> str:
    """A message's text: a string, or OpenAI's content parts (``vision.content_parts``): text, and where ``images``
    collects them (a user turn's), image parts, each leaving ``<image>`` in the text. An image is a data URL only:
    the service reads no file and fetches nothing. Anything else is a 400."""
    from snaketune.vision import DATA_URL, ImageProblem, content_parts

    if isinstance(content, list):
        try:
            content, urls = content_parts(content, where)
        except ImageProblem as problem:
            raise RequestError(400, str(problem)) from None
        if urls and images is None:
            raise RequestError(400, f"`{where}`: only a user turn can hold images")
        if any(not DATA_URL.fullmatch(url) for url in urls):
            raise RequestError(400, f"`{where}`: an image_url's url must be a base64 data URL (data:image/png;base64,"
                                    "...): the service reads no server-side file and fetches no URL")
        images.extend(urls)
    if not isinstance(content, str):
        raise RequestError(400, f"`{where}` must be a string or a list of content parts")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, f"`{where}` holds a lone surrogate (\\ud800-\\udfff): not valid Unicode text") from None
    return content


def parse_request(body: bytes, settings: ServiceSettings, model_name: str):
    """Validate a chat-completions body; every problem is a RequestError naming the field."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise RequestError(400, "the body must be a JSON object")
    model = request.get("model", model_name)
    if model != model_name:
        raise RequestError(404, f"the model `{model}` does not exist; this service serves `{model_name}`",
                           code="model_not_found")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "`messages` is required: a non-empty list of {role, content}")
    clean, images = [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(400, f"`messages[{index}].role` must be system, user or assistant")
        clean.append({"role": message["role"], "content": text_of(
            message.get("content"), f"messages[{index}].content", images if message["role"] == "user" else None)})
    asked = request.get("max_completion_tokens", request.get("max_tokens"))
    max_tokens = min(settings.default_max_tokens, settings.max_tokens_limit) if asked is None else asked
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise RequestError(400, "`max_tokens` must be a positive integer")
    if max_tokens > settings.max_tokens_limit:
        raise RequestError(400, f"`max_tokens` {max_tokens} is above this service's limit of "
                                f"{settings.max_tokens_limit}")
    sampling = {}
    for name, default, high in (("temperature", 1.0, 2.0), ("top_p", 1.0, 1.0)):
        value = request.get(name)
        value = default if value is None else value  # OpenAI: null means the default
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= high:
            raise RequestError(400, f"`{name}` must be a number from 0 to {high}")
        sampling[name] = float(value)
    seed = request.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not -2**63 <= seed < 2**63):
        raise RequestError(400, "`seed` must be a 64-bit integer (-2^63 to 2^63-1)")
    stream = request.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "`stream` must be true or false")
    options = request.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "`stream_options` must be an object")
    return (clean, images), SamplingSettings(max_tokens, seed=seed, **sampling), stream, \
        bool(options.get("include_usage"))


def key_matches(header: str, key: str) -> bool:
    """Whether an Authorization header carries ``key``: the scheme in any case (RFC 9110: ``bearer`` is
    ``Bearer``), the key compared in constant time so its bytes cannot be guessed one by one from timings."""
    scheme, _, given = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def error_body(error: RequestError) -> dict:
    return {"error": {"message": error.message, "type": error.kind, "param": None,
                      "code": error.code or error.status}}


def browser_problem(headers, settings: ServiceSettings) -> str | None:
    """Why a request must be refused for a browser's sake (DNS rebinding, another site's page), or None."""
    host = headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    bound = settings.host
    if settings.allowed_hosts or bound not in ("0.0.0.0", "::"):
        allowed = set(settings.allowed_hosts) | {bound} | (LOOPBACK if bound in LOOPBACK else set())
        if name not in allowed:
            return (f"Host `{host}` is not this service's address ({', '.join(sorted(allowed))}); "
                    "add it with --allowed-host")
    origin = headers.get("origin")
    if origin and origin not in settings.allowed_origins and origin.split("://", 1)[-1] != host:
        return f"requests from pages of {origin} are not allowed; add it with --allowed-origin"
    return None


def create_app(chat: ChatModel, settings: ServiceSettings):
    """The Starlette application: API routes, browser and key checks, size and context limits, the chat page."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request as HttpRequest
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    context = settings.max_context or chat.context

    def fail(error: RequestError, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(error_body(error), status_code=error.status, headers=headers)

    def refused(request: HttpRequest) -> JSONResponse | None:
        problem = browser_problem(request.headers, settings)
        if problem:
            return fail(RequestError(403, problem, "permission_error"))
        if settings.api_key and not key_matches(request.headers.get("authorization", ""), settings.api_key):
            return fail(RequestError(401, "missing or wrong API key", "authentication_error"))
        return None

    async def read_body(request: HttpRequest) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise RequestError(413, f"the body is larger than {settings.max_body_bytes} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise RequestError(413, f"the body is larger than {settings.max_body_bytes} bytes")
        return body

    async def models(request: HttpRequest):
        return refused(request) or JSONResponse({"object": "list", "data": [
            {"id": chat.name, "object": "model", "created": 0, "owned_by": "snaketune"}]})

    async def completions(request: HttpRequest):
        refusal = refused(request)
        if refusal:
            return refusal
        try:
            (messages, images), sampling, stream, include_usage = parse_request(await read_body(request), settings,
                                                                                chat.name)
            if images and chat.vision is None:
                raise RequestError(400, f"`{chat.name}` is a text-only model: it takes no image parts")
            # rendering and tokenizing a long prompt (and decoding its images) takes a while: in a worker thread,
            # not on the event loop that serves every other request and stream
            try:
                prompt, extra = await asyncio.to_thread(chat.prompt, messages, images)
            except ImageProblem as problem:
                raise RequestError(400, f"an image part: {problem}") from None
            if len(prompt) + sampling.max_new_tokens > context:
                raise RequestError(400, f"this model's context is {context} tokens; the messages take {len(prompt)} "
                                        f"and max_tokens asks for {sampling.max_new_tokens} more",
                                   code="context_length_exceeded")
        except RequestError as error:
            return fail(error)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Request(prompt, sampling, lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                      extra=extra)
        try:
            chat.engine.submit(job)
        except QueueFull:
            running, waiting = chat.engine.load
            return fail(RequestError(429, f"the service is busy ({running} running, {waiting} waiting); retry "
                                          "shortly", "rate_limit_error", "busy"),
                        headers={"Retry-After": str(settings.retry_after_seconds)})
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": ident, "created": created, "model": chat.name}

        def usage() -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": job.completion_tokens,
                    "total_tokens": len(prompt) + job.completion_tokens}

        if not stream:
            pieces, checked = [], time.monotonic()
            try:
                while True:
                    try:
                        kind, value = await asyncio.wait_for(events.get(), timeout=0.25)
                    except TimeoutError:
                        kind, value = None, None
                    if time.monotonic() - checked > 0.25:  # has the client gone? (uvicorn notices on a read)
                        checked = time.monotonic()
                        if await request.is_disconnected():
                            return JSONResponse({}, status_code=499)  # nobody reads it
                    if kind is None:
                        continue
                    if kind == "text":
                        pieces.append(value)
                    elif kind == "error" or job.finish_reason == "cancelled":
                        message = value if kind == "error" else "the service is shutting down"
                        return fail(RequestError(500 if kind == "error" else 503, message, "server_error"))
                    else:
                        break
            finally:
                job.cancel()
            return JSONResponse({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                 "finish_reason": job.finish_reason}], "usage": usage()})

        def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            body = {**base, "object": "chat.completion.chunk", "choices": choices, **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def sent_events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await events.get()
                    if kind == "text":
                        yield chunk({"content": value})
                    elif kind == "error" or job.finish_reason == "cancelled":
                        message = value if kind == "error" else "the service is shutting down"
                        yield f"data: {json.dumps(error_body(RequestError(500, message, 'server_error')))}\n\n"
                        break
                    else:
                        yield chunk({}, job.finish_reason)
                        break
                if include_usage:
                    yield chunk(None, usage=usage())
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # a client that went away frees its batch slot at the next step

        return StreamingResponse(sent_events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def page(request: HttpRequest):
        problem = browser_problem(request.headers, settings)
        if problem:
            return fail(RequestError(403, problem, "permission_error"))
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def not_found(request: HttpRequest, exc):
        return fail(RequestError(404, f"no route {request.url.path}", "not_found_error"))

    async def wrong_method(request: HttpRequest, exc):
        return fail(RequestError(405, f"{request.method} is not allowed on {request.url.path}"))

    @asynccontextmanager
    async def lifespan(app):
        yield
        chat.engine.cancel_all()  # shutting down: what still runs ends at the next step

    return Starlette(routes=[Route("/", page), Route("/v1/models", models),
                             Route("/v1/chat/completions", completions, methods=["POST"])],
                     exception_handlers={404: not_found, 405: wrong_method}, lifespan=lifespan)


def add_model_arguments(parser) -> None:
    """--run (with --configfile), or --model, or --model-manifest with --adapter: which model to talk to."""
    from snaketune.cli import model_source_arguments

    model_source_arguments(parser).add_argument(
        "--run", help="a run of the workflow's config: the model its predictions came from (shared jobs included)")
    parser.add_argument("--configfile", nargs="+", default=[],
                        help="the workflow's config files --run is looked up in, as given to snakemake (default: "
                             "config/config.yaml); paths are relative to the working directory, as in the workflow")
    parser.add_argument("--name", help="the model name the service reports (default: the run or folder name)")


def run_model(run: str, configfiles: list[str | Path]) -> dict[str, Path]:
    """What the workflow built for ``run`` to predict with (layout.Layout.run_model), checked to exist."""
    import shlex

    from snaketune.config import DEFAULT_CONFIG, load_files
    from snaketune.errors import UserError
    from snaketune.layout import Layout

    files = [Path(path) for path in configfiles] or [DEFAULT_CONFIG]
    for path in files:
        if not path.is_file():
            raise UserError(f"--configfile: `{path}` not found (--run looks the run up in the workflow's config)")
    cfg = load_files(files)
    named = " ".join(shlex.quote(str(path)) for path in files)
    if run not in cfg.runs:
        raise UserError(f"--run: `{run}` is not a run of {named} (runs: {', '.join(cfg.runs)})")
    found = {key: Path(path) for key, path in Layout(cfg).run_model(run).items()}
    missing = [str(path) for path in found.values() if not path.exists()]
    if missing:
        raise UserError(f"run `{run}` is not built yet ({', '.join(missing)} missing); build it with "
                        f"`snakemake --profile profiles/local --configfile {named} {' '.join(missing)}`")
    return found


def load_chat_model(args, **engine) -> ChatModel:
    """The ChatModel the command line names; a missing model is a UserError saying what to run."""
    from snaketune.cli import model_source
    from snaketune.download import model_path
    from snaketune.errors import UserError
    from snaketune.train.distributed import claim

    claim(1)
    if args.run:
        found = run_model(args.run, args.configfile)
        if "model" in found:
            return ChatModel(found["model"], name=args.name or args.run, **engine)
        folder, trust = model_path(found["manifest"])
        return ChatModel(folder, found["adapter"], trust, name=args.name or args.run, **engine)
    folder, trust, adapter = model_source(args)
    if adapter is None and not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not a model folder (no config.json)")
    return ChatModel(folder, adapter, trust, name=args.name, **engine)
