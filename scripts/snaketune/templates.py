"""Chat templates and loss masks.

The model's own chat template (``tokenizer.chat_template``) is the source of truth: the dataset stage renders
with it, and predict/serve render with it, so training and inference see byte-identical prompts. The registry
holds templates for models that ship none (the builtin tiny model gets ChatML from here).

Loss mask: the conversation is rendered once and tokenized once with character offsets; a token is supervised
when it starts inside an assistant turn, whose character span is found by rendering the conversation up to
that turn (with and without it). This works for any template whose renderings of a shorter conversation are
prefixes of the longer one, and it is checked, not assumed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

IGNORE_INDEX = -100

TEMPLATES: dict[str, str] = {}


def register_template(name: str, jinja: str) -> None:
    """Add a Jinja chat template to the registry under ``name``."""
    TEMPLATES[name] = jinja


# ChatML, as the Qwen2 family uses it: <|im_start|>{role}\n{content}<|im_end|>\n per message.
register_template(
    "chatml",
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
)


def template_sha256(tokenizer) -> str:
    """Hash of the chat template, stored with every dataset and adapter so drift is visible."""
    return hashlib.sha256((tokenizer.chat_template or "").encode("utf-8")).hexdigest()


def with_system(system: str | None, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + list(messages)


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    eos_supervised: bool

    @property
    def n_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class TemplateError(ValueError):
    """The chat template cannot produce a loss mask for this conversation."""


def assistant_spans(tokenizer, conversation: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``conversation`` and return the text with the character span of every assistant turn."""
    text = render(tokenizer, conversation)
    spans = []
    for index, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, conversation[:index], add_generation_prompt=True)
        through = render(tokenizer, conversation[: index + 1])
        if not text.startswith(before) or not text.startswith(through) or not through.startswith(before):
            raise TemplateError(
                "the chat template does not render a conversation's turns as prefixes of the whole; "
                "its assistant turns cannot be located for the loss mask"
            )
        spans.append((len(before), len(through)))
    return text, spans


def encode_conversation(tokenizer, conversation: list[dict[str, str]], max_length: int) -> Encoded:
    """Tokenize a conversation; labels are the token ids inside assistant turns and -100 elsewhere."""
    text, spans = assistant_spans(tokenizer, conversation)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for position, (start, _end) in enumerate(encoding["offset_mapping"]):
        if any(lo <= start < hi for lo, hi in spans):
            labels[position] = input_ids[position]
    supervised = [token for token, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX]
    eos_supervised = tokenizer.eos_token_id in supervised
    truncated = len(input_ids) > max_length
    return Encoded(input_ids[:max_length], labels[:max_length], truncated, eos_supervised)
