"""Chat templates and loss masks.

A dataset names its template: ``auto`` (default) uses the tokenizer's own ``chat_template``; a registry name
(``chatml``, ``qwen``, ``qwen2.5``, ``baichuan2``, ``llama3``, ``internlm2``) uses the model family's published
format, written here as Jinja. The chosen template is stored with the dataset and saved into the trained model's
tokenizer, so training, prediction and chat render byte-identical prompts.

Loss mask: the conversation is rendered once and tokenized once with character offsets; a token is supervised
when it starts inside an assistant turn, whose character span is found by rendering the conversation up to
that turn (with and without it). Every assistant turn is supervised, its end-of-turn token included. This works
for any template whose renderings of a shorter conversation are prefixes of the longer one, and it is checked,
not assumed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from itertools import chain
from typing import Any

IGNORE_INDEX = -100

TEMPLATES: dict[str, str] = {}
SPECIAL_TOKENS: dict[str, list[str]] = {}  # tokens each registry template needs as single tokenizer tokens


def register_template(name: str, jinja: str, special_tokens: list[str]) -> None:
    """Add a Jinja chat template to the registry under ``name``."""
    TEMPLATES[name] = jinja
    SPECIAL_TOKENS[name] = special_tokens


def _chatml(default_system: str | None, bos: bool = False) -> str:
    """ChatML: <|im_start|>{role}\\n{content}<|im_end|>\\n per message (Qwen, Qwen2/2.5, InternLM2)."""
    head = "{{- bos_token }}" if bos else ""
    if default_system:
        head += ("{%- if messages[0]['role'] != 'system' %}"
                 f"{{{{- '<|im_start|>system\\n{default_system}<|im_end|>\\n' }}}}"
                 "{%- endif %}")
    return (head + "{%- for message in messages %}"
            "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
# Plain ChatML, no default system prompt (the builtin tiny model uses it).
register_template("chatml", _chatml(None), CHATML_TOKENS)
# Qwen-1 chat (Qwen-14B-Chat's make_context) and Qwen2-Instruct: a default system prompt when a row has none.
register_template("qwen", _chatml("You are a helpful assistant."), CHATML_TOKENS)
register_template("qwen2.5", _chatml("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
                  CHATML_TOKENS)
# InternLM2-chat: ChatML after the bos token.
register_template("internlm2", _chatml(None, bos=True), ["<s>", *CHATML_TOKENS])
# Baichuan2-Chat: system text first, <reserved_106> before a user turn, <reserved_107> before an assistant turn,
# which ends with the eos token.
register_template(
    "baichuan2",
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{- '<reserved_107>' + message['content'] + eos_token }}"
    "{%- else %}{{- '<reserved_106>' + message['content'] }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<reserved_107>' }}{%- endif %}",
    ["<reserved_106>", "<reserved_107>"],
)
# Llama 3 instruct: header tokens around the role, content trimmed, <|eot_id|> ends every turn.
register_template(
    "llama3",
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
    ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
)
TEMPLATE_NAMES = ("auto", *TEMPLATES)


class TemplateError(ValueError):
    """The chat template cannot be used, or cannot produce a loss mask for this conversation."""


def choose_template(tokenizer, name: str) -> str:
    """The Jinja source for template ``name`` with this tokenizer; checks the special tokens it needs exist."""
    if name == "auto":
        if not tokenizer.chat_template:
            raise TemplateError("the tokenizer has no chat_template; set the dataset's `template` to one of "
                                + ", ".join(TEMPLATES))
        return tokenizer.chat_template
    if name not in TEMPLATES:
        raise TemplateError(f"template `{name}` is not one of {', '.join(TEMPLATE_NAMES)}")
    vocab = tokenizer.get_vocab()
    missing = [token for token in SPECIAL_TOKENS[name] if token not in vocab]
    if missing:
        raise TemplateError(f"template `{name}` needs tokens the tokenizer does not have: {', '.join(missing)} "
                            "(is this the right template for this model?)")
    return TEMPLATES[name]


def template_sha256(source: str | None) -> str:
    """Hash of a chat template's source, stored with every dataset and adapter so drift is visible."""
    return hashlib.sha256((source or "").encode("utf-8")).hexdigest()


def with_system(system: str | None, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + list(messages)


@lru_cache(maxsize=16)
def _compiled(source: str):
    """Compile a template once, in a sandbox, the way transformers renders chat templates."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


class ChatTemplate:
    """A chat template bound to a tokenizer's special tokens: renders conversations and encodes loss masks."""

    fast = True  # encode_batch's shortcuts (layouts, token bytes); False: the per-prefix reference, for the tests

    def __init__(self, tokenizer, source: str):
        self.tokenizer = tokenizer
        self.source = source
        self.template = _compiled(source)
        self.context = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self.context.setdefault("bos_token", tokenizer.bos_token or "")
        self.context.setdefault("eos_token", tokenizer.eos_token or "")
        # The template's globals as a plain dict: Jinja keeps them as a ChainMap and copies it, key by key in
        # Python, on every render; a dict of the same items renders the same text at a fraction of the cost.
        self.globals = dict(self.template.globals)
        self.layouts: dict[tuple[str, ...], Layout | None] = {}  # a conversation's roles -> how it renders
        self.token_bytes: TokenBytes | None | bool = False  # looked up on first use (False: not yet)

    @classmethod
    def of(cls, tokenizer, name: str = "auto") -> ChatTemplate:
        return cls(tokenizer, choose_template(tokenizer, name))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
               globals: dict[str, Any] | None = None) -> str:
        """What ``jinja2.Template.render`` gives (the same context and globals, the same error handling), without
        its per-call copy of the globals' ChainMap."""
        from jinja2.runtime import new_context

        template = self.template
        context = new_context(template.environment, template.name, template.blocks,
                              {**self.context, "messages": messages, "add_generation_prompt": add_generation_prompt},
                              globals=self.globals if globals is None else globals)
        try:
            return template.environment.concat(template.root_render_func(context))
        except Exception:
            template.environment.handle_exception()

    def assistant_spans(self, conversation: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """Render ``conversation``; return the text and the character span of every assistant turn."""
        text = self.render(conversation)
        spans = []
        for index, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            before = self.render(conversation[:index], add_generation_prompt=True)
            through = text if index == len(conversation) - 1 else self.render(conversation[: index + 1])
            if not text.startswith(before) or not text.startswith(through) or not through.startswith(before):
                raise TemplateError(
                    "the chat template does not render a conversation's turns as prefixes of the whole; "
                    "its assistant turns cannot be located for the loss mask"
                )
            spans.append((len(before), len(through)))
        return text, spans

    def layout(self, conversation: list[dict[str, str]]) -> Layout | None:
        """How conversations of this one's shape render (see ``Layout``), or None where a rendering of it must be
        taken as it comes: a message that is not exactly ``{"role", "content"}`` with non-empty text, a shape the
        template refuses, or a template that looks at the contents."""
        roles = []
        for message in conversation:
            if type(message) is not dict or len(message) != 2 or next(iter(message)) != "role":
                return None
            content = message.get("content")
            if type(message["role"]) is not str or type(content) is not str or not content:
                return None
            roles.append(message["role"])
        roles = tuple(roles)
        if roles not in self.layouts:
            self.layouts[roles] = Layout.probe(self, roles)
        return self.layouts[roles]

    def spans_batch(self, conversations: list[list[dict[str, str]]]) -> list[tuple[str, list[tuple[int, int]]]]:
        """``assistant_spans`` of every conversation. Where its shape has a layout, the conversation is rendered
        once (not once per prefix) and the spans come from the layout; a rendering that differs from the layout's
        text is taken per prefix."""
        spans = []
        for conversation in conversations:
            layout = self.layout(conversation) if self.fast else None
            if layout is not None:
                text = self.render(conversation)
                found = layout.apply(conversation)
                if found[0] == text:
                    spans.append(found)
                    continue
            spans.append(self.assistant_spans(conversation))
        return spans

    def __reduce__(self):
        """Pickled as its tokenizer and source (the compiled Jinja is not picklable): dataset workers get a copy."""
        return type(self), (self.tokenizer, self.source)

    def encode(self, conversations: list[list[dict[str, str]]], max_length: int) -> list[Encoded]:
        """Tokenize conversations in one batch; labels are the ids inside assistant turns, -100 elsewhere.

        The reference, row by row; ``encode_batch`` gives the same rows as arrays, many times faster."""
        rendered = [self.assistant_spans(conversation) for conversation in conversations]
        batch = self.tokenizer([text for text, _ in rendered], add_special_tokens=False,
                               return_offsets_mapping=True)
        return [masked(ids, offsets, spans, self.tokenizer.eos_token_id, max_length)
                for ids, offsets, (_, spans) in zip(batch["input_ids"], batch["offset_mapping"], rendered,
                                                    strict=True)]

    def encode_batch(self, conversations: list[list[dict[str, str]]], max_length: int) -> EncodedBatch:
        """``encode`` as flat arrays for a whole batch: one Rust tokenizer call, the mask computed with numpy over
        every token at once, no Python int per token. Also returns each conversation's prompt (its rendering up to
        the last assistant turn, which ``assistant_spans`` rendered already)."""
        rendered = self.spans_batch(conversations)
        texts = [text for text, _ in rendered]
        if self.token_bytes is False:
            self.token_bytes = TokenBytes.of(self.tokenizer)
        ids, starts, lengths = tokenize_with_starts(self.tokenizer, texts, self.token_bytes if self.fast else None)
        spans = [spans for _, spans in rendered]
        labels = batch_labels(ids, starts, lengths, spans, max(map(len, texts), default=0) + 1)
        prompts = [text[: row_spans[-1][0]] if row_spans and conversation[-1]["role"] == "assistant"
                   else self.render(conversation[:-1], add_generation_prompt=True)
                   for text, row_spans, conversation in zip(texts, spans, conversations, strict=True)]
        return EncodedBatch.cut(ids, labels, lengths, max_length, self.tokenizer.eos_token_id, prompts)


    def encode_pairs(self, conversations: list[list[dict[str, str]]], rejected: list[str],
                     max_length: int) -> list[Pair]:
        """Preference pairs: each conversation ends on its chosen answer; ``rejected`` holds the other answers.

        The prompt is the conversation before the last answer, rendered with the generation prompt; the chosen and
        rejected completions are the tokens of each whole rendering that start at or after the prompt's end. Both
        renderings must tokenize the prompt alike (checked). Completions are cut to ``max_length`` with the prompt
        (the prompt is kept whole, as the model reads it when it predicts).
        """
        texts, cuts = [], []
        for conversation, answer in zip(conversations, rejected, strict=True):
            prompt = self.render(conversation[:-1], add_generation_prompt=True)
            pair = (self.render(conversation), self.render(conversation[:-1] + [{"role": "assistant",
                                                                                   "content": answer}]))
            if not all(text.startswith(prompt) for text in pair):
                raise TemplateError("the chat template does not render the prompt as a prefix of the conversation; "
                                    "the answers of a preference pair cannot be located")
            texts += pair
            cuts.append(len(prompt))
        batch = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        pairs = []
        for index, cut in enumerate(cuts):
            ids, offsets = (batch[key][2 * index: 2 * index + 2] for key in ("input_ids", "offset_mapping"))
            split = [next((p for p, (start, _) in enumerate(o) if start >= cut), len(o)) for o in offsets]
            prompt_ids = list(ids[0][: split[0]])
            if list(ids[1][: split[1]]) != prompt_ids:
                raise TemplateError("the chosen and rejected renderings tokenize the prompt differently (a token "
                                    "spans the prompt's end)")
            room = max(max_length - len(prompt_ids), 0)
            chosen, other = list(ids[0][split[0]:]), list(ids[1][split[1]:])
            pairs.append(Pair(prompt_ids, chosen[:room], other[:room], len(chosen) > room or len(other) > room))
        return pairs


class Opaque(str):
    """A message's content while a template's layout is probed (``Layout.probe``): a str that notes any look at its
    text in ``Opaque.looked`` (a comparison, its length, a search, a slice, a conversion, any str method, markupsafe's
    escaping) and lets three things pass unnoted: being written out (``str()``, ``%s``, ``{}``), being joined to other
    text with ``+`` (the text joined is a probe too), and ``strip()`` (Jinja's ``trim``, as Llama 3's template does),
    which gives a probe that notes any look, its truth included. A template that renders probes without a look gives
    the same output for any contents, each put in as it is or stripped. (Text built by ``~`` or captured by a
    ``{% set %}`` block is plain text: a template that tests that could slip by, were it not that every row's whole
    rendering is still compared with its layout's.)"""

    looked = False
    stripped = False

    def __str__(self):
        return self

    def __bool__(self):  # a layout is used only for conversations whose contents are all non-empty
        if self.stripped:
            Opaque.looked = True
        return True

    def __format__(self, spec):
        if spec:
            Opaque.looked = True
        return str.__format__(self, spec)

    def __add__(self, other):  # joined text stays a probe, so a look at it is noted too
        return self.joined(str.__add__(self, other), other)

    def __radd__(self, other):
        if not isinstance(other, str):
            return NotImplemented
        return self.joined(str.__add__(other, self), other)

    def joined(self, text: str, other) -> Opaque:
        joined = Opaque(text)
        joined.stripped = self.stripped or getattr(other, "stripped", False)
        return joined

    def strip(self, chars=None):
        if chars is not None or self.stripped:
            Opaque.looked = True
            return str.strip(self, chars)
        stripped = Opaque(str.strip(self))
        stripped.stripped = True
        return stripped

    @property
    def __html__(self):  # markupsafe asks for it before it escapes or wraps a string
        Opaque.looked = True
        raise AttributeError("__html__")


UNNOTED = {"__new__", "__init__", "__init_subclass__", "__subclasshook__", "__getattribute__", "__setattr__",
           "__delattr__", "__class__", "__str__", "__format__", "__add__", "__getnewargs__", "__reduce__",
           "__reduce_ex__", "__sizeof__", "__dir__", "__getstate__", "strip"}


def _noted(method):
    def noted(self, *args, **kwargs):
        Opaque.looked = True
        return method(self, *args, **kwargs)

    return noted


def _refused(self, *args):
    Opaque.looked = True
    raise TypeError("a probe is not a number")


for _name in dir(str):
    if _name not in UNNOTED and callable(getattr(str, _name)):
        setattr(Opaque, _name, _noted(getattr(str, _name)))
for _name in ("__int__", "__float__", "__complex__", "__index__", "__bytes__"):
    setattr(Opaque, _name, _refused)

# The probes of Layout.probe's two rounds. A long one holds what escaping, formatting, cutting or case changes would
# alter, and space around it that only strip() takes; a short one (one private-use character) shows any padding.
LONG_PROBE = "  \x00<probe {} of snaketune's layout> & {{{{x}}}} \"'\\\n  Ée\x00 \n"
PROBE_MARKS = ("\x00", "snaketune's layout", *map(chr, range(0xF0000, 0xF0100)))


@dataclass
class Layout:
    """How conversations of one shape (their roles, in order) render: the text as pieces, literal text or the
    content of message i (``i``, or ``~i`` stripped), and each assistant turn's span as its start and end (each the
    literal characters and the contents before it). Found once a shape by rendering ``Opaque`` probes for the
    contents, twice (long probes, then one-character ones), as ``assistant_spans`` renders: the whole and every
    prefix it needs. A layout exists only where the template never looked at a probe (so its output is the same for
    any contents, each put in as it is or stripped), every probe came out whole, both rounds agree, and every prefix
    is a prefix for any contents. Rows still render whole; one whose text differs is taken per prefix."""

    pieces: list[str | int]
    spans: list[tuple[int, tuple[int, ...], int, tuple[int, ...]]]

    @classmethod
    def probe(cls, template: ChatTemplate, roles: tuple[str, ...]) -> Layout | None:
        if len(roles) > 256:
            return None
        long = cls.probe_round(template, roles, [LONG_PROBE.format(index) for index in range(len(roles))])
        short = cls.probe_round(template, roles, [chr(0xF0000 + index) for index in range(len(roles))])
        if long is None or short is None or [unstripped(r) for r in long] != [unstripped(r) for r in short]:
            return None
        whole, turns = long[0], list(zip(long[1::2], long[2::2], strict=True))
        if not all(prefix_of(before, whole) and prefix_of(through, whole) and prefix_of(before, through)
                   for before, through in turns):
            return None
        return cls(whole, [(*reach(before), *reach(through)) for before, through in turns])

    @staticmethod
    def probe_round(template: ChatTemplate, roles: tuple[str, ...], marks: list[str]) -> list[list] | None:
        """The pieces of every rendering ``assistant_spans`` makes (the whole, then each assistant turn's before
        and through), with ``marks`` for the contents; None where the template looked, refused or changed a mark."""
        import re

        conversation = [{"role": role, "content": Opaque(mark)} for role, mark in zip(roles, marks, strict=True)]
        timed = []

        def strftime_now(fmt):  # a dated template: the date may change between rows, a layout would keep it
            timed.append(fmt)
            return template.globals["strftime_now"](fmt)

        probing = {**template.globals, **({"strftime_now": strftime_now} if "strftime_now" in template.globals
                                          else {})}
        Opaque.looked = False
        try:
            whole = template.render(conversation, globals=probing)
            texts = [whole]
            for index, role in enumerate(roles):
                if role == "assistant":
                    texts += [template.render(conversation[:index], True, probing),
                              whole if index == len(roles) - 1
                              else template.render(conversation[: index + 1], globals=probing)]
        except Exception:  # noqa: BLE001 - a shape the template refuses: its rows go per prefix, and fail there
            return None
        finally:
            looked, Opaque.looked = Opaque.looked, False
        if looked or timed:
            return None
        slots = {mark: index for index, mark in enumerate(marks)} | {
            mark.strip(): ~index for index, mark in enumerate(marks) if mark.strip() != mark}
        finder = re.compile("|".join(map(re.escape, sorted(slots, key=len, reverse=True))))
        rounds = []
        for text in texts:
            pieces, at = [], 0
            for match in finder.finditer(text):
                pieces += [text[at : match.start()], slots[match.group()]]
                at = match.end()
            pieces.append(text[at:])
            if any(isinstance(p, str) and any(mark in p for mark in PROBE_MARKS) for p in pieces):
                return None  # a probe came out changed (escaped, cut, trimmed on one side)
            rounds.append([p for p in pieces if p != ""])
        return rounds

    def apply(self, conversation: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """``assistant_spans``' answer for a conversation of this shape."""
        contents = [message["content"] for message in conversation]
        contents += [content.strip() for content in reversed(contents)]  # contents[~i]: content i stripped
        sizes = [len(content) for content in contents]
        text = "".join([contents[p] if type(p) is int else p for p in self.pieces])
        return text, [(start + sum([sizes[i] for i in start_slots]), end + sum([sizes[i] for i in end_slots]))
                      for start, start_slots, end, end_slots in self.spans]


def unstripped(pieces: list[str | int]) -> list[str | int]:
    """``pieces`` with stripped contents as plain ones: a one-character probe shows no stripping."""
    return [p if isinstance(p, str) or p >= 0 else ~p for p in pieces]


def prefix_of(head: list[str | int], pieces: list[str | int]) -> bool:
    """Whether ``head`` renders a prefix of ``pieces`` whatever the contents are."""
    if not head:
        return True
    if len(head) > len(pieces) or head[:-1] != pieces[: len(head) - 1]:
        return False
    last, other = head[-1], pieces[len(head) - 1]
    return last == other or (isinstance(last, str) and isinstance(other, str) and other.startswith(last))


def reach(pieces: list[str | int]) -> tuple[int, tuple[int, ...]]:
    """The length of a rendering: its literal characters, and the messages whose contents add theirs."""
    return sum(len(p) for p in pieces if isinstance(p, str)), tuple(p for p in pieces if isinstance(p, int))


@dataclass
class Pair:
    """A tokenized preference pair: the prompt and the two completions that follow it (each ending its turn)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    eos_supervised: bool
    length: int  # tokens before truncation

    @property
    def n_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def tokenize_with_starts(tokenizer, texts: list[str], token_bytes: TokenBytes | None = None):
    """Token ids, the character where each token starts (both flat over the batch) and tokens per text: the fast
    tokenizer's Rust encoder called straight, as transformers calls it (no special tokens added, no truncation or
    padding), without the per-row dicts transformers builds around it. With ``token_bytes`` (a byte-level
    tokenizer's), the tokenizer skips its offsets and the starts come from the tokens' bytes, where those are the
    texts' bytes exactly (checked); else from the offsets."""
    import numpy as np

    backend = tokenizer.backend_tokenizer
    if backend.truncation or backend.padding:  # transformers turns these off for a call that asks for neither
        backend = type(backend).from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    if token_bytes is not None and hasattr(backend, "encode_batch_fast"):
        encodings = backend.encode_batch_fast(texts, add_special_tokens=False)  # the same ids, no offsets
        lengths = np.fromiter(map(len, encodings), np.int64, len(encodings))
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.int64, int(lengths.sum()))
        starts, wrong = token_bytes.char_starts(ids, lengths, texts)
        if not wrong.any():
            return ids, starts, lengths
        # The texts whose tokens are not their bytes (a normalizer changed them, say): their starts from offsets.
        redo = np.flatnonzero(wrong)
        redone = tokenize_with_starts(tokenizer, [texts[index] for index in redo])
        first = np.cumsum(lengths) - lengths
        within = np.concatenate([np.arange(first[index], first[index] + lengths[index]) for index in redo])
        if np.array_equal(redone[2], lengths[redo]) and np.array_equal(redone[0], ids[within]):
            starts[within] = redone[1]
            return ids, starts, lengths
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter(map(len, encodings), np.int64, len(encodings))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.int64, total)
    offsets = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encodings)), np.int64, 2 * total)
    return ids, offsets[0::2], lengths


def _config_has(node, key: str, value) -> bool:
    """Whether a tokenizer.json section holds ``key: value`` anywhere inside."""
    if isinstance(node, dict):
        return node.get(key) == value or any(_config_has(child, key, value) for child in node.values())
    if isinstance(node, list):
        return any(_config_has(child, key, value) for child in node)
    return False


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """The byte-level alphabet reversed: the character a byte-level BPE writes for each byte -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


@dataclass
class TokenBytes:
    """The bytes each token of a byte-level BPE tokenizer stands for (GPT-2's scheme: Qwen, Llama 3, SmolLM2, the
    builtin model), so token starts need no offsets from the tokenizer.

    Such a tokenizer reports a token's start as the character that holds the token's first byte. When a batch's
    tokens, byte for byte, are exactly its texts (checked every batch: a normalizer that changed the text, an added
    token that took the spaces around it, an unknown token all fail it) and the tokenizer trims no offsets (checked
    once), the starts follow from the tokens' byte lengths: the same numbers, without the offsets' cost (their
    byte-to-character mapping in the tokenizer and a Python tuple per token here)."""

    blob: Any  # numpy uint8: every token's bytes end to end
    start: Any  # numpy int32 per token id: where its bytes begin in blob
    length: Any  # numpy int32 per token id: how many bytes (-1: an id with no known bytes)

    @classmethod
    def of(cls, tokenizer) -> TokenBytes | None:
        """The table for ``tokenizer``, or None where it is not a byte-level BPE that reports untrimmed offsets."""
        import numpy as np

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        config = json.loads(backend.to_str())
        if (not _config_has(config.get("pre_tokenizer"), "type", "ByteLevel")
                or not _config_has(config.get("decoder"), "type", "ByteLevel")
                or _config_has(config.get("post_processor"), "trim_offsets", True)):
            return None
        byte_of = _byte_of_char()
        tokens: dict[int, bytes] = {}
        for token, index in backend.get_vocab(with_added_tokens=False).items():
            if all(char in byte_of for char in token):
                tokens[index] = bytes(byte_of[char] for char in token)
        for index, added in backend.get_added_tokens_decoder().items():
            tokens[index] = added.content.encode("utf-8")
        size = max(tokens, default=-1) + 1
        length = np.full(size, -1, np.int32)
        start = np.zeros(size, np.int32)
        ordered = sorted(tokens.items())
        length[[index for index, _ in ordered]] = [len(data) for _, data in ordered]
        start[[index for index, _ in ordered]] = np.cumsum([0] + [len(data) for _, data in ordered])[:-1]
        blob = np.frombuffer(b"".join(data for _, data in ordered), np.uint8)
        return cls(blob, start, length)

    def char_starts(self, ids, lengths, texts: list[str]):
        """The character each token starts at within its text (flat, like ``ids``; ``lengths`` tokens a text), and
        which texts' tokens are not exactly their bytes (their starts are not given: the tokenizer's offsets are
        needed for those)."""
        import numpy as np

        # The usual batch, every text its tokens' bytes, in a few passes over the batch's bytes; any doubt goes to
        # the text by text check below.
        try:
            encoded = [text.encode("utf-8") for text in texts]
        except UnicodeEncodeError:
            return self.char_starts_checked(ids, lengths, texts)
        data = b"".join(encoded)
        if len(ids) == 0 or ids.min() < 0 or ids.max() >= len(self.length) or len(data) >= 2**31:
            return self.char_starts_checked(ids, lengths, texts)
        size = self.length[ids]
        ends = np.cumsum(size)
        if size.min() < 1 or not np.array_equal(np.concatenate([[0], ends])[np.cumsum(lengths)],
                                                np.cumsum([len(text) for text in encoded])):
            return self.char_starts_checked(ids, lengths, texts)
        byte_start = (ends - size).astype(np.int32)
        data = np.frombuffer(data, np.uint8)
        if not np.array_equal(self.blob[np.repeat(self.start[ids] - byte_start, size)
                                        + np.arange(len(data), dtype=np.int32)], data):
            return self.char_starts_checked(ids, lengths, texts)
        characters = np.fromiter(map(len, texts), np.int64, len(texts))
        text_start = np.repeat(np.cumsum(characters) - characters, lengths)
        if len(data) == characters.sum():  # ASCII: a byte is a character
            return byte_start - text_start, np.zeros(len(texts), bool)
        characters = np.cumsum((data & 0xC0) != 0x80, dtype=np.int32)  # UTF-8: one lead byte a character
        return characters[byte_start] - 1 - text_start, np.zeros(len(texts), bool)

    def char_starts_checked(self, ids, lengths, texts: list[str]):
        """``char_starts``, text by text: a text whose tokens are not its bytes is told, the others get starts."""
        import numpy as np

        known = (ids >= 0) & (ids < len(self.length))
        size = np.where(known, self.length[np.where(known, ids, 0)], -1)
        row = np.repeat(np.arange(len(texts)), lengths)
        wrong = np.zeros(len(texts), bool)
        wrong[row[size < 1]] = True
        size = np.maximum(size, 0)
        encoded = []
        for index, text in enumerate(texts):
            try:
                encoded.append(text.encode("utf-8"))
            except UnicodeEncodeError:  # a lone surrogate: the tokenizer's own path says what it makes of it
                encoded.append(b"")
                wrong[index] = True
        data = np.frombuffer(b"".join(encoded), np.uint8)
        text_bytes = np.fromiter(map(len, encoded), np.int64, len(texts))
        token_bytes = np.bincount(row, size, len(texts)).astype(np.int64)
        wrong |= token_bytes != text_bytes  # a text's tokens are its own bytes, not more, not fewer
        # Where each token's bytes lie in data, were they the text's: its text's start, then the tokens before it.
        before = np.cumsum(size) - size
        position = before - np.repeat(np.cumsum(token_bytes) - token_bytes - (np.cumsum(text_bytes) - text_bytes),
                                      lengths)
        check = ~wrong[row]
        checked_size, checked_position = size[check], position[check]
        within = np.arange(int(checked_size.sum())) - np.repeat(np.cumsum(checked_size) - checked_size, checked_size)
        differs = self.blob[np.repeat(self.start[ids[check]], checked_size) + within] != \
            data[np.repeat(checked_position, checked_size) + within]
        wrong[row[check][np.repeat(np.arange(len(checked_size)), checked_size)[differs]]] = True
        characters = np.concatenate([[0], np.cumsum((data & 0xC0) != 0x80)])  # UTF-8: one lead byte a character
        # A token starts at the character holding its first byte: the characters before the byte's, in its text.
        starts = characters[np.minimum(position + 1, len(data))] - 1 - np.repeat(
            characters[np.cumsum(text_bytes) - text_bytes], lengths)
        return starts, wrong


def batch_labels(ids, starts, lengths, spans: list[list[tuple[int, int]]], stride: int):
    """``masked``'s labels for a batch at once. Row r's characters are moved to r * stride on (stride: longer than
    any text), so one running maximum and one sorted search over all rows give what ``masked`` walks to row by row:
    the span a token's start has reached (the first whose end lies beyond the furthest start so far), and whether
    the token starts inside it."""
    import numpy as np

    row = np.repeat(np.arange(len(lengths)), lengths)
    where = starts + row * stride
    reached = np.maximum.accumulate(where)
    span_row = np.fromiter(chain.from_iterable([r] * len(s) for r, s in enumerate(spans)), np.int64)
    if not len(span_row):
        return np.full(len(ids), IGNORE_INDEX)
    flat = np.array([edge for row_spans in spans for span in row_spans for edge in span], np.int64).reshape(-1, 2)
    span_start, span_end = flat[:, 0] + span_row * stride, flat[:, 1] + span_row * stride
    # How many span ends each token's reach has passed: as the reach never falls, each span end is passed from one
    # token on, so a search of the few span ends among the tokens (not of every token among the span ends) does.
    index = np.cumsum(np.bincount(np.searchsorted(reached, span_end, side="left"), minlength=len(ids) + 1))[:-1]
    found = np.minimum(index, len(span_end) - 1)
    inside = (index < len(span_end)) & (span_row[found] == row) & (span_start[found] <= where)
    return np.where(inside, ids, IGNORE_INDEX)


@dataclass
class EncodedBatch:
    """A batch of encoded rows as arrays: the kept (truncated) tokens of every row end to end, and per row."""

    input_ids: Any  # numpy int32, every row's kept tokens end to end
    labels: Any
    row_starts: Any  # numpy int32, len rows + 1: row i is input_ids[row_starts[i]:row_starts[i + 1]]
    length: Any  # tokens before truncation
    n_supervised: Any
    truncated: Any
    eos_supervised: Any
    prompts: list[str]

    @classmethod
    def cut(cls, ids, labels, lengths, max_length: int, eos_token_id, prompts: list[str]) -> EncodedBatch:
        """Cut every row to ``max_length`` tokens; eos_supervised looks at the whole row, as ``masked`` does."""
        import numpy as np

        row = np.repeat(np.arange(len(lengths)), lengths)
        position = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        kept = position < max_length
        kept_lengths = np.minimum(lengths, max_length)
        supervised = (labels != IGNORE_INDEX) & kept
        eos = np.bincount(row[labels == eos_token_id], minlength=len(lengths)) > 0 if eos_token_id is not None \
            else np.zeros(len(lengths), bool)
        return cls(ids[kept].astype(np.int32), labels[kept].astype(np.int32),
                   np.concatenate([[0], np.cumsum(kept_lengths)]).astype(np.int32), lengths,
                   np.bincount(row[supervised], minlength=len(lengths)), lengths > max_length, eos, prompts)


def masked(input_ids, offsets, spans, eos_token_id, max_length: int) -> Encoded:
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (start, _end) in enumerate(offsets):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start:
            labels[position] = input_ids[position]
    eos_supervised = any(label == eos_token_id for label in labels)
    return Encoded(list(input_ids[:max_length]), labels[:max_length], len(input_ids) > max_length, eos_supervised,
                   len(input_ids))


def encode_text(tokenizer, texts: list[str], max_length: int) -> list[Encoded]:
    """Pretraining rows: every token (and a closing eos) is trained on."""
    batch = tokenizer(texts, add_special_tokens=False)
    encoded = []
    for ids in batch["input_ids"]:
        ids = list(ids) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        encoded.append(Encoded(ids[:max_length], ids[:max_length], len(ids) > max_length, True, len(ids)))
    return encoded


# Convenience for one conversation with the tokenizer's own template (tests, predict, chat).
def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return ChatTemplate.of(tokenizer).render(messages, add_generation_prompt)


def encode_conversation(tokenizer, conversation: list[dict[str, str]], max_length: int) -> Encoded:
    return ChatTemplate.of(tokenizer).encode([conversation], max_length)[0]


SYSTEM_PROBE, USER_PROBE = "SYSTEM-PROBE-7f3a", "USER-PROBE-7f3a"


def default_system(template: ChatTemplate) -> str | None:
    """The system prompt ``template`` puts into a conversation that has none (SmolLM2's and Qwen2.5's templates
    do), or None."""
    user = [{"role": "user", "content": USER_PROBE}]
    given = template.render([{"role": "system", "content": SYSTEM_PROBE}, *user], add_generation_prompt=True)
    alone = template.render(user, add_generation_prompt=True)
    if given.count(SYSTEM_PROBE) != 1:
        return None
    head, tail = given.split(SYSTEM_PROBE)
    if alone == given.replace(SYSTEM_PROBE, "") or not (alone.startswith(head) and alone.endswith(tail)):
        return None
    found = alone[len(head) : len(alone) - len(tail)]
    return found or None


def adopt_system(template: ChatTemplate, system: str) -> str:
    """The template's source with its default system prompt replaced by ``system``: a model trained with one
    system prompt then gets it whenever a conversation brings none (chat, serve, an Ollama Modelfile), instead of
    the base model's default, which may name another assistant. Unchanged when the template has no default or its
    default is not a plain string in the source (checked by rendering)."""
    default = default_system(template)
    if default is None or default == system or template.source.count(default) != 1:
        return template.source
    escaped = system.replace("\\", "\\\\").replace("'", "\\'").replace('"', '\\"')
    adopted = ChatTemplate(template.tokenizer, template.source.replace(default, escaped))
    user = [{"role": "user", "content": USER_PROBE}]
    try:
        same = adopted.render(user, True) == template.render([{"role": "system", "content": system}, *user], True)
    except Exception:  # noqa: BLE001 - a replacement that broke the template's syntax: keep the original
        same = False
    return adopted.source if same else template.source
