"""Base models: the builtin tiny model, local folders, GGUF files, ModelScope and Hugging Face downloads.

Every source ends in the same contract: ``results/models/{model}/manifest.json`` naming where the model folder
is (``path``), where it came from and the size and sha256 of each file. Later stages read only the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from snaketune import __version__
from snaketune.errors import UserError
from snaketune.io import atomic_dir, safetensors_problem, sha256_file
from snaketune.templates import TEMPLATES

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CJK_CHARACTER = "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\u3000-\u303f\uff00-\uffef]"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "qwen.tiktoken", "tokenizer_config.json")


def file_inventory(folder: Path) -> list[dict[str, Any]]:
    """Size and sha256 of every file under ``folder`` (the manifest itself excluded), sorted by path."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"):
        if ".cache" in path.relative_to(folder).parts:
            continue
        files.append({"path": path.relative_to(folder).as_posix(), "size": path.stat().st_size,
                      "sha256": sha256_file(path)})
    return files


def check_model_folder(folder: Path, what: str) -> None:
    """A usable Hugging Face model folder has a config.json, tokenizer files and whole safetensors files."""
    if not folder.is_dir():
        raise UserError(f"{what}: `{folder}` is not a folder")
    if not (folder / "config.json").is_file():
        raise UserError(f"{what}: `{folder}` has no config.json; is it a Hugging Face model folder?")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{what}: `{folder}` has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    missing = missing_weights(folder)
    if missing:
        raise UserError(f"{what}: `{folder}` lacks weight files: {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else "") + "; copy or download them")
    for shard in sorted(folder.rglob("*.safetensors")):
        problem = safetensors_problem(shard)
        if problem:
            raise UserError(f"{what}: {shard}: {problem}; download it again")


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def missing_weights(folder: Path) -> list[str]:
    """The weight files a model folder lacks: the shards its index names that are not there, or, without an index,
    a single weights file when there is none (a folder with config and tokenizer alone)."""
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            try:
                shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
            except (ValueError, KeyError, AttributeError):
                return [f"{index} (not a readable weight index)"]
            return sorted(shard for shard in shards if not (folder / shard).is_file())
    if any((folder / name).is_file() for name in WEIGHT_FILES) or any(folder.glob("*.safetensors")):
        return []
    return [f"{' or '.join(WEIGHT_FILES)} (no weights at all)"]


def corpus_texts(paths: list[str]) -> Iterator[str]:
    """Every string in the given JSON/JSONL files (keys too), or every line of a plain text file."""

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for key, item in value.items():
                yield key
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)

    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"tokenizer_corpus: `{path}` not found")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".json", ".jsonl"):
            lines = [text] if path.suffix == ".json" else [x for x in text.split("\n") if x.strip()]
            yield from strings([json.loads(line) for line in lines])
        else:
            yield from text.split("\n")


def build_tokenizer(corpus: list[str], vocab_size: int, extra_special_tokens: tuple[str, ...] = ()):
    """Train a byte-level BPE tokenizer (GPT-2/Qwen2 style) on local text, with ChatML special tokens (and a
    vision-language family's image tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    # CJK characters are split apart before byte-level BPE: on a corpus this small, BPE would otherwise merge
    # whole Chinese sentences (no spaces to stop it) into single tokens that no other sentence shares.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CJK_CHARACTER), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + list(extra_special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus_texts(corpus), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
    )
    tokenizer.chat_template = TEMPLATES["chatml"]
    return tokenizer


VISION_TOKENS = {"qwen2_vl": ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
                 "llava": ("<image>",)}
TINY_IMAGE = 56  # pixels a side: the builtin vision towers see 56x56 images as 14-pixel patches


def build_builtin(settings: dict[str, Any], out: Path) -> None:
    """Build a tiny random-init model of a real architecture, deterministic from ``seed``: a causal LM (qwen2,
    llama), or a vision-language model with its processor (qwen2_vl: Qwen2-VL's layout; llava: a CLIP vision
    tower, a projector and a Qwen2 language model)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    architecture = settings["architecture"]
    tokenizer = build_tokenizer(settings["tokenizer_corpus"], settings["vocab_size"],
                                VISION_TOKENS.get(architecture, ()))
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    text = dict(
        vocab_size=len(tokenizer), hidden_size=settings["hidden_size"],
        intermediate_size=settings["intermediate_size"], num_hidden_layers=settings["num_hidden_layers"],
        num_attention_heads=settings["num_attention_heads"], num_key_value_heads=settings["num_key_value_heads"],
        max_position_embeddings=settings["max_position_embeddings"],
        tie_word_embeddings=settings["tie_word_embeddings"],
        initializer_range=settings["initializer_range"],
        bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
    )
    torch.manual_seed(settings["seed"])
    if architecture in VISION_TOKENS:
        model, image_processor = tiny_vision_model(architecture, text, tokenizer)
        image_processor.save_pretrained(out)
    else:
        model = AutoModelForCausalLM.from_config({"qwen2": Qwen2Config, "llama": LlamaConfig}[architecture](**text))
    model.generation_config = GenerationConfig(
        eos_token_id=[eos, pad], pad_token_id=pad, bos_token_id=None, do_sample=False,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def tiny_vision_model(architecture: str, text: dict[str, Any], tokenizer):
    """A random-init vision-language model in a real family's layout, and its image processor. (No transformers
    processor class: Qwen2-VL's wants a video processor, which needs torchvision; the stages use the tokenizer and
    the image processor, each saved in the folder as a real checkpoint has them.)"""
    from transformers import (
        AutoModelForImageTextToText,
        CLIPVisionConfig,
        LlavaConfig,
        Qwen2Config,
        Qwen2VLConfig,
    )

    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    tower = dict(hidden_size=hidden, num_attention_heads=heads, intermediate_size=2 * hidden, num_hidden_layers=1,
                 patch_size=14, initializer_range=text["initializer_range"])
    if architecture == "qwen2_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        half = hidden // heads // 2  # rotary frequencies per head, split over time, height and width as Qwen2-VL
        section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]  # 128: 16 24 24
        config = Qwen2VLConfig(
            text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": section}},
            vision_config=dict(depth=1, embed_dim=hidden, num_heads=heads, hidden_size=hidden, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3, mlp_ratio=2),
            **{f"{name}_token_id": tokenizer.convert_tokens_to_ids(token) for name, token in (
                ("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>"),
                ("image", "<|image_pad|>"), ("video", "<|video_pad|>"))},
            tie_word_embeddings=text["tie_word_embeddings"])
        images = Qwen2VLImageProcessorPil(min_pixels=TINY_IMAGE * TINY_IMAGE, max_pixels=4 * TINY_IMAGE * TINY_IMAGE)
    else:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        config = LlavaConfig(vision_config=CLIPVisionConfig(image_size=TINY_IMAGE, **tower),
                             text_config=Qwen2Config(**text), image_token_index=tokenizer.convert_tokens_to_ids(
                                 "<image>"), projector_hidden_act="gelu", vision_feature_layer=-1,
                             vision_feature_select_strategy="default", tie_word_embeddings=text["tie_word_embeddings"])
        images = CLIPImageProcessorPil(size={"shortest_edge": TINY_IMAGE},
                                       crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE})
    return AutoModelForImageTextToText.from_config(config), images


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` a GGUF file declares (read from its header; no tensor is loaded)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields["general.architecture"]
    except (KeyError, ValueError, OSError) as exc:
        raise UserError(f"gguf model: `{path}` is not a readable GGUF file ({exc})") from None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def import_gguf(settings: dict[str, Any], out: Path) -> None:
    """Write a GGUF file as a Hugging Face folder in ``out``: its weights dequantized to safetensors in
    ``settings["dtype"]``, the tokenizer, chat template and generation config its metadata holds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path = Path(settings["path"])
    if not path.is_file() or path.suffix != ".gguf":
        raise UserError(f"gguf model: `{path}` is not a .gguf file")
    architecture = gguf_architecture(path)
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UserError(f"gguf model: {path}: architecture `{architecture}` cannot be dequantized by transformers "
                        f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    print(f"dequantizing {path} ({architecture}) to {settings['dtype']}", file=sys.stderr)
    folder, name = str(path.parent.absolute()), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, settings["dtype"]),
                                                 quantization_config=GgufConfig(dequantize=True))
    # The weights are plain tensors now: drop the marker that says they are GGUF blocks, or saving refuses.
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def download_modelscope(settings: dict[str, Any]) -> Path:
    from modelscope import snapshot_download

    return Path(snapshot_download(model_id=settings["id"], revision=settings["revision"],
                                  cache_dir=settings["cache_dir"]))


def download_huggingface(settings: dict[str, Any]) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=settings["id"], revision=settings["revision"],
                                  cache_dir=settings["cache_dir"]))


def convert_if_remote(settings: dict[str, Any], folder: Path, staging: Path) -> dict[str, Any] | None:
    """Convert a remote-code checkpoint of a known family into ``staging`` (``convert``, on by default); refuse
    to run any other remote code unless the entry says ``trust_remote_code: true``."""
    from snaketune.convert import convert, needs_remote_code, remote_architecture

    name = settings.get("name", settings.get("id") or settings.get("path"))
    architecture = remote_architecture(folder)
    if architecture and settings.get("convert", True):
        print(f"converting {architecture} in {folder} to a native architecture (no remote code)", file=sys.stderr)
        result = convert(folder, staging)
        return {**result, "from": str(folder), "revision": settings.get("revision")}
    if (architecture or needs_remote_code(folder)) and not settings["trust_remote_code"]:
        what = f"`{architecture}` is set to `convert: false`" if architecture else "names code in its auto_map"
        raise UserError(f"model `{name}`: {folder} ships its own modelling code and {what}; set "
                        f"`trust_remote_code: true` in that model's entry to run it"
                        + ("" if architecture else " (only Qwen-1, Baichuan2 and InternLM2 can be converted)"))
    return None


def fetch(settings: dict[str, Any], out: str | Path) -> dict[str, Any]:
    """Make the model available and write ``out/manifest.json``; return the manifest.

    ``out`` is replaced atomically: a killed download leaves no manifest behind.
    """
    out = Path(out)
    source = settings["source"]
    with atomic_dir(out) as staging:
        if source == "builtin":
            build_builtin(settings, staging)
            folder, stored = staging, out
        elif source == "gguf":
            import_gguf(settings, staging)
            folder, stored = staging, out
        elif source == "local":
            folder = Path(settings["path"])
            check_model_folder(folder, "local model")
            if settings["copy"]:
                shutil.copytree(folder, staging, dirs_exist_ok=True)
                folder, stored = staging, out
            else:
                stored = folder
        else:
            folder = download_modelscope(settings) if source == "modelscope" else download_huggingface(settings)
            check_model_folder(folder, f"{source} download of `{settings['id']}`")
            stored = folder
        converted = None
        if source in ("local", "modelscope", "huggingface"):
            converted = convert_if_remote(settings, folder, staging)
            if converted:
                folder, stored = staging, out
        manifest = {
            "source": source,
            **({"gguf_sha256": sha256_file(settings["path"]), "gguf_size": Path(settings["path"]).stat().st_size}
               if source == "gguf" else {}),
            "id": settings.get("id") or settings.get("path") or f"builtin-{settings.get('architecture')}",
            "revision": settings.get("revision"),
            "path": os.path.relpath(stored) if not Path(stored).is_absolute() else str(stored),
            "trust_remote_code": settings["trust_remote_code"] and not converted,
            "converted": converted,
            "snaketune_version": __version__,
            "files": file_inventory(folder),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def model_path(manifest_path: str | Path) -> tuple[Path, bool]:
    """Read a manifest and return (model folder, trust_remote_code).

    The folder is always a folder on disk, returned as an absolute path: a folder that vanished is an error here,
    never a name that transformers would go and look up on a model hub.
    """
    manifest = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
    folder = Path(manifest["path"]).absolute()
    if not (folder / "config.json").is_file():
        raise UserError(f"{manifest_path}: the model folder it names, {manifest['path']}, is gone (or has no "
                        "config.json); restore it, or rebuild the manifest with `snakemake --forcerun download`")
    return folder, bool(manifest["trust_remote_code"])
