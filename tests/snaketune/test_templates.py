"""Loss masks: only assistant tokens (and the end-of-turn token) are trained on, byte-exact with the template."""

import pytest

from snaketune.data import DatasetSettings, encode_record
from snaketune.errors import UserError
from snaketune.formats import Record
from snaketune.templates import IGNORE_INDEX, encode_conversation, render

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "你叫什么名字？"},
    {"role": "assistant", "content": "我是 Snaky。"},
    {"role": "user", "content": "Who made you?"},
    {"role": "assistant", "content": "The snaketune team built me."},
]


def test_rendering_is_chatml_byte_for_byte(tiny_tokenizer):
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION)
    assert render(tiny_tokenizer, CONVERSATION) == expected
    assert render(tiny_tokenizer, CONVERSATION[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_only_assistant_turns_and_their_terminator_are_supervised(tiny_tokenizer):
    encoded = encode_conversation(tiny_tokenizer, CONVERSATION, max_length=512)
    spans, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tiny_tokenizer.decode(current))
            current = []
    spans.append(tiny_tokenizer.decode(current))
    assert spans == ["我是 Snaky。<|im_end|>\n", "The snaketune team built me.<|im_end|>\n"]
    assert encoded.eos_supervised and not encoded.truncated


def test_tokens_match_tokenizing_the_rendered_text(tiny_tokenizer):
    encoded = encode_conversation(tiny_tokenizer, CONVERSATION, max_length=512)
    whole = tiny_tokenizer(render(tiny_tokenizer, CONVERSATION), add_special_tokens=False)["input_ids"]
    assert encoded.input_ids == whole


def test_truncation_keeps_the_first_tokens_and_says_so(tiny_tokenizer):
    encoded = encode_conversation(tiny_tokenizer, CONVERSATION, max_length=10)
    assert len(encoded.input_ids) == len(encoded.labels) == 10 and encoded.truncated


def test_template_whose_turns_do_not_end_in_eos_is_refused(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.eos_token = "<|endoftext|>"  # a base model's eos with a chat template: generation would never stop
    record = Record("r1", None, CONVERSATION[1:3], line=4)
    with pytest.raises(UserError, match=r"d\.jsonl:4: the chat template does not end assistant turns"):
        encode_record(tokenizer, record, DatasetSettings(path="d.jsonl", format="messages"))
