"""Continuous batching: one thread owns the model and decodes every running request in one batch per step.

A request is prefilled alone when it is admitted, then joins the running batch at the next decoding step; it
leaves the batch when it stops (an end-of-turn token: ``stop``; its token budget: ``length``) or is cancelled
(a client that went away), so a finished or abandoned request never costs a step. The batch keeps one KV cache,
left-padded to a common length: a joining request's cache is padded to the batch's length (or the batch to its),
a leaving one's row is dropped and columns that are padding in every row are trimmed.

Callers never wait on a thread of their own: each request carries a callback the engine calls with its events
(``("text", piece)``, ``("done", finish_reason)``, ``("error", message)``); the HTTP service hands them to its
event loop, the terminal chat to a queue.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 0: only the most likely token (greedy)
    seed: int | None = None


@dataclass
class Request:
    """One generation: its prompt ids, sampling, and where its events go."""

    prompt: list[int]
    sampling: SamplingSettings
    emit: Callable[[tuple[str, object]], None]
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    sent: str = ""  # the text emitted so far
    generator: object = None  # torch.Generator of a sampled request
    extra: dict = field(default_factory=dict)  # the prefill's inputs beside the ids (an image's pixel values)

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)  # an end-of-turn token included: it was generated

    def cancel(self) -> None:
        self.cancelled.set()


class QueueFull(Exception):
    """More requests wait than the engine accepts; try again later."""


class Engine:
    """Runs requests on ``model`` in a batch that requests join and leave at every decoding step."""

    def __init__(self, model, tokenizer, device, max_batch: int = 32, max_waiting: int = 256):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        # Qwen2-VL's positions after an image are not the count of tokens: its prefill leaves the difference
        # (rope_deltas) on the module that computes positions, and each decoding step of that request is placed
        # that much earlier. Text models have no such module.
        self.rope_holder = next((module for module in model.modules() if hasattr(module, "rope_deltas")), None)
        self.max_batch, self.max_waiting = max_batch, max_waiting
        ids = model.generation_config.eos_token_id
        self.eos = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos.add(tokenizer.eos_token_id)
        self.waiting: collections.deque[Request] = collections.deque()
        self.wakeup = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.tokenizer_lock = threading.Lock()  # fast tokenizers must not be used by two threads at once
        # the batch: requests, their KV cache (left-padded), padding and token counts per row, next input tokens
        self.batch: list[Request] = []
        self.cache = None
        self.padding: list[int] = []
        self.lengths: list[int] = []
        self.offsets: list[int] = []  # each row's position offset (rope_offset)
        self.next_tokens: list[int] = []
        self.steps = 0  # decoding steps run
        self.cancelled = 0  # requests given up on by their clients (or cancelled at shutdown)

    # -- what callers use ---------------------------------------------------------------------------------
    def start(self) -> Engine:
        self.running = True
        self.thread = threading.Thread(target=self.loop, name="snaketune-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Cancel every request (each gets its ``done`` event) and end the engine thread."""
        with self.wakeup:
            self.running = False
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def cancel_all(self) -> None:
        """Cancel every running and waiting request: each ends at the engine's next step."""
        with self.wakeup:
            for request in [*self.batch, *self.waiting]:
                request.cancel()
            self.wakeup.notify()

    def submit(self, request: Request) -> None:
        with self.wakeup:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(request)
            self.wakeup.notify()

    def encode(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return len(self.batch), len(self.waiting)

    # -- the engine thread ----------------------------------------------------------------------------------
    def loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self.wakeup:
                    while self.running and not self.waiting and not self.batch:
                        self.wakeup.wait(timeout=1.0)
                    if not self.running:
                        break
                    gone = [request for request in self.waiting if request.cancelled.is_set()]
                    if gone:  # clients that left while waiting free their places in the queue
                        self.waiting = collections.deque(r for r in self.waiting if not r.cancelled.is_set())
                    admitted = []
                    while self.waiting and len(self.batch) + len(admitted) < self.max_batch:
                        admitted.append(self.waiting.popleft())
                for request in gone:
                    self.finish(request, "cancelled")
                for request in admitted:
                    if request.cancelled.is_set():
                        self.finish(request, "cancelled")
                        continue
                    try:
                        self.prefill(request)
                    except Exception as exc:  # this request hears of it; the batch goes on
                        self.fail([request], exc)
                try:
                    self.drop_finished()
                    if self.batch:
                        self.decode()
                        self.drop_finished()
                except Exception as exc:  # every running request hears of it; the engine goes on
                    self.fail(self.batch, exc)
                    self.reset_batch()
        for request in self.batch + list(self.waiting):
            if request.finish_reason is None:
                self.finish(request, "cancelled")
        self.waiting.clear()
        self.reset_batch()

    def fail(self, requests: list[Request], exc: Exception) -> None:
        for request in requests:
            if request.finish_reason is None:
                request.finish_reason = "error"
                request.emit(("error", f"generation failed: {exc}"))

    def reset_batch(self) -> None:
        self.batch, self.cache, self.padding, self.lengths, self.next_tokens = [], None, [], [], []
        self.offsets = []

    def rope_offset(self) -> int:
        """The position offset the last prefill left on the model (Qwen2-VL's ``rope_deltas``), else 0."""
        deltas = getattr(self.rope_holder, "rope_deltas", None)
        return 0 if deltas is None else int(deltas.reshape(-1)[0])

    def prefill(self, request: Request) -> None:
        """Run the prompt alone, pick the first token, and add the request to the batch."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        extra = {key: value.to(self.device) for key, value in request.extra.items()}
        output = self.model(torch.tensor([request.prompt], device=self.device), past_key_values=cache,
                            use_cache=True, logits_to_keep=1, **extra)
        token = self.sample(request, output.logits[0, -1])
        self.join(output.past_key_values, len(request.prompt))
        self.batch.append(request)
        self.lengths.append(len(request.prompt))
        self.offsets.append(self.rope_offset())
        self.next_tokens.append(token)
        self.accept(request, token)

    def join(self, cache, length: int) -> None:
        """Append one row's cache to the batch's, left-padding whichever is shorter."""
        import torch
        from transformers import DynamicCache

        if self.cache is None:
            self.cache, self.padding = cache, [0]
            return
        total = self.padding[0] + self.lengths[0]
        pad = torch.nn.functional.pad
        merged = DynamicCache()
        for index, (mine, theirs) in enumerate(zip(self.cache.layers, cache.layers, strict=True)):
            keys, values = mine.keys, mine.values
            if length > total:
                keys, values = pad(keys, (0, 0, length - total, 0)), pad(values, (0, 0, length - total, 0))
            row_keys, row_values = theirs.keys, theirs.values
            if length < total:
                row_keys = pad(row_keys, (0, 0, total - length, 0))
                row_values = pad(row_values, (0, 0, total - length, 0))
            merged.update(torch.cat([keys, row_keys]), torch.cat([values, row_values]), index)
        if length > total:
            self.padding = [p + length - total for p in self.padding]
        self.cache = merged
        self.padding.append(max(total - length, 0))

    def decode(self) -> None:
        """One step for every request in the batch."""
        import torch

        total = self.padding[0] + self.lengths[0]
        mask = torch.ones(len(self.batch), total + 1, dtype=torch.long, device=self.device)
        for row, padding in enumerate(self.padding):
            mask[row, :padding] = 0
        positions = [[n + offset] for n, offset in zip(self.lengths, self.offsets, strict=True)]
        output = self.model(torch.tensor([[t] for t in self.next_tokens], device=self.device),
                            past_key_values=self.cache, attention_mask=mask, use_cache=True,
                            position_ids=torch.tensor(positions, device=self.device))
        self.cache = output.past_key_values
        self.steps += 1
        logits = output.logits[:, -1]
        greedy = logits.argmax(-1).tolist()  # one device sync for the whole batch
        for row, request in enumerate(self.batch):
            self.lengths[row] += 1
            if request.finish_reason is not None:
                continue
            token = greedy[row] if self.is_greedy(request) else self.sample(request, logits[row])
            self.next_tokens[row] = token
            self.accept(request, token)

    def drop_finished(self) -> None:
        """Take finished and cancelled requests out of the batch; trim padding no row needs any more."""
        import torch

        for request in self.batch:
            if request.finish_reason is None and request.cancelled.is_set():
                self.finish(request, "cancelled")
        keep = [row for row, request in enumerate(self.batch) if request.finish_reason is None]
        if len(keep) == len(self.batch):
            return
        if not keep:
            self.reset_batch()
            return
        trim = min(self.padding[row] for row in keep)
        index = torch.tensor(keep, device=self.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
            layer.values = layer.values.index_select(0, index)[:, :, trim:]
        self.batch = [self.batch[row] for row in keep]
        self.padding = [self.padding[row] - trim for row in keep]
        self.lengths = [self.lengths[row] for row in keep]
        self.offsets = [self.offsets[row] for row in keep]
        self.next_tokens = [self.next_tokens[row] for row in keep]

    @staticmethod
    def is_greedy(request: Request) -> bool:
        return request.sampling.temperature == 0 or request.sampling.top_p == 0

    def sample(self, request: Request, logits) -> int:
        import torch

        sampling = request.sampling
        if self.is_greedy(request):
            return int(logits.argmax())
        probabilities = torch.softmax(logits.float() / sampling.temperature, dim=-1)
        if sampling.top_p < 1:
            ordered, order = probabilities.sort(descending=True)
            outside = ordered.cumsum(-1) - ordered > sampling.top_p  # keep the smallest set reaching top_p
            ordered[outside] = 0
            probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
        if request.generator is None:
            request.generator = torch.Generator(device=logits.device)
            if sampling.seed is not None:
                request.generator.manual_seed(sampling.seed)
            else:
                request.generator.seed()
        return int(torch.multinomial(probabilities, 1, generator=request.generator))

    def accept(self, request: Request, token: int) -> None:
        """Record a generated token; emit the text it completes; finish at an end token or the budget."""
        request.generated.append(token)
        if token in self.eos:  # skipped when decoding (a special token), counted in usage
            self.finish(request, "stop")
            return
        self.emit_text(request)
        if len(request.generated) >= request.sampling.max_new_tokens:
            self.finish(request, "length")

    def emit_text(self, request: Request, final: bool = False) -> None:
        with self.tokenizer_lock:
            text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return  # a character split over tokens: wait for its next token
        if len(text) > len(request.sent) and text.startswith(request.sent):
            request.emit(("text", text[len(request.sent):]))
            request.sent = text

    def finish(self, request: Request, reason: str) -> None:
        if request.finish_reason is not None:
            return
        if reason != "cancelled":
            self.emit_text(request, final=True)
        else:
            self.cancelled += 1
        request.finish_reason = reason
        request.emit(("done", reason))
