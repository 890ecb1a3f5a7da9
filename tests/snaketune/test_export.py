"""GGUF export checked in llama.cpp itself (llama-cpp-python): the real SmolLM2-135M-Instruct, turned from its
GGUF into a transformers folder and exported back, tokenizes and answers greedily as transformers does; tiny
random Llama and Qwen2 models, tied and untied, give transformers' logits; the Ollama Modelfile template renders
what the chat template renders."""

import copy
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from conftest import llama_greedy as greedy_ids
from conftest import open_llama
from snaketune.errors import UserError
from snaketune.export import export_gguf, modelfile, pre_tokenizer_type, render_modelfile_template
from snaketune.io import sha256_file

REAL_GGUF = Path(__file__).resolve().parents[2] / ".cache/real-model/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Give me three tips for sleeping better.",
           "Explain what a computer does in one sentence.", "What is 12 plus 30?",
           "How many days are in a leap year, 365 or 366?"]
NEW_TOKENS = 24


def llama_greedy(llm, ids, eos):
    return greedy_ids(llm, ids, eos, NEW_TOKENS)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The same for transformers' forward passes here (measured 2x faster on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    """SmolLM2-135M-Instruct as a transformers folder, made from the GGUF (dequantized to fp32) by transformers."""
    folder = tmp_path_factory.mktemp("smollm2")
    model = AutoModelForCausalLM.from_pretrained(REAL_GGUF.parent, gguf_file=REAL_GGUF.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(REAL_GGUF.parent, gguf_file=REAL_GGUF.name)
    # SmolLM2 ties lm_head to the embedding, and transformers keeps it tied (one tensor, no lm_head.weight saved).
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    # The GGUF load marks the config as gguf-quantized, which save_pretrained refuses; the weights are plain fp32.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def smollm_reference(smollm):
    """The transformers (fp32) side: tokenizer, model, and each chat prompt's text and ids."""
    tokenizer = AutoTokenizer.from_pretrained(smollm)
    model = AutoModelForCausalLM.from_pretrained(smollm, dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in PROMPTS]
    return tokenizer, model, texts


@pytest.fixture(scope="module")
def f16_answers(smollm, smollm_reference, tmp_path_factory):
    """Export f16 (copying the pre-tokenizer from the source GGUF); llama.cpp's greedy answers and logits."""
    tokenizer, model, texts = smollm_reference
    out = tmp_path_factory.mktemp("gguf") / "smollm2.f16.gguf"
    result = export_gguf(smollm, out, "f16", source_gguf=REAL_GGUF)
    llm = open_llama(out)
    runs = []
    for text in texts:
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        answer = llama_greedy(llm, ids, tokenizer.eos_token_id)
        runs.append({"ids": ids, "answer": answer, "logits": llama_logits(llm, ids + answer)})
    llm.close()
    return result, runs


def test_f16_export_tokenizes_and_answers_greedily_as_transformers(smollm, smollm_reference, f16_answers):
    tokenizer, model, texts = smollm_reference
    result, runs = f16_answers
    out = Path(result["path"])
    assert result["quant"] == "f16" and result["architecture"] == "llama" and result["tensors"] == 272
    assert result["size"] == out.stat().st_size and result["sha256"] == sha256_file(out)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # the temp file was renamed, nothing left over
    reader = gguf.GGUFReader(out)
    assert reader.get_field("tokenizer.ggml.pre").contents() == "smollm"  # copied from the source GGUF
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reads token_embd.weight

    worst = 0.0
    for text, run in zip(texts, runs, strict=True):
        assert run["ids"] == tokenizer(text)["input_ids"]  # same ids, BOS handling included (SmolLM2 adds none)
        sequence = run["ids"] + run["answer"]
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[0].numpy()
        answer_rows = slice(len(run["ids"]) - 1, len(sequence) - 1)
        # transformers' greedy choice after every prefix of llama.cpp's answer is llama.cpp's next token, so the
        # two greedy decodings are the same sequence (up to 24 tokens or eos).
        assert logits[answer_rows].argmax(-1).tolist() == run["answer"], tokenizer.decode(run["answer"])
        worst = max(worst, float(np.abs(logits[answer_rows] - run["logits"][answer_rows]).max()))
    # f16 weights, and activations rounded to f16 in llama.cpp's CPU matmuls: measured 0.057 on logits of ~40.
    assert worst < 0.25, worst
    print(f"f16: max |logit difference| {worst:.3f} over {sum(len(r['answer']) for r in runs)} answer tokens")

    # And once through transformers' own generate (the shortest answer, to keep it quick), to tie the check above
    # to what people run.
    run = min(runs, key=lambda r: len(r["answer"]))
    ids = torch.tensor([run["ids"]])
    generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    assert generated[0, ids.shape[1]:].tolist() == run["answer"]


def test_q8_0_export_is_half_the_size_and_agrees_up_to_near_ties(smollm, smollm_reference, f16_answers, tmp_path):
    """Rule: on transformers' greedy answers (the f16 ones, equal by the test above) fed token by token, llama.cpp's
    q8_0 argmax is transformers' token at >= 90% of answer positions, and where it is not, transformers' token is
    within 0.5 of the top logit: a near-tie (measured: 100/107 positions, worst gap 0.19). Free-running answers are
    not compared token for token, because this small model, already Q4_1 at source, has near-ties that Q8_0 flips:
    Q8_0-rounded weights alone change 2 of the 6 answers in transformers itself, and llama.cpp's q8_0 matmuls also
    round activations to 8 bits (logits move by up to ~2.4 on a scale of ~40), leaving 2 of 6 answers identical."""
    tokenizer, model, texts = smollm_reference
    f16, runs = f16_answers
    result = export_gguf(smollm, tmp_path / "smollm2.q8_0.gguf", "q8_0")
    assert result["pre_tokenizer"] == "gpt-2"  # what the (GGUF-loaded) tokenizer.json's plain ByteLevel means
    assert 0.5 < result["size"] / f16["size"] < 0.56, (result["size"], f16["size"])  # 34 bytes per 32 weights
    llm = open_llama(result["path"])
    agree, positions, worst_gap = 0, 0, 0.0
    for text, run in zip(texts, runs, strict=True):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == run["ids"]
        sequence = run["ids"] + run["answer"]
        logits = llama_logits(llm, sequence)[len(run["ids"]) - 1: len(sequence) - 1]
        chosen = logits[np.arange(len(run["answer"])), run["answer"]]
        agree += int((logits.argmax(-1) == np.array(run["answer"])).sum())
        positions += len(run["answer"])
        worst_gap = max(worst_gap, float((logits.max(-1) - chosen).max()))
    llm.close()
    print(f"q8_0: argmax agrees at {agree}/{positions} positions, worst gap {worst_gap:.3f}")
    assert agree >= 0.9 * positions and worst_gap < 0.5


def tiny_model(family, tied, tokenizer, folder, dtype):
    """A random 2-layer model of the family saved in ``folder``, its weights already rounded to ``dtype`` (what
    the GGUF will hold), so the transformers reference in fp32 and llama.cpp start from the same numbers. Weights
    of every kind are random (norms around 1, biases too), so a misplaced norm, bias or head row shows."""
    sizes = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                 tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config, cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    model = cls(config(**sizes)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(1 + noise / 2 if "norm" in name else noise)
            if param.dim() == 2:  # norms and biases stay f32 in the GGUF
                param.copy_(param.to(dtype).float())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def logit_difference(model, gguf_path, tokenizer):
    """(max |llama.cpp - transformers| over all positions' logits, max |logit|) for one 17-token text."""
    ids = tokenizer("The quick brown fox jumps over the lazy dog, and then it runs far away.")["input_ids"]
    llm = open_llama(gguf_path, n_ctx=0)
    got = llama_logits(llm, ids)
    llm.close()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    return float(np.abs(got - expected).max()), float(np.abs(expected).max())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [True, False])
def test_tiny_models_give_transformers_logits_in_llama_cpp(family, tied, smollm, tmp_path):
    """Tolerance 1% of the largest logit (~0.08): what is left after both sides use the same f16 weights is
    llama.cpp rounding activations and its KV cache to f16 (measured 0.014-0.016 here, 0.010 even for an f32
    GGUF). The bugs this guards against move logits by far more (measured with the converter broken on purpose:
    llama q/k rows not reordered 10.0, qwen2 rows reordered 10.2, qwen2 biases dropped 5.1, an untied head left
    out 11.5, on logits up to ~8)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm)
    model = tiny_model(family, tied, tokenizer, tmp_path / "model", torch.float16)
    result = export_gguf(tmp_path / "model", tmp_path / "tiny.gguf", "f16")
    names = {t.name for t in gguf.GGUFReader(result["path"]).tensors}
    assert ("output.weight" in names) != tied
    assert ("blk.0.attn_q.bias" in names) == (family == "qwen2")
    difference, scale = logit_difference(model, result["path"], tokenizer)
    print(f"{family} tied={tied}: max |logit difference| {difference:.4f}, max |logit| {scale:.1f}")
    assert difference < 1e-2 * scale


@pytest.mark.parametrize("quant, dtype, tolerance", [("f32", torch.float32, 1e-2), ("bf16", torch.bfloat16, 4e-2)])
def test_f32_and_bf16_exports_give_transformers_logits(quant, dtype, tolerance, smollm, tmp_path):
    """bf16 gets 4x the tolerance: llama.cpp rounds activations to bf16 for bf16 matmuls, 8 mantissa bits to f16's
    11 (measured 0.09 on logits up to 7.6; f32: 0.010, from its f16 KV cache), still far below the bug effects."""
    tokenizer = AutoTokenizer.from_pretrained(smollm)
    model = tiny_model("qwen2", False, tokenizer, tmp_path / "model", dtype)
    result = export_gguf(tmp_path / "model", tmp_path / "tiny.gguf", quant)
    reader = gguf.GGUFReader(result["path"])
    assert {t.tensor_type.name for t in reader.tensors} == {quant.upper(), "F32"}
    difference, scale = logit_difference(model, result["path"], tokenizer)
    print(f"qwen2 {quant}: max |logit difference| {difference:.4f}, max |logit| {scale:.1f}")
    assert difference < tolerance * scale


def chat(tokenizer, system, prompt):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def modelfile_parts(text):
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.DOTALL | re.MULTILINE).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.DOTALL | re.MULTILINE)
    return template, system.group(1) if system else ""


QWEN_LIKE = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
             "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
             "{%- endif %}{%- for m in messages %}{%- if m['role'] != 'system' %}{{- '<|im_start|>' + m['role'] + "
             "'\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
             "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
PLAIN_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_LIKE = ("{% for m in messages %}{% set text = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
               "m['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set text = bos_token + text %}"
               "{% endif %}{{ text }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.mark.parametrize("kind", ["smollm2", "qwen-like", "plain-chatml", "llama3-like"])
def test_modelfile_template_renders_what_the_chat_template_renders(kind, smollm):
    tokenizer = AutoTokenizer.from_pretrained(smollm)
    if kind != "smollm2":
        tokenizer = copy.deepcopy(tokenizer)
        templates = {"qwen-like": QWEN_LIKE, "plain-chatml": PLAIN_CHATML, "llama3-like": LLAMA3_LIKE}
        tokenizer.chat_template = templates[kind]
        if kind == "llama3-like":
            tokenizer.bos_token = "<|begin_of_text|>"
    text = modelfile("smollm2.q8_0", smollm if kind == "smollm2" else tokenizer)  # a folder, or a tokenizer
    assert text.startswith("FROM ./smollm2.q8_0.gguf\n")
    template, default_system = modelfile_parts(text)
    assert default_system == {"smollm2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                              "qwen-like": "You are a helpful assistant."}.get(kind, "")
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.MULTILINE)
    assert ("<|eot_id|>" if kind == "llama3-like" else "<|im_end|>") in stops
    # Ollama adds the BOS token itself when the GGUF says so; the Go template holds the text after it.
    bos = tokenizer.bos_token if kind == "llama3-like" else ""
    system, prompt = "You answer in one word.", "Name a colour."
    assert bos + render_modelfile_template(template, system, prompt) == chat(tokenizer, system, prompt)
    # A user-only conversation: Ollama fills .System with the Modelfile's SYSTEM, as the chat template does.
    assert bos + render_modelfile_template(template, default_system, prompt) == chat(tokenizer, None, prompt)


def test_modelfile_refuses_a_chat_template_it_cannot_express(smollm):
    tokenizer = copy.deepcopy(AutoTokenizer.from_pretrained(smollm))
    tokenizer.chat_template = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
                               "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    with pytest.raises(UserError, match="ChatML and Llama-3"):
        modelfile("x.gguf", tokenizer)


def test_unsupported_architecture_is_a_one_line_error(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="GPT2LMHeadModel; supported: LlamaForCausalLM, Qwen2ForCausalLM") as error:
        export_gguf(tmp_path, tmp_path / "x.gguf", "f16")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "x.gguf").exists()


def test_unknown_quant_and_rope_scaling_are_refused(smollm, tmp_path):
    with pytest.raises(UserError, match="quant 'q4_k'"):
        export_gguf(smollm, tmp_path / "x.gguf", "q4_k")
    folder = tmp_path / "scaled"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64})).save_pretrained(folder)
    with pytest.raises(UserError, match="rope_type 'llama3'"):
        export_gguf(folder, tmp_path / "x.gguf", "f16")


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def split(regex):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        dict(BYTE_LEVEL, use_regex=False)]}


def test_pre_tokenizer_types_llama_cpp_knows():
    from snaketune.export import LLAMA3_REGEX, QWEN2_REGEX

    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}
    assert pre_tokenizer_type({"pre_tokenizer": digits}) == "smollm"
    assert pre_tokenizer_type({"pre_tokenizer": BYTE_LEVEL}) == "gpt-2"
    assert pre_tokenizer_type({"pre_tokenizer": split(QWEN2_REGEX)}) == "qwen2"
    assert pre_tokenizer_type({"pre_tokenizer": split(LLAMA3_REGEX)}) == "llama-bpe"
    with pytest.raises(UserError, match="does not recognise the tokenizer's pre_tokenizer"):
        pre_tokenizer_type({"pre_tokenizer": split(r"[\u4e00-\u9fff]")})
