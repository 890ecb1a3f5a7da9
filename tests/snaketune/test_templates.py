"""Chat templates, token for token, and loss masks: every assistant turn and its end-of-turn token are trained on,
nothing else.

Each family's template is checked on a tokenizer built here with that family's special tokens (no download):
the expected ids are the family's published format written out piece by piece, each piece tokenized alone
(special tokens split text, so that is what the whole must give), and the expected mask marks the assistant pieces.
"""

import pytest

from snaketune.dataset import encode_records
from snaketune.errors import UserError
from snaketune.formats import Record
from snaketune.templates import IGNORE_INDEX, TEMPLATES, ChatTemplate, TemplateError, encode_conversation, render

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "你叫什么名字？"},
    {"role": "assistant", "content": "我是 Snaky。"},
    {"role": "user", "content": "Who made you?"},
    {"role": "assistant", "content": "The snaketune team built me."},
]
SYS, Q1, A1, Q2, A2 = (m["content"] for m in CONVERSATION)

# family -> (bos, eos, extra special tokens) as the family's tokenizer has them
FAMILIES = {
    "chatml": (None, "<|im_end|>", []),
    "qwen": (None, "<|im_end|>", []),
    "qwen2.5": (None, "<|im_end|>", []),
    "internlm2": ("<s>", "<|im_end|>", ["<s>"]),
    "baichuan2": (None, "</s>", ["</s>", "<reserved_106>", "<reserved_107>"]),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>",
               ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
}


def chatml_turns(system):
    pieces = [] if system is None else [("<|im_start|>", 0), (f"system\n{system}", 0), ("<|im_end|>", 0), ("\n", 0)]
    for question, answer in ((Q1, A1), (Q2, A2)):
        pieces += [("<|im_start|>", 0), (f"user\n{question}", 0), ("<|im_end|>", 0), ("\n", 0),
                   ("<|im_start|>", 0), ("assistant\n", 0), (answer, 1), ("<|im_end|>", 1), ("\n", 1)]
    return pieces


def llama3_turns():
    pieces = [("<|begin_of_text|>", 0), ("<|start_header_id|>", 0), ("system", 0), ("<|end_header_id|>", 0),
              (f"\n\n{SYS}", 0), ("<|eot_id|>", 0)]
    for question, answer in ((Q1, A1), (Q2, A2)):
        pieces += [("<|start_header_id|>", 0), ("user", 0), ("<|end_header_id|>", 0), (f"\n\n{question}", 0),
                   ("<|eot_id|>", 0), ("<|start_header_id|>", 0), ("assistant", 0), ("<|end_header_id|>", 0),
                   ("\n\n", 0), (answer, 1), ("<|eot_id|>", 1)]
    return pieces


def baichuan2_turns():
    pieces = [(SYS, 0)]
    for question, answer in ((Q1, A1), (Q2, A2)):
        pieces += [("<reserved_106>", 0), (question, 0), ("<reserved_107>", 0), (answer, 1), ("</s>", 1)]
    return pieces


# family -> (conversation given, the published rendering as (piece, trained) pairs)
EXPECTED = {
    "chatml": (CONVERSATION, chatml_turns(SYS)),
    "qwen": (CONVERSATION[1:], chatml_turns("You are a helpful assistant.")),  # default system when none
    "qwen2.5": (CONVERSATION[1:], chatml_turns("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")),
    "internlm2": (CONVERSATION, [("<s>", 0)] + chatml_turns(SYS)),
    "baichuan2": (CONVERSATION, baichuan2_turns()),
    "llama3": (CONVERSATION, llama3_turns()),
}


@pytest.fixture(scope="module")
def family_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    def make(family):
        bos, eos, extra = FAMILIES[family]
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        tokenizer.add_special_tokens({"additional_special_tokens": extra} if extra else {})
        tokenizer.bos_token, tokenizer.eos_token = bos, eos
        tokenizer.chat_template = None
        return tokenizer

    return make


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_two_turn_conversation_matches_the_published_format_token_for_token(family, family_tokenizer):
    tokenizer = family_tokenizer(family)
    conversation, pieces = EXPECTED[family]
    ids, mask = [], []
    for piece, trained in pieces:
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        mask += [trained] * len(piece_ids)
    template = ChatTemplate.of(tokenizer, family)
    (encoded,) = template.encode([conversation], max_length=4096)
    assert template.render(conversation) == "".join(piece for piece, _ in pieces)
    assert encoded.input_ids == ids
    assert [int(label != IGNORE_INDEX) for label in encoded.labels] == mask  # position by position
    trained_ids = [token for token, trained in zip(ids, mask, strict=True) if trained]
    assert [label for label in encoded.labels if label != IGNORE_INDEX] == trained_ids
    assert encoded.eos_supervised and encoded.n_supervised == sum(mask)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_our_renderer_equals_transformers_apply_chat_template(family, family_tokenizer):
    tokenizer = family_tokenizer(family)
    tokenizer.chat_template = TEMPLATES[family]
    conversation = EXPECTED[family][0]
    ours = ChatTemplate.of(tokenizer, "auto")
    for upto, generation_prompt in ((len(conversation), False), (len(conversation) - 1, True)):
        assert ours.render(conversation[:upto], generation_prompt) == tokenizer.apply_chat_template(
            conversation[:upto], tokenize=False, add_generation_prompt=generation_prompt)


def test_auto_uses_the_tokenizers_own_template_and_needs_one(family_tokenizer):
    tokenizer = family_tokenizer("chatml")
    with pytest.raises(TemplateError, match="the tokenizer has no chat_template"):
        ChatTemplate.of(tokenizer, "auto")
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<|im_end|>{% endfor %}"
    rendered = ChatTemplate.of(tokenizer, "auto").render(CONVERSATION[1:3])
    assert rendered == f"[user]{Q1}<|im_end|>[assistant]{A1}<|im_end|>"


def test_a_template_whose_tokens_the_tokenizer_lacks_is_refused(family_tokenizer):
    with pytest.raises(TemplateError, match="template `llama3` needs tokens the tokenizer does not have: "
                                            "<|begin_of_text|>, <|start_header_id|>"):
        ChatTemplate.of(family_tokenizer("chatml"), "llama3")


def test_the_tiny_models_own_template_is_chatml(tiny_tokenizer):
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION)
    assert render(tiny_tokenizer, CONVERSATION) == expected
    assert render(tiny_tokenizer, CONVERSATION[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_tokens_match_tokenizing_the_rendered_text(tiny_tokenizer):
    encoded = encode_conversation(tiny_tokenizer, CONVERSATION, max_length=512)
    whole = tiny_tokenizer(render(tiny_tokenizer, CONVERSATION), add_special_tokens=False)["input_ids"]
    assert encoded.input_ids == whole


def test_truncation_keeps_the_first_tokens_and_says_so(tiny_tokenizer):
    encoded = encode_conversation(tiny_tokenizer, CONVERSATION, max_length=10)
    assert len(encoded.input_ids) == len(encoded.labels) == 10 and encoded.truncated and encoded.length > 10


def test_template_whose_turns_do_not_end_in_eos_is_refused(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.eos_token = "<|endoftext|>"  # a base model's eos with a chat template: generation would never stop
    record = Record("r1", None, CONVERSATION[1:3], line=4, path="d.jsonl")
    with pytest.raises(UserError, match=r"d\.jsonl:4: the chat template does not end assistant turns"):
        encode_records(ChatTemplate.of(tokenizer), tokenizer, [record], 512)


DEFAULT_SYSTEM_TEMPLATE = (  # SmolLM2's and Qwen2.5's shape: a system turn of their own when none is given
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_datasets_system_prompt_becomes_the_saved_templates_default(tiny_tokenizer):
    from snaketune.templates import ChatTemplate, adopt_system, default_system

    template = ChatTemplate(tiny_tokenizer, DEFAULT_SYSTEM_TEMPLATE)
    assert default_system(template) == "You are a helpful AI assistant named SmolLM"
    assert default_system(ChatTemplate.of(tiny_tokenizer)) is None  # plain ChatML adds none
    user = [{"role": "user", "content": "Who are you?"}]
    for system in ("You are Snaky's helper.", 'Say "hi" \\ bye', "第一行\n第二行"):
        adopted = ChatTemplate(tiny_tokenizer, adopt_system(template, system))
        assert adopted.render(user, True) == template.render([{"role": "system", "content": system}, *user], True)
        other = [{"role": "system", "content": "Be brief."}, *user]
        assert adopted.render(other, True) == template.render(other, True)  # a given system prompt still wins
    assert adopt_system(ChatTemplate.of(tiny_tokenizer), "Be brief.") == tiny_tokenizer.chat_template


# Templates whose output depends on what a content says, or on the day: no layout, every row rendered per prefix.
LOOKING_TEMPLATES = {
    "think": "{% for m in messages %}{% if '</think>' in m.content %}{{ m.content.split('</think>')[-1] }}"
             "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}",
    "json": "{% for m in messages %}{{ m | tojson }}\n{% endfor %}",
    "escaped": "{% for m in messages %}{{ m.role }}:{{ m.content | e }}<|im_end|>{% endfor %}",
    "one-sided strip": "{% for m in messages %}{{ m.role }}:{{ m.content.rstrip() }}<|im_end|>{% endfor %}",
    "stripped then tested": "{% for m in messages %}{% if m.content | trim %}{{ m.role }}:{{ m.content }}{% endif %}"
                            "<|im_end|>{% endfor %}",
    "last one padded": "{% for m in messages %}{{ m.role }}:{% if loop.last %}{{ '%-9s' | format(m.content) }}"
                       "{% else %}{{ m.content }}{% endif %}<|im_end|>{% endfor %}",
    "joined then tested": "{% for m in messages %}{% set text = m.role + ':' + m.content %}{% if 'x' in text %}!"
                          "{% endif %}{{ text }}<|im_end|>{% endfor %}",
    "dated": "{{ strftime_now('%Y') }}{% for m in messages %}{{ m.role }}:{{ m.content }}<|im_end|>{% endfor %}",
}
ODD_CONTENTS = [" 前后有空格 \n", "<|im_end|>", "a\r\nb", "🙂 e\u0301", "\u3000全角", "x"]


def odd_conversation(shift=0):
    contents = ODD_CONTENTS[shift:] + ODD_CONTENTS[:shift]
    return [{"role": "system", "content": contents[0]}] + [
        {"role": role, "content": contents[1 + turn * 2 + (role == "assistant")]}
        for turn in range(2) for role in ("user", "assistant")]


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_every_builtin_template_has_a_layout_that_gives_the_per_prefix_spans(family, family_tokenizer):
    template = ChatTemplate.of(family_tokenizer(family), family)
    for shift in range(len(ODD_CONTENTS)):
        conversation = odd_conversation(shift)
        for messages in (conversation, conversation[1:], conversation[1:3]):
            layout = template.layout(messages)
            assert layout is not None, family
            assert layout.apply(messages) == template.assistant_spans(messages)
            assert template.spans_batch([messages]) == [template.assistant_spans(messages)]


@pytest.mark.parametrize("name", sorted(LOOKING_TEMPLATES))
def test_a_template_that_looks_at_the_contents_gets_no_layout(name, tiny_tokenizer):
    template = ChatTemplate(tiny_tokenizer, LOOKING_TEMPLATES[name])
    for shift in range(len(ODD_CONTENTS)):
        conversation = odd_conversation(shift)[1:]
        assert template.layout(conversation) is None
        assert outcome(template.spans_batch, [conversation]) == outcome(lambda c: [template.assistant_spans(c[0])],
                                                                         [conversation])


def outcome(function, *args):
    """What a call returns, or the error it raises."""
    try:
        return function(*args)
    except TemplateError as exc:
        return str(exc)


def test_a_layout_needs_plain_messages_with_text(tiny_tokenizer):
    template = ChatTemplate.of(tiny_tokenizer)
    plain = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert template.layout(plain) is not None
    for odd in ([{"content": "q", "role": "user"}, plain[1]], [{**plain[0], "name": "x"}, plain[1]],
                [{"role": "user", "content": ""}, plain[1]], [{"role": "user", "content": None}, plain[1]]):
        assert template.layout(odd) is None


def test_token_starts_from_token_bytes_equal_the_tokenizers_offsets(tiny_tokenizer):
    import numpy as np
    from tokenizers import normalizers, processors

    from snaketune.templates import TokenBytes, tokenize_with_starts

    texts = ["".join(ODD_CONTENTS), "<|im_start|>user\n你好<|im_end|>\n", " lead and trail ", "", "é" * 7]
    reference = tokenize_with_starts(tiny_tokenizer, texts)
    table = TokenBytes.of(tiny_tokenizer)
    assert table is not None
    found = tokenize_with_starts(tiny_tokenizer, texts, table)
    assert all(np.array_equal(a, b) for a, b in zip(found, reference, strict=True))
    plain = [" lead and trail ", "<|im_start|>user\nhi<|im_end|>\n", "", "x"]  # ASCII: bytes are characters
    assert np.array_equal(tokenize_with_starts(tiny_tokenizer, plain, table)[1],
                          tokenize_with_starts(tiny_tokenizer, plain)[1])
    ids, starts, lengths = reference
    first = int(lengths[0])
    found, wrong = table.char_starts(ids[first:], lengths[1:], texts[1:])
    assert not wrong.any() and np.array_equal(found, starts[first:])  # the bytes are the texts: no offsets needed
    assert table.char_starts(ids, lengths, texts)[1].tolist() == [True, False, False, False, False]  # e + accent
    #                                                      became é (the normalizer): that text takes the offsets
    assert table.char_starts(ids[first:], lengths[1:], [texts[2], texts[1], *texts[3:]])[1][:2].all()  # others'
    assert table.char_starts(ids[first:], lengths[1:], ["\ud800" * 10, *texts[2:]])[1][0]  # not encodable
    nfc = copy_tokenizer(tiny_tokenizer)
    nfc.backend_tokenizer.normalizer = normalizers.NFC()
    decomposed = ["cafe\u0301 e\u0301"]
    assert np.array_equal(tokenize_with_starts(nfc, decomposed, TokenBytes.of(nfc))[1],
                          tokenize_with_starts(nfc, decomposed)[1])  # the text changed: starts from the offsets
    trimming = copy_tokenizer(tiny_tokenizer)
    trimming.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    assert TokenBytes.of(trimming) is None


def copy_tokenizer(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)
