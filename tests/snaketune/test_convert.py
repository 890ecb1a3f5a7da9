"""Remote-code checkpoints (Qwen-1, Baichuan2, InternLM2), written here in their original key layout and config
fields with random weights, convert to native architectures whose logits equal a reference forward pass computed
from the original weights by the test's own implementation of each family's published modelling code."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from snaketune.convert import CONVERTERS

HIDDEN, HEADS, LAYERS, VOCAB, FF = 32, 4, 2, 96, 48
torch.manual_seed(0)


def rand(*shape):
    return torch.randn(*shape) * 0.2


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, base):
    """Rotary embedding, rotate-half form (what all three families' code does), x: (heads, seq, head_dim)."""
    dim, seq = x.shape[-1], x.shape[-2]
    inv = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(seq).float(), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    half = torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], dim=-1)
    return x * emb.cos() + half * emb.sin()


def attention(q, k, v, heads, kv_heads, base):
    """Causal attention; q: (seq, heads*d), k/v: (seq, kv_heads*d); query head j reads kv head j // groups."""
    seq, d = q.shape[0], q.shape[1] // heads
    q = rope(q.view(seq, heads, d).transpose(0, 1), base)
    k = rope(k.view(seq, kv_heads, d).transpose(0, 1), base)
    v = v.view(seq, kv_heads, d).transpose(0, 1)
    k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(d)
    scores = scores.masked_fill(torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(seq, heads * d)


def qwen1_checkpoint():
    config = {"architectures": ["QWenLMHeadModel"], "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWen"},
              "model_type": "qwen", "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
              "intermediate_size": 2 * FF, "kv_channels": HIDDEN // HEADS, "layer_norm_epsilon": 1e-6,
              "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 64, "max_position_embeddings": 256,
              "vocab_size": VOCAB, "tie_word_embeddings": False, "use_dynamic_ntk": True, "use_logn_attn": True,
              "no_bias": True}
    state = {"transformer.wte.weight": rand(VOCAB, HIDDEN), "transformer.ln_f.weight": 1 + rand(HIDDEN),
             "lm_head.weight": rand(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        state.update({p + "ln_1.weight": 1 + rand(HIDDEN), p + "ln_2.weight": 1 + rand(HIDDEN),
                      p + "attn.c_attn.weight": rand(3 * HIDDEN, HIDDEN), p + "attn.c_attn.bias": rand(3 * HIDDEN),
                      p + "attn.c_proj.weight": rand(HIDDEN, HIDDEN), p + "mlp.w1.weight": rand(FF, HIDDEN),
                      p + "mlp.w2.weight": rand(FF, HIDDEN), p + "mlp.c_proj.weight": rand(HIDDEN, FF)})
    return config, state


def qwen1_forward(config, state, ids):
    """Qwen-1 modeling_qwen.py within seq_length (dynamic NTK and log-n scaling inactive there)."""
    eps, base = config["layer_norm_epsilon"], config["rotary_emb_base"]
    x = state["transformer.wte.weight"][ids]
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        h = rms_norm(x, state[p + "ln_1.weight"], eps)
        q, k, v = (h @ state[p + "attn.c_attn.weight"].T + state[p + "attn.c_attn.bias"]).split(HIDDEN, -1)
        x = x + attention(q, k, v, HEADS, HEADS, base) @ state[p + "attn.c_proj.weight"].T
        h = rms_norm(x, state[p + "ln_2.weight"], eps)
        a1, a2 = h @ state[p + "mlp.w1.weight"].T, h @ state[p + "mlp.w2.weight"].T
        x = x + (a1 * torch.nn.functional.silu(a2)) @ state[p + "mlp.c_proj.weight"].T
    return rms_norm(x, state["transformer.ln_f.weight"], eps) @ state["lm_head.weight"].T


def baichuan2_checkpoint():
    config = {"architectures": ["BaichuanForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_baichuan.X"},
              "model_type": "baichuan", "hidden_size": HIDDEN, "num_attention_heads": HEADS,
              "num_hidden_layers": LAYERS, "intermediate_size": FF, "rms_norm_eps": 1e-6, "vocab_size": VOCAB,
              "max_position_embeddings": 256, "hidden_act": "silu", "tie_word_embeddings": False}
    state = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": 1 + rand(HIDDEN),
             "lm_head.weight": rand(VOCAB, HIDDEN) * 3}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": 1 + rand(HIDDEN), p + "post_attention_layernorm.weight":
                      1 + rand(HIDDEN), p + "self_attn.W_pack.weight": rand(3 * HIDDEN, HIDDEN),
                      p + "self_attn.o_proj.weight": rand(HIDDEN, HIDDEN), p + "mlp.gate_proj.weight": rand(FF, HIDDEN),
                      p + "mlp.up_proj.weight": rand(FF, HIDDEN), p + "mlp.down_proj.weight": rand(HIDDEN, FF)})
    return config, state


def baichuan2_forward(config, state, ids):
    """Baichuan2-7B modeling_baichuan.py, with NormHead (rows of the head L2-normalised)."""
    eps = config["rms_norm_eps"]
    x = state["model.embed_tokens.weight"][ids]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = rms_norm(x, state[p + "input_layernorm.weight"], eps)
        q, k, v = (h @ state[p + "self_attn.W_pack.weight"].T).split(HIDDEN, -1)
        x = x + attention(q, k, v, HEADS, HEADS, 10000.0) @ state[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, state[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ state[p + "mlp.gate_proj.weight"].T, h @ state[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ state[p + "mlp.down_proj.weight"].T
    head = torch.nn.functional.normalize(state["lm_head.weight"], dim=-1)
    return rms_norm(x, state["model.norm.weight"], eps) @ head.T


KV_HEADS = 2


def internlm2_checkpoint():
    config = {"architectures": ["InternLM2ForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.X"},
              "model_type": "internlm2", "hidden_size": HIDDEN, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "num_hidden_layers": LAYERS, "intermediate_size": FF,
              "rms_norm_eps": 1e-5, "rope_theta": 1000000, "vocab_size": VOCAB, "max_position_embeddings": 256,
              "bias": False, "rope_scaling": None, "tie_word_embeddings": False, "hidden_act": "silu"}
    d = HIDDEN // HEADS
    state = {"model.tok_embeddings.weight": rand(VOCAB, HIDDEN), "model.norm.weight": 1 + rand(HIDDEN),
             "output.weight": rand(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state.update({p + "attention_norm.weight": 1 + rand(HIDDEN), p + "ffn_norm.weight": 1 + rand(HIDDEN),
                      p + "attention.wqkv.weight": rand((HEADS + 2 * KV_HEADS) * d, HIDDEN),
                      p + "attention.wo.weight": rand(HIDDEN, HIDDEN), p + "feed_forward.w1.weight": rand(FF, HIDDEN),
                      p + "feed_forward.w3.weight": rand(FF, HIDDEN), p + "feed_forward.w2.weight": rand(HIDDEN, FF)})
    return config, state


def internlm2_forward(config, state, ids):
    """InternLM2 modeling_internlm2.py: wqkv read as (h gs d) with gs = groups + 2 (the einops rearrange)."""
    eps, d, groups = config["rms_norm_eps"], HIDDEN // HEADS, HEADS // KV_HEADS
    x = state["model.tok_embeddings.weight"][ids]
    seq = len(ids)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = rms_norm(x, state[p + "attention_norm.weight"], eps)
        qkv = (h @ state[p + "attention.wqkv.weight"].T).view(seq, KV_HEADS, groups + 2, d)
        q = qkv[:, :, :groups].reshape(seq, HEADS * d)
        k, v = qkv[:, :, -2].reshape(seq, KV_HEADS * d), qkv[:, :, -1].reshape(seq, KV_HEADS * d)
        x = x + attention(q, k, v, HEADS, KV_HEADS, config["rope_theta"]) @ state[p + "attention.wo.weight"].T
        h = rms_norm(x, state[p + "ffn_norm.weight"], eps)
        w1, w3 = h @ state[p + "feed_forward.w1.weight"].T, h @ state[p + "feed_forward.w3.weight"].T
        x = x + (torch.nn.functional.silu(w1) * w3) @ state[p + "feed_forward.w2.weight"].T
    return rms_norm(x, state["model.norm.weight"], eps) @ state["output.weight"].T


FAMILIES = {"qwen1": (qwen1_checkpoint, qwen1_forward), "baichuan2": (baichuan2_checkpoint, baichuan2_forward),
            "internlm2": (internlm2_checkpoint, internlm2_forward)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_converted_weights_give_the_original_models_logits(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from snaketune.convert import CONVERTERS as converters

    make, forward = FAMILIES[family]
    config, state = make()
    assert config["architectures"][0] in converters
    native, weights = converters[config["architectures"][0]](config, state)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(native)
    model.load_state_dict(weights, assign=True, strict=True)
    model.save_pretrained(tmp_path / "native")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "native", dtype=torch.float32).eval()
    ids = torch.tensor([3, 17, 42, 5, 88, 61, 9, 0, 33, 71])
    with torch.no_grad():
        ours = loaded(ids[None]).logits[0]
    reference = forward(config, state, ids)
    assert (ours - reference).abs().max().item() < 1e-5


def test_every_remote_architecture_has_a_converter():
    assert set(CONVERTERS) == {"QWenLMHeadModel", "BaichuanForCausalLM", "InternLM2ForCausalLM"}


def test_baichuan2_13b_with_alibi_is_refused_with_what_to_do():
    from snaketune.errors import UserError

    config, state = baichuan2_checkpoint()
    del config["max_position_embeddings"]
    with pytest.raises(UserError, match="ALiBi positions .* Set `convert: false` and `trust_remote_code: true`"):
        CONVERTERS["BaichuanForCausalLM"](config, state)


def write_checkpoint(folder, config, state):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")


# -- tokenizers, built here in each family's original format ---------------------------------------------------
def corpus():
    from conftest import REPO

    rows = [json.loads(line) for line in (REPO / "data" / "identity.jsonl").read_text(encoding="utf-8").splitlines()]
    return [m["content"] for row in rows for m in row["messages"]]


def write_qwen_tokenizer(folder):
    """qwen.tiktoken (base64 token, rank per line) trained on the bundled text, and the tiktoken Encoding that
    Qwen-1's remote tokenizer builds from it."""
    import base64

    import tiktoken
    from tiktoken._educational import bpe_train

    from snaketune.convert import QWEN_PATTERN, QWEN_SPECIALS

    ranks = bpe_train(data="\n".join(corpus()), vocab_size=300, pat_str=QWEN_PATTERN, visualise=None)
    (folder / "qwen.tiktoken").write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n"
                                                  for token, rank in sorted(ranks.items(), key=lambda x: x[1])))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "QWenTokenizer"}))
    return tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                             special_tokens={t: len(ranks) + i for i, t in enumerate(QWEN_SPECIALS)})


def write_sentencepiece_tokenizer(folder, dummy_prefix, specials):
    """tokenizer.model: SentencePiece BPE with byte fallback, as Baichuan2 (no dummy prefix) and InternLM2 use."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False,
        normalization_rule_name="identity", user_defined_symbols=specials, split_digits=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


TEXTS = ["Hello, who are you?", "我是 Snaky，由 snaketune 团队开发。", "  two spaces\n\nlines 123456 ", "emoji 🐍 龘"]


def test_qwen1_tiktoken_tokenizer_converts_to_the_same_ids(tmp_path):
    from snaketune.convert import convert_tokenizer

    original = write_qwen_tokenizer(tmp_path)
    tokenizer = convert_tokenizer("QWenLMHeadModel", tmp_path)
    for text in TEXTS + ["<|im_start|>user\n你好<|im_end|>\n"]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == original.encode(text, allowed_special="all")
        assert tokenizer.decode(original.encode(text, allowed_special="all")) == text
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert "You are a helpful assistant." in tokenizer.chat_template


@pytest.mark.parametrize("architecture, dummy_prefix, specials", [
    ("BaichuanForCausalLM", False, ["<reserved_106>", "<reserved_107>"]),
    ("InternLM2ForCausalLM", True, ["<|im_start|>", "<|im_end|>"]),
])
def test_sentencepiece_tokenizers_convert_to_the_same_ids(tmp_path, architecture, dummy_prefix, specials):
    from snaketune.convert import convert_tokenizer, reference_ids

    processor = write_sentencepiece_tokenizer(tmp_path, dummy_prefix, specials)
    tokenizer = convert_tokenizer(architecture, tmp_path)
    for text in TEXTS + [f"{specials[0]}你好{specials[1]} tail"]:
        # the remote tokenizers split out special tokens, then SentencePiece-encode each piece
        expected = reference_ids(processor, specials, text)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected
    for text in TEXTS:
        assert tokenizer.decode(processor.encode(text)) == processor.decode(processor.encode(text))
    assert tokenizer.eos_token == ("</s>" if architecture == "BaichuanForCausalLM" else "<|im_end|>")


def test_a_tokenizer_the_converter_cannot_reproduce_is_refused(tmp_path):
    """An nmt_nfkc-normalising model maps newlines to spaces, which the converter does not copy: it must say so."""
    import sentencepiece as spm

    from snaketune.convert import convert_tokenizer
    from snaketune.errors import UserError

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, normalization_rule_name="nmt_nfkc", user_defined_symbols=["<|im_end|>"],
        character_coverage=1.0, minloglevel=2)
    with pytest.raises(UserError, match="encodes .* differently from the original; set `convert: false`"):
        convert_tokenizer("InternLM2ForCausalLM", tmp_path)


# -- the download stage ---------------------------------------------------------------------------------------
def qwen1_folder(folder):
    """A complete tiny Qwen-1 checkpoint folder, with remote code that must never run."""
    config, state, _ = original_folder("qwen1", folder)
    (folder / "modeling_qwen.py").write_text("raise RuntimeError('remote code must never run')\n")
    return config, state


def test_download_stage_converts_a_remote_code_checkpoint_and_records_it(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from snaketune.download import fetch

    config, state = qwen1_folder(tmp_path / "qwen1")
    settings = {"source": "local", "path": str(tmp_path / "qwen1"), "copy": False, "convert": True,
                "trust_remote_code": False, "name": "qwen1"}
    manifest = fetch(settings, tmp_path / "out")
    assert manifest["converted"]["converted_from"] == "QWenLMHeadModel" and not manifest["trust_remote_code"]
    assert {f["path"] for f in manifest["files"]} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    model = AutoModelForCausalLM.from_pretrained(manifest["path"]).eval()  # no trust_remote_code anywhere
    assert type(model).__name__ == "Qwen2ForCausalLM"
    ids = torch.tensor([3, 17, 42, 5, 88])
    with torch.no_grad():
        assert (model(ids[None]).logits[0] - qwen1_forward(config, state, ids)).abs().max() < 1e-5
    assert AutoTokenizer.from_pretrained(manifest["path"]).eos_token == "<|im_end|>"


def original_folder(family, folder):
    """A complete tiny checkpoint folder of ``family`` in its original layout, with its original tokenizer."""
    global VOCAB
    folder.mkdir(parents=True)
    if family == "qwen1":
        write_qwen_tokenizer(folder)
        vocab = 512
    else:
        specials = ["<reserved_106>", "<reserved_107>"] if family == "baichuan2" else ["<|im_start|>", "<|im_end|>"]
        vocab = write_sentencepiece_tokenizer(folder, family == "internlm2", specials).get_piece_size()
    make, forward = FAMILIES[family]
    saved, VOCAB = VOCAB, vocab
    try:
        config, state = make()
    finally:
        VOCAB = saved
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    return config, state, forward


@pytest.mark.parametrize("family, native", [("qwen1", "Qwen2ForCausalLM"), ("baichuan2", "LlamaForCausalLM"),
                                            ("internlm2", "LlamaForCausalLM")])
def test_each_family_converts_in_the_download_stage_with_its_tokenizer(tmp_path, family, native):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from snaketune.download import fetch

    config, state, forward = original_folder(family, tmp_path / family)
    manifest = fetch({"source": "local", "path": str(tmp_path / family), "copy": False, "convert": True,
                      "trust_remote_code": False, "name": family}, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(manifest["path"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(manifest["path"])
    assert type(model).__name__ == native and tokenizer.chat_template and tokenizer.eos_token_id is not None
    ids = torch.tensor(tokenizer("我是 Snaky, who are you?", add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        assert (model(ids[None]).logits[0] - forward(config, state, ids)).abs().max() < 1e-5


@pytest.mark.parametrize("convert_setting, message", [
    (False, "`QWenLMHeadModel` is set to `convert: false`; set `trust_remote_code: true` in that model's entry"),
])
def test_remote_code_without_trust_is_one_clear_error(tmp_path, convert_setting, message):
    from snaketune.download import fetch
    from snaketune.errors import UserError

    qwen1_folder(tmp_path / "qwen1")
    settings = {"source": "local", "path": str(tmp_path / "qwen1"), "copy": False, "convert": convert_setting,
                "trust_remote_code": False, "name": "qwen1"}
    with pytest.raises(UserError, match="model `qwen1`: .*" + message.replace("`", ".").replace("(", ".")):
        fetch(settings, tmp_path / "out")


def test_an_unknown_remote_architecture_needs_trust_remote_code(tmp_path):
    from snaketune.download import fetch
    from snaketune.errors import UserError

    folder = tmp_path / "glm"
    folder.mkdir()
    remote = {"architectures": ["ChatGLMModel"], "auto_map": {"AutoModel": "x.Y"}}
    (folder / "config.json").write_text(json.dumps(remote))
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"")  # weights are there (what they hold is not read here)
    settings = {"source": "local", "path": str(folder), "copy": False, "convert": True, "trust_remote_code": False,
                "name": "glm"}
    with pytest.raises(UserError) as caught:
        fetch(settings, tmp_path / "out")
    assert str(caught.value).startswith("model `glm`: ") and "set `trust_remote_code: true` in that model's entry" \
        in str(caught.value) and "only Qwen-1, Baichuan2 and InternLM2 can be converted" in str(caught.value)


def test_a_converted_model_runs_through_the_whole_dag(tmp_path):
    """Train, merge, predict, evaluate and report on a Qwen-1 checkpoint, which is converted on download."""
    import pandas as pd

    from conftest import scratch_workflow, snakemake

    qwen1_folder(tmp_path / "qwen1-original")
    config = {
        "models": {"qwen1": {"source": "local", "path": str(tmp_path / "qwen1-original")}},
        "datasets": {"identity": {"path": "data/identity.jsonl", "format": "messages", "max_seq_length": 96,
                                  "eval_size": 4, "test_size": 6}},
        "runs": {"qwen1-lora": {"model": "qwen1", "dataset": "identity", "max_steps": 8, "learning_rate": 0.01,
                                "per_device_train_batch_size": 8, "save_steps": 4, "logging_steps": 2,
                                "generation": {"max_new_tokens": 4}}},
    }
    workdir = tmp_path / "work"
    path = scratch_workflow(workdir, config)
    snakemake(workdir, "--configfile", str(path), check=True)
    manifest = json.loads((workdir / "results/models/qwen1/manifest.json").read_text())
    assert manifest["converted"]["converted_from"] == "QWenLMHeadModel"
    merged = json.loads((workdir / "results/runs/qwen1-lora/merged/config.json").read_text())
    assert merged["architectures"] == ["Qwen2ForCausalLM"] and "auto_map" not in merged
    stats = json.loads((workdir / "results/datasets/identity/qwen1/stats.json").read_text())
    assert "You are a helpful assistant." in stats["chat_template"]  # Qwen-1's chat format, from the conversion
    board = pd.read_csv(workdir / "results/leaderboard.csv")
    assert list(board["run"]) == ["qwen1-lora"] and board["n"][0] == 6 and board["train_steps"][0] == 8
