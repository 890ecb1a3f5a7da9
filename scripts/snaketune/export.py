"""Export a merged Hugging Face model as one GGUF file for llama.cpp and Ollama, plus its Ollama ``Modelfile``.

``export_gguf`` reads the folder ``save_pretrained`` wrote (safetensors weights, config.json,
generation_config.json, tokenizer.json and tokenizer_config.json) and writes a GGUF file with the ``gguf``
package (llama.cpp's own gguf-py): the hyperparameters, the byte-level BPE vocabulary with its merges, special
tokens and chat template, and every weight as f32, f16, bf16 or q8_0. Weights are streamed one tensor at a time,
so a model never has to fit in memory twice. Two layouts are supported: ``LlamaForCausalLM`` (llama.cpp's
``llama`` architecture, whose rope pairs neighbouring dimensions, so q and k rows are reordered) and
``Qwen2ForCausalLM`` (``qwen2``: neox rope as in transformers, q/k/v biases, no reordering).

``modelfile`` writes the text of an Ollama ``Modelfile`` whose Go template renders the same prompt as the
model's own chat template; ``render_modelfile_template`` renders that template for tests and checks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from snaketune.errors import UserError
from snaketune.io import atomic_file, sha256_file

# HF architecture -> llama.cpp architecture name (gguf.MODEL_ARCH_NAMES spells them the same way).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}

# quant name -> (GGML type of 2-D weights, general.file_type). Norms and biases always stay f32, as llama.cpp
# keeps them; a q8_0 weight whose rows are not a multiple of 32 values falls back to f16.
QUANTS = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0")}

# tokenizer.json pre-tokenizer regexes that llama.cpp knows by a name (tokenizer.ggml.pre); it re-implements
# each one in C++, so an unknown regex cannot be carried over and is an error rather than a silent mistokenizer.
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEXES = {QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe"}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of the model folder, or {} where the folder has none."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def gguf_architecture(config: dict[str, Any]) -> str:
    """The llama.cpp architecture for a config.json, or a UserError naming what is supported."""
    names = config.get("architectures") or [config.get("model_type", "unknown")]
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise UserError(f"GGUF export does not support architecture {', '.join(map(str, names))}; "
                    f"supported: {', '.join(ARCHITECTURES)}")


def rope_settings(config: dict[str, Any]) -> tuple[float, str, float]:
    """(rope theta, scaling type, scaling factor) from either transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` keys; only unscaled and linearly scaled rope are exported."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    factor = params.get("factor", scaling.get("factor", 1.0))
    if kind not in ("default", "linear"):
        raise UserError(f"GGUF export supports default and linear rope only, the model uses rope_type {kind!r}")
    return float(theta), kind, float(factor)


def check_supported(config: dict[str, Any], arch: str) -> None:
    """Refuse the config options the llama.cpp graphs for these architectures do not compute."""
    rope_settings(config)
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"GGUF export needs hidden_act silu, the model uses {config['hidden_act']!r}")
    if arch == "llama" and config.get("mlp_bias"):
        raise UserError("GGUF export does not support Llama models with mlp_bias: true")
    if arch == "qwen2" and config.get("use_sliding_window"):
        raise UserError("GGUF export does not support Qwen2 models with use_sliding_window: true")


def rope_to_interleaved(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q or k projection rows (or biases) from transformers' rotate-half rope, which pairs dimension i
    with i + d/2 of each head, to the rope of llama.cpp's ``llama`` architecture, which pairs 2i with 2i+1."""
    head_dim = weight.shape[0] // n_head
    rest = weight.shape[1:]
    return (weight.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(weight.shape))


# --- vocabulary -----------------------------------------------------------------------------------------------


def pre_tokenizer_type(tokenizer_json: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer name (``tokenizer.ggml.pre``) for a tokenizer.json's ``pre_tokenizer``."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex in SPLIT_REGEXES and steps[0].get("behavior") == "Isolated":
            return SPLIT_REGEXES[regex]
    described = json.dumps(pre, ensure_ascii=True)
    raise UserError(f"GGUF export does not recognise the tokenizer's pre_tokenizer {described[:200]}; "
                    "pass the GGUF the model came from (source_gguf) to copy its tokenizer.ggml.pre")


def source_pre_tokenizer(source_gguf: Path) -> str:
    """``tokenizer.ggml.pre`` of the GGUF the model was downloaded as."""
    import gguf

    if not source_gguf.is_file():
        raise UserError(f"{source_gguf}: source GGUF not found")
    field = gguf.GGUFReader(source_gguf).get_field(gguf.Keys.Tokenizer.PRE)
    if field is None:
        raise UserError(f"{source_gguf}: has no tokenizer.ggml.pre to copy")
    return str(field.contents())


@dataclass
class Vocabulary:
    """The tokenizer fields of a GGUF file (the ``tokenizer.*`` keys)."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | list[dict[str, str]] | None
    pre: str


def first_id(*candidates: Any) -> int | None:
    """The first candidate that is a token id (generation configs may hold a list: its first entry counts)."""
    for value in candidates:
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


def read_vocabulary(model_dir: Path, n_vocab: int, pre: str | None) -> Vocabulary:
    """Read a byte-level BPE tokenizer the way transformers loads it, padded to the embedding's ``n_vocab`` rows."""
    import gguf
    from transformers import AutoTokenizer

    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"{model_dir}: no tokenizer.json (GGUF export needs a fast byte-level BPE tokenizer)")
    tokenizer_json = read_json(model_dir / "tokenizer.json")
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{model_dir}: GGUF export needs a byte-level BPE tokenizer.json "
                        f"(model {model.get('type')!r}, decoder {(tokenizer_json.get('decoder') or {}).get('type')!r})")
    if pre is None:
        pre = pre_tokenizer_type(tokenizer_json)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise UserError(f"{model_dir}: the tokenizer has id {max(vocab.values())}, the embedding only {n_vocab} rows")
    added = tokenizer.added_tokens_decoder
    by_id = {index: token for token, index in vocab.items()}
    tokens, types = [], []
    for index in range(n_vocab):
        if index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        elif index in by_id:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer (Qwen2 pads its vocabulary to a multiple of 128)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)

    merges = []
    for merge in model.get("merges", []):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if len(pair) != 2 or any(" " in part for part in pair):
            raise UserError(f"{model_dir}: tokenizer.json merge {merge!r} is not a byte-level BPE pair")
        merges.append(" ".join(pair))

    generation = read_json(model_dir / "generation_config.json")
    config = read_json(model_dir / "config.json")
    special_ids = {}
    for kind, from_tokenizer in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                                 ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
        found = first_id(from_tokenizer, generation.get(f"{kind}_token_id"), config.get(f"{kind}_token_id"))
        if found is not None and found < n_vocab:
            special_ids[kind] = found

    # What the tokenizer adds around a text, seen by encoding one: the post-processor decides, not a config key.
    probe = "Hello"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    add_bos = len(full) > len(plain) and full[0] == special_ids.get("bos")
    add_eos = len(full) > len(plain) and full[-1] == special_ids.get("eos")

    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = [{"name": name, "template": text} for name, text in template.items()]
    return Vocabulary(tokens, [int(t) for t in types], merges, special_ids, add_bos, add_eos, template, pre)


def add_vocabulary(writer: Any, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for kind, index in vocab.special_ids.items():
        getattr(writer, {"unk": "add_unk_token_id", "pad": "add_pad_token_id", "bos": "add_bos_token_id",
                         "eos": "add_eos_token_id"}[kind])(index)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# --- weights --------------------------------------------------------------------------------------------------


@dataclass
class PlannedTensor:
    """One GGUF tensor: where its values come from and how they are stored."""

    name: str
    source: str
    file: Path
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    transform: Callable[[np.ndarray], np.ndarray] | None = None


def safetensors_shapes(model_dir: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """name -> (file, shape) of every tensor of the folder, read from the headers only."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no *.safetensors weights to export")
    shapes = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = (path, tuple(handle.get_slice(name).get_shape()))
    return shapes


def plan_tensors(model_dir: Path, config: dict[str, Any], arch: str, quant: str) -> list[PlannedTensor]:
    """Map every HF weight to its GGUF name, storage type and (for llama q/k) row order."""
    import gguf

    weight_type = gguf.GGMLQuantizationType[QUANTS[quant][0]]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    tied = bool(config.get("tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    shapes = safetensors_shapes(model_dir)
    if not tied and "lm_head.weight" not in shapes:
        raise UserError(f"{model_dir}: tie_word_embeddings is false but the weights have no lm_head.weight")

    plan = []
    for source, (path, shape) in shapes.items():
        if source.endswith("rotary_emb.inv_freq") or (tied and source == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the tied head reads token_embd.weight
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"{model_dir}: weight {source} has no place in a GGUF {arch} model")
        if len(shape) == 1:
            qtype = gguf.GGMLQuantizationType.F32
        elif weight_type == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
            qtype = gguf.GGMLQuantizationType.F16
        else:
            qtype = weight_type
        transform = None
        if arch == "llama" and source.endswith(("q_proj.weight", "q_proj.bias")):
            transform = lambda w, n=n_head: rope_to_interleaved(w, n)  # noqa: E731
        elif arch == "llama" and source.endswith(("k_proj.weight", "k_proj.bias")):
            transform = lambda w, n=n_kv: rope_to_interleaved(w, n)  # noqa: E731
        plan.append(PlannedTensor(name, source, path, shape, qtype, transform))
    return plan


def stored_bytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def tensor_values(plan: list[PlannedTensor]) -> Iterator[np.ndarray]:
    """The stored values of each planned tensor in order, read one at a time (f32 in, GGML layout out)."""
    import gguf
    import torch
    from safetensors import safe_open

    handles: dict[Path, Any] = {}
    try:
        for item in plan:
            if item.file not in handles:
                handles[item.file] = safe_open(item.file, framework="pt")
            values = handles[item.file].get_tensor(item.source).to(torch.float32).numpy()
            if item.transform is not None:
                values = item.transform(values)
            yield gguf.quants.quantize(np.ascontiguousarray(values), item.qtype)
    finally:
        handles.clear()


# --- the file ---------------------------------------------------------------------------------------------------


def add_hyperparameters(writer: Any, config: dict[str, Any], arch: str, quant: str, name: str, n_vocab: int) -> None:
    import gguf

    theta, rope_kind, rope_factor = rope_settings(config)
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    if head_dim * n_head != config["hidden_size"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    if rope_kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_factor)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType[QUANTS[quant][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(model_dir: Path, out: Path, quant: str, source_gguf: Path | None = None,
                name: str | None = None) -> dict[str, Any]:
    """Write the HF model folder ``model_dir`` as a GGUF file at ``out`` (atomically).

    Args:
        model_dir: a folder as ``save_pretrained`` writes it (safetensors, config, tokenizer).
        out: the .gguf file to write.
        quant: how 2-D weights are stored: ``f32``, ``f16``, ``bf16`` or ``q8_0``.
        source_gguf: the GGUF the model came from, if any: its ``tokenizer.ggml.pre`` is copied, which is the
            only tokenizer field a GGUF needs that a transformers folder cannot say for sure.
        name: ``general.name``; defaults to the folder name.

    Returns:
        What was written: path, quant, size (bytes), sha256, architecture, tensors (count), pre_tokenizer.

    Raises:
        UserError: an unsupported architecture, quant, rope scaling or tokenizer, or a folder missing weights.
    """
    import gguf
    from tqdm import tqdm

    model_dir, out = Path(model_dir), Path(out)
    if quant not in QUANTS:
        raise UserError(f"GGUF export quant {quant!r} is not one of {', '.join(QUANTS)}")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no config.json (not a Hugging Face model folder)")
    config = read_json(model_dir / "config.json")
    arch = gguf_architecture(config)
    check_supported(config, arch)
    plan = plan_tensors(model_dir, config, arch, quant)
    embedding = next((item for item in plan if item.name == "token_embd.weight"), None)
    if embedding is None:
        raise UserError(f"{model_dir}: the weights have no model.embed_tokens.weight")
    n_vocab = embedding.shape[0]
    pre = source_pre_tokenizer(Path(source_gguf)) if source_gguf is not None else None
    vocab = read_vocabulary(model_dir, n_vocab, pre)

    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            add_hyperparameters(writer, config, arch, quant, name or model_dir.name, n_vocab)
            add_vocabulary(writer, vocab)
            for item in plan:
                writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32),
                                       stored_bytes(item.shape, item.qtype), raw_dtype=item.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            progress = tqdm(plan, desc=f"GGUF {quant}", unit="tensor", disable=None)
            for values in tensor_values(progress):
                writer.write_tensor_data(values)
        finally:
            writer.close()
    return {"path": str(out), "quant": quant, "size": out.stat().st_size, "sha256": sha256_file(out),
            "architecture": arch, "tensors": len(plan), "pre_tokenizer": vocab.pre}


# --- Ollama Modelfile -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatFormat:
    """A chat format Ollama can render with its legacy ``.System`` / ``.Prompt`` / ``.Response`` template."""

    name: str
    system_open: str  # the text before a system prompt ...
    system_close: str  # ... and after it
    template: str  # Go template
    stops: tuple[str, ...]
    strip_bos: bool  # the chat template starts with the BOS text, which the runtime adds as a token instead


CHAT_FORMATS = (
    ChatFormat(
        name="chatml", system_open="<|im_start|>system\n", system_close="<|im_end|>\n",
        template=("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                  "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
                  "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"),
        stops=("<|im_start|>", "<|im_end|>"), strip_bos=False),
    ChatFormat(
        name="llama3", system_open="<|start_header_id|>system<|end_header_id|>\n\n", system_close="<|eot_id|>",
        template=("{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
                  "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"),
        stops=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), strip_bos=True),
)

GO_FIELD = re.compile(r"\{\{ if \.(System|Prompt) \}\}(.*?)\{\{ end \}\}|\{\{ \.(System|Prompt) \}\}", re.DOTALL)


def render_modelfile_template(template: str, system: str, prompt: str) -> str:
    """The prompt Ollama builds from a template of the form ``modelfile`` writes, up to where the answer starts.

    Supports exactly that form: ``{{ if .System }}...{{ end }}`` / ``{{ if .Prompt }}...{{ end }}`` blocks (not
    nested), ``{{ .System }}``, ``{{ .Prompt }}``, and ``{{ .Response }}`` where generation begins.
    """
    values = {"System": system, "Prompt": prompt}

    def fill(match: re.Match[str]) -> str:
        if match.group(3):
            return values[match.group(3)]
        return GO_FIELD.sub(fill, match.group(2)) if values[match.group(1)] else ""

    head = template.split("{{ .Response }}", 1)[0]
    rendered = GO_FIELD.sub(fill, head)
    if "{{" in GO_FIELD.sub("", head):
        raise ValueError("the template uses Go-template constructs beyond .System/.Prompt/.Response")
    return rendered


def chat_text(tokenizer: Any, system: str | None, prompt: str) -> str:
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def match_chat_format(tokenizer: Any) -> tuple[ChatFormat, str | None]:
    """The chat format whose Go template renders what the tokenizer's chat template renders, for a system+user
    and a user-only conversation, and the default system prompt the template adds when none is given."""
    system, prompt = "SYSTEM-PROBE follow the rules.", "USER-PROBE say hi."
    with_system, user_only = chat_text(tokenizer, system, prompt), chat_text(tokenizer, None, prompt)
    bos = tokenizer.bos_token or ""
    for fmt in CHAT_FORMATS:
        texts = [with_system, user_only]
        if fmt.strip_bos and bos:
            texts = [text[len(bos):] if text.startswith(bos) else text for text in texts]
        if render_modelfile_template(fmt.template, system, prompt) != texts[0]:
            continue
        if render_modelfile_template(fmt.template, "", prompt) == texts[1]:
            return fmt, None
        if texts[1].startswith(fmt.system_open):
            default = texts[1][len(fmt.system_open):].split(fmt.system_close, 1)[0]
            if default and render_modelfile_template(fmt.template, default, prompt) == texts[1]:
                return fmt, default
    raise UserError("Modelfile export supports ChatML and Llama-3 chat templates; this model's renders "
                    f"{with_system[:120]!r}")


def quoted_block(text: str) -> str:
    if '"""' in text:
        raise UserError(f'Modelfile text cannot contain """: {text[:80]!r}')
    return f'"""{text}"""'


def modelfile(gguf_name: str, tokenizer: Any, parameters: dict[str, Any] | None = None) -> str:
    """The text of an Ollama ``Modelfile`` for an exported GGUF file.

    Args:
        gguf_name: the GGUF file name beside the Modelfile (``.gguf`` is added when missing).
        tokenizer: a transformers tokenizer with the model's chat template, or the model folder to load it from.
        parameters: extra ``PARAMETER`` lines (e.g. ``{"temperature": 0.7}``), written after the stop tokens.

    Raises:
        UserError: the chat template is neither ChatML nor Llama-3, so no Go template can be derived.
    """
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("Modelfile export needs a tokenizer with a chat template")
    fmt, default_system = match_chat_format(tokenizer)
    file = gguf_name if gguf_name.endswith(".gguf") else f"{gguf_name}.gguf"
    lines = [f"FROM ./{file}", f"TEMPLATE {quoted_block(fmt.template)}"]
    if default_system:
        lines.append(f"SYSTEM {quoted_block(default_system)}")
    lines += [f'PARAMETER stop "{stop}"' for stop in fmt.stops]
    lines += [f"PARAMETER {key} {value}" for key, value in (parameters or {}).items()]
    return "\n".join(lines) + "\n"
