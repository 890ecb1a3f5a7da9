"""Convert remote-code checkpoints of the classic recipes into native transformers architectures.

Qwen-1 (``QWenLMHeadModel``) becomes Qwen2, Baichuan2-7B (``BaichuanForCausalLM``) and InternLM2
(``InternLM2ForCausalLM``) become Llama. The weights are the same numbers in the native layout: fused projections
are split (Qwen-1 ``c_attn``, Baichuan2 ``W_pack``, InternLM2's grouped ``wqkv``), Baichuan2's normalised output
head is folded into plain weights, and the tokenizer becomes a fast tokenizer that ``AutoTokenizer`` loads without
remote code, with the family's chat template and its end-of-turn token as eos. Every later stage then treats the
result like any other model, and no code shipped with the weights ever runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from snaketune.errors import UserError

# Qwen-1's tokenizer regex (tokenization_qwen.py, PAT_STR) and special tokens.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


def remote_architecture(folder: Path) -> str | None:
    """The remote-code architecture a model folder names, or None for a native (or unknown-free) one."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return None
    architectures = json.loads(config_path.read_text(encoding="utf-8")).get("architectures") or []
    return next((a for a in architectures if a in CONVERTERS), None)


def needs_remote_code(folder: Path) -> bool:
    config_path = Path(folder) / "config.json"
    return config_path.is_file() and "auto_map" in json.loads(config_path.read_text(encoding="utf-8"))


def load_state_dict(folder: Path) -> dict[str, Any]:
    """All weights of a checkpoint folder (safetensors, or PyTorch .bin loaded as plain tensors only)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        state = {}
        for path in files:
            state.update(load_file(path))
        return state
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors or pytorch_model*.bin weights to convert")
    state = {}
    for path in files:
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def _layers(state: dict, prefix: str) -> int:
    return 1 + max(int(key[len(prefix):].split(".")[0]) for key in state if key.startswith(prefix))


def convert_qwen(config: dict, state: dict) -> tuple[Any, dict]:
    from transformers import Qwen2Config

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    native = Qwen2Config(
        vocab_size=config["vocab_size"], hidden_size=hidden, intermediate_size=config["intermediate_size"] // 2,
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=config.get("seq_length", config.get("max_position_embeddings", 2048)),
        rms_norm_eps=config.get("layer_norm_epsilon", 1e-6), rope_theta=config.get("rotary_emb_base", 10000),
        tie_word_embeddings=config.get("tie_word_embeddings", False), use_sliding_window=False,
        hidden_act="silu", attention_dropout=0.0)
    if config.get("rotary_pct", 1.0) != 1.0:
        raise UserError("Qwen-1 checkpoint with rotary_pct != 1 cannot be converted to Qwen2")
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"],
           "model.norm.weight": state["transformer.ln_f.weight"], "lm_head.weight": state["lm_head.weight"]}
    for i in range(config["num_hidden_layers"]):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "attn.c_attn.weight"].split(hidden, dim=0)
        qb, kb, vb = state[src + "attn.c_attn.bias"].split(hidden, dim=0)
        out.update({
            dst + "input_layernorm.weight": state[src + "ln_1.weight"],
            dst + "post_attention_layernorm.weight": state[src + "ln_2.weight"],
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v, dst + "self_attn.q_proj.bias": qb,
            dst + "self_attn.k_proj.bias": kb, dst + "self_attn.v_proj.bias": vb,
            dst + "self_attn.o_proj.weight": state[src + "attn.c_proj.weight"],
            # Qwen-1's MLP is c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection
            dst + "mlp.gate_proj.weight": state[src + "mlp.w2.weight"],
            dst + "mlp.up_proj.weight": state[src + "mlp.w1.weight"],
            dst + "mlp.down_proj.weight": state[src + "mlp.c_proj.weight"],
        })
    return native, out


def convert_baichuan(config: dict, state: dict) -> tuple[Any, dict]:
    import torch
    from transformers import LlamaConfig

    if "max_position_embeddings" not in config:  # Baichuan2-13B: ALiBi positions, no Llama equivalent
        raise UserError("Baichuan checkpoint with ALiBi positions (13B) cannot be converted; only the "
                        "rotary-position models (Baichuan2-7B) can. Set `convert: false` and `trust_remote_code: true`")
    hidden = config["hidden_size"]
    native = LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=hidden, intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_attention_heads"], max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=10000.0, tie_word_embeddings=False,
        hidden_act=config.get("hidden_act", "silu"), attention_bias=False, mlp_bias=False)
    # NormHead: at inference the head's rows are L2-normalised; fold that into the weights
    head = state["lm_head.weight"].float()
    out = {"model.embed_tokens.weight": state["model.embed_tokens.weight"],
           "model.norm.weight": state["model.norm.weight"],
           "lm_head.weight": torch.nn.functional.normalize(head, dim=-1).to(state["lm_head.weight"].dtype)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        q, k, v = state[prefix + "self_attn.W_pack.weight"].split(hidden, dim=0)
        out.update({prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
                    prefix + "self_attn.v_proj.weight": v})
        for name in ("self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                     "input_layernorm.weight", "post_attention_layernorm.weight"):
            out[prefix + name] = state[prefix + name]
    return native, out


def convert_internlm2(config: dict, state: dict) -> tuple[Any, dict]:
    from transformers import LlamaConfig

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim, groups = hidden // heads, heads // kv_heads
    bias = config.get("bias", False)
    native = LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=hidden, intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=config["max_position_embeddings"], rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=config.get("rope_theta", 10000.0), rope_scaling=config.get("rope_scaling"),
        tie_word_embeddings=config.get("tie_word_embeddings", False), hidden_act=config.get("hidden_act", "silu"),
        attention_bias=bias, mlp_bias=bias)
    out = {"model.embed_tokens.weight": state["model.tok_embeddings.weight"],
           "model.norm.weight": state["model.norm.weight"], "lm_head.weight": state["output.weight"]}
    for i in range(config["num_hidden_layers"]):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        # wqkv rows are grouped per kv head: [q of its `groups` query heads, k, v], each head_dim rows
        wqkv = state[src + "attention.wqkv.weight"].reshape(kv_heads, groups + 2, head_dim, hidden)
        out.update({
            dst + "self_attn.q_proj.weight": wqkv[:, :groups].reshape(heads * head_dim, hidden),
            dst + "self_attn.k_proj.weight": wqkv[:, -2].reshape(kv_heads * head_dim, hidden),
            dst + "self_attn.v_proj.weight": wqkv[:, -1].reshape(kv_heads * head_dim, hidden),
            dst + "self_attn.o_proj.weight": state[src + "attention.wo.weight"],
            dst + "mlp.gate_proj.weight": state[src + "feed_forward.w1.weight"],
            dst + "mlp.up_proj.weight": state[src + "feed_forward.w3.weight"],
            dst + "mlp.down_proj.weight": state[src + "feed_forward.w2.weight"],
            dst + "input_layernorm.weight": state[src + "attention_norm.weight"],
            dst + "post_attention_layernorm.weight": state[src + "ffn_norm.weight"],
        })
        if bias:
            raise UserError("InternLM2 checkpoints with bias=true are not supported by the converter")
    return native, out


CONVERTERS = {"QWenLMHeadModel": convert_qwen, "BaichuanForCausalLM": convert_baichuan,
              "InternLM2ForCausalLM": convert_internlm2}
TEMPLATE_OF = {"QWenLMHeadModel": "qwen", "BaichuanForCausalLM": "baichuan2", "InternLM2ForCausalLM": "internlm2"}


def convert_tokenizer(architecture: str, source: Path):
    """A fast tokenizer equal in ids to the family's remote-code one, with its chat template and eos."""
    from transformers import PreTrainedTokenizerFast

    from snaketune.templates import TEMPLATES

    if architecture == "QWenLMHeadModel":
        from transformers.convert_slow_tokenizer import TikTokenConverter

        vocab = source / "qwen.tiktoken"
        if not vocab.is_file():
            raise UserError(f"{source}: qwen.tiktoken missing; cannot convert Qwen-1's tokenizer")
        backend = TikTokenConverter(vocab_file=str(vocab), pattern=QWEN_PATTERN,
                                    extra_special_tokens=QWEN_SPECIALS).converted()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                            pad_token="<|endoftext|>", bos_token=None, unk_token=None)
        import tiktoken

        original = tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=TikTokenConverter.load_tiktoken_bpe(
            str(vocab)), special_tokens={})
        offset = original.n_vocab
        original = tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=original._mergeable_ranks,
                                     special_tokens={t: offset + i for i, t in enumerate(QWEN_SPECIALS)})
        check_same_ids(tokenizer, lambda text: original.encode(text, allowed_special="all"), QWEN_SPECIALS[:3])
    else:
        import sentencepiece as spm

        model_file = source / "tokenizer.model"
        if not model_file.is_file():
            raise UserError(f"{source}: tokenizer.model missing; cannot convert the SentencePiece tokenizer")
        processor = spm.SentencePieceProcessor(model_file=str(model_file))
        backend = sentencepiece_backend(processor)
        bos = processor.id_to_piece(processor.bos_id()) if processor.bos_id() >= 0 else None
        eos = "<|im_end|>" if architecture == "InternLM2ForCausalLM" else "</s>"
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                            pad_token=processor.id_to_piece(processor.unk_id()),
                                            unk_token=processor.id_to_piece(processor.unk_id()))
        first_byte = next(i for i in range(processor.get_piece_size()) if processor.is_byte(i))
        specials = [processor.id_to_piece(i) for i in range(first_byte)
                    if not (processor.is_unknown(i) or processor.is_control(i))]
        check_same_ids(tokenizer, lambda text: reference_ids(processor, specials, text), specials)
    tokenizer.chat_template = TEMPLATES[TEMPLATE_OF[architecture]]
    return tokenizer


PROBE_TEXTS = ["Hello, who are you?", "我是 Snaky，由 snaketune 团队开发。", "  two spaces\n\nand lines 123456 ",
               "emoji 🐍 and a rare 龘", "def f(x):\n    return x * 2\n"]


def reference_ids(processor, specials: list[str], text: str) -> list[int]:
    """What the remote-code SentencePiece tokenizers do: split out special tokens, encode each chunk alone."""
    import re

    if not specials:
        return processor.encode(text)
    ids = []
    for chunk in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if chunk in specials:
            ids.append(processor.piece_to_id(chunk))
        elif chunk:
            ids += processor.encode(chunk)
    return ids


def check_same_ids(tokenizer, reference, specials: list[str]) -> None:
    """Refuse a conversion that would change any token id on probe texts (with every special token in one)."""
    for text in PROBE_TEXTS + ["".join(specials[:2]) + "你好" + "".join(specials[2:4])]:
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ours != reference(text):
            raise UserError(f"the converted tokenizer encodes {text!r} differently from the original; set "
                            "`convert: false` and `trust_remote_code: true` for this model")


def sentencepiece_backend(processor):
    """tokenizers' equivalent of a SentencePiece BPE model, read through sentencepiece's own API (no protobuf):
    the same pieces and ids, merges in score order, byte fallback, user-defined symbols kept whole, and the
    model's dummy-prefix setting (Baichuan2 has none, InternLM2 has one)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    size = processor.get_piece_size()
    pieces = [processor.id_to_piece(i) for i in range(size)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    scores = {piece: processor.get_score(i) for i, piece in enumerate(pieces) if processor.is_unknown(i) is False}
    # SentencePiece stores its meta pieces first (unknown, control, user-defined symbols), then the byte pieces,
    # then the learned ones: everything before the first byte piece is kept whole, never merged into
    first_byte = next((i for i in range(size) if processor.is_byte(i)), None)
    if first_byte is None:
        raise UserError("SentencePiece model without byte fallback: not one the converter knows (set `convert: false`)")
    whole = [i for i in range(first_byte)]
    merges = generate_merges(vocab, scores, skip_tokens={pieces[i] for i in whole})
    unk = processor.id_to_piece(processor.unk_id())
    backend = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    dummy_prefix = processor.encode("a", out_type=str)[0].startswith("▁")
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if dummy_prefix else []) + [normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=" ", left=1)] if dummy_prefix else []))
    backend.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in whole])
    return backend


def convert(source: Path, out: Path) -> dict[str, Any]:
    """Convert the checkpoint in ``source`` into ``out``; return what the manifest records."""
    from transformers import GenerationConfig

    architecture = remote_architecture(source)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    native, state = CONVERTERS[architecture](config, load_state_dict(source))
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(native)
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise RuntimeError(f"converter bug: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, assign=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="5GB")
    tokenizer = convert_tokenizer(architecture, source)
    tokenizer.save_pretrained(out)
    try:
        generation = GenerationConfig.from_pretrained(source)
    except OSError:
        generation = GenerationConfig()
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out)
    return {"converted_from": architecture, "converted_to": native.architectures or [type(model).__name__],
            "chat_template": TEMPLATE_OF[architecture]}
