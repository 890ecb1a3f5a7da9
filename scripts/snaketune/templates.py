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

    def __init__(self, tokenizer, source: str):
        self.tokenizer = tokenizer
        self.source = source
        self.template = _compiled(source)
        self.context = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self.context.setdefault("bos_token", tokenizer.bos_token or "")
        self.context.setdefault("eos_token", tokenizer.eos_token or "")

    @classmethod
    def of(cls, tokenizer, name: str = "auto") -> ChatTemplate:
        return cls(tokenizer, choose_template(tokenizer, name))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.context)

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
        rendered = [self.assistant_spans(conversation) for conversation in conversations]
        texts = [text for text, _ in rendered]
        ids, starts, lengths = tokenize_with_starts(self.tokenizer, texts)
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


def tokenize_with_starts(tokenizer, texts: list[str]):
    """Token ids, the character where each token starts (both flat over the batch) and tokens per text: the fast
    tokenizer's Rust encoder called straight, as transformers calls it (no special tokens added, no truncation or
    padding), without the per-row dicts transformers builds around it."""
    import numpy as np

    backend = tokenizer.backend_tokenizer
    if backend.truncation or backend.padding:  # transformers turns these off for a call that asks for neither
        backend = type(backend).from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter(map(len, encodings), np.int64, len(encodings))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.int64, total)
    offsets = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encodings)), np.int64, 2 * total)
    return ids, offsets[0::2], lengths


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
    index = np.searchsorted(span_end, reached, side="right")
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
