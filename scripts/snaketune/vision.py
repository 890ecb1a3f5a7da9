"""Images in conversations: where a row's images are, checking they decode, and what each vision-language family
needs (its image marker in the text, the processor's image tokens, the parts of the model that see).

A row keeps ``<image>`` where each of its images goes, in order, and its images as references: a path (a relative
one resolves against the dataset file's folder) or a ``data:`` URL. Images are never copied into the
parquet splits; a ``data:`` URL is written once into the build's image folder, named by its content's hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLACEHOLDER = "<image>"
DATA_URL = re.compile(r"data:image/(?P<kind>[a-z0-9.+-]+);base64,(?P<data>.*)", re.DOTALL | re.IGNORECASE)


class ImageProblem(ValueError):
    """An image a row names that is missing, unreadable or does not decode: that row is bad."""


@dataclass(frozen=True)
class Family:
    """What one vision-language family (config.json's ``model_type``) needs besides its weights."""

    model_type: str
    marker: str  # what stands for one image in the rendered text, before the processor expands it
    image_token: str  # the token the processor repeats once per image feature
    tower: tuple[str, ...]  # name prefixes of the vision encoder's parameters (frozen by default)
    projector: tuple[str, ...]  # name prefixes of the projector from vision features to the language model


FAMILIES = {
    "qwen2_vl": Family("qwen2_vl", "<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>",
                       ("model.visual.patch_embed", "model.visual.blocks", "visual.patch_embed", "visual.blocks"),
                       ("model.visual.merger", "visual.merger")),
    "qwen2_5_vl": Family("qwen2_5_vl", "<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>",
                         ("model.visual.patch_embed", "model.visual.blocks", "visual.patch_embed", "visual.blocks"),
                         ("model.visual.merger", "visual.merger")),
    "llava": Family("llava", "<image>", "<image>", ("model.vision_tower", "vision_tower"),
                    ("model.multi_modal_projector", "multi_modal_projector")),
}


def model_config(model_dir: str | Path) -> dict[str, Any]:
    """A model folder's config.json ({} where it has none)."""
    config = Path(model_dir) / "config.json"
    return json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}


def family_of(model_dir: str | Path) -> Family | None:
    """The vision-language family of a model folder, or None for a text-only model."""
    return FAMILIES.get(model_config(model_dir).get("model_type"))


# -- the data side ------------------------------------------------------------------------------------------------
def resolve(ref: Any, base: Path) -> str:
    """An image reference as a row gives it -> a ``data:`` URL or a path: a relative one is taken relative to
    ``base``, the dataset file's folder, and stays relative to the working directory as the config's paths do."""
    if not isinstance(ref, str) or not ref.strip():
        raise ImageProblem(f"an image must be a path or a data URL, got {type(ref).__name__} {ref!r:.40}")
    ref = ref.strip()
    if ref.lower().startswith("data:"):
        return ref
    if ref.lower().startswith(("http://", "https://")):
        raise ImageProblem(f"image `{ref:.80}`: URLs are not fetched; download the image and give its path")
    ref = ref[len("file://"):] if ref.startswith("file://") else ref
    return os.path.normpath(base / ref)  # relative to the working directory when the dataset's path is


def image_bytes(ref: str) -> bytes:
    """The encoded image a resolved reference names."""
    match = DATA_URL.fullmatch(ref)
    if ref.lower().startswith("data:"):
        if not match:
            raise ImageProblem(f"image `{ref:.40}...`: not a base64 data URL of an image (data:image/png;base64,...)")
        try:
            return base64.b64decode(match["data"], validate=True)
        except (binascii.Error, ValueError):
            raise ImageProblem(f"image `{ref:.40}...`: its base64 does not decode") from None
    try:
        return Path(ref).read_bytes()
    except FileNotFoundError:
        raise ImageProblem(f"image `{ref}` not found") from None
    except OSError as exc:
        raise ImageProblem(f"image `{ref}` cannot be read ({exc.strerror or exc})") from None


def undecodable(ref: str, exc: Exception) -> ImageProblem:
    shown = f"{ref:.40}..." if ref.startswith("data:") else ref
    return ImageProblem(f"image `{shown}` does not decode ({str(exc).splitlines()[0][:120]})")


def open_image(ref: str):
    """The image as RGB, fully decoded (a truncated file fails here, not mid-training)."""
    import io

    from PIL import Image, UnidentifiedImageError

    data = image_bytes(ref)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise undecodable(ref, exc) from None


def image_size(ref: str) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image_bytes(ref))) as image:
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise undecodable(ref, exc) from None


def store_data_url(ref: str, folder: Path) -> str:
    """A ``data:`` URL written once into ``folder`` (named by its content's hash); a path is returned as is."""
    if not ref.startswith("data:"):
        return ref
    data = image_bytes(ref)
    kind = DATA_URL.fullmatch(ref)["kind"].lower().replace("jpeg", "jpg")
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.{kind}"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(path)


def content_parts(parts: list, where: str) -> tuple[str, list[str]]:
    """OpenAI content parts -> (text with ``<image>`` where each image part was, the image references)."""
    texts, images = [], []
    for index, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ImageProblem(f"{where}[{index}].text must be a string")
            texts.append(part["text"])
        elif kind in ("image_url", "image"):
            value = part.get(kind)
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str):
                raise ImageProblem(f'{where}[{index}].{kind}: an image part needs a url (a path or a data URL)')
            texts.append(PLACEHOLDER)
            images.append(url)
        else:
            raise ImageProblem(f'{where}[{index}]: a content part is {{"type": "text", "text": ...}} or '
                               '{"type": "image_url", "image_url": {"url": ...}}')
    return "".join(texts), images


def place_images(messages: list[dict[str, str]], count: int) -> None:
    """Check the ``<image>`` placeholders against ``count`` images; with none, put them all at the start of the
    first user turn (as LLaVA's data does)."""
    found = sum(message["content"].count(PLACEHOLDER) for message in messages)
    if found == 0 and count:
        first = next(message for message in messages if message["role"] == "user")
        first["content"] = PLACEHOLDER * count + "\n" + first["content"]
    elif found != count:
        raise ImageProblem(f"{found} {PLACEHOLDER} placeholder{'s' if found != 1 else ''} for {count} "
                           f"image{'s' if count != 1 else ''}")
    for message in messages:
        if message["role"] != "user" and PLACEHOLDER in message["content"]:
            raise ImageProblem(f"an image in a {message['role']} turn: images go in user turns")


# -- the model side -----------------------------------------------------------------------------------------------
def with_markers(messages: list[dict[str, str]], family: Family) -> list[dict[str, str]]:
    """The messages with each ``<image>`` replaced by the family's image marker, ready for the chat template."""
    if family.marker == PLACEHOLDER:
        return messages
    return [{**message, "content": message["content"].replace(PLACEHOLDER, family.marker)} for message in messages]


def load_image_processor(model_dir: str | Path):
    """The model's image processor (preprocessor_config.json). Without torchvision, transformers gives its PIL
    implementation, which computes the same pixels."""
    import logging

    from transformers import AutoImageProcessor

    quiet = logging.getLogger("transformers.image_processing_utils_fast")  # "requires torchvision" on every load
    level, quiet.level = quiet.level, logging.ERROR
    try:
        return AutoImageProcessor.from_pretrained(model_dir)
    finally:
        quiet.setLevel(level)


def image_token_counts(family: Family, config: dict[str, Any], image_processor,
                       sizes: list[tuple[int, int]]) -> list[int]:
    """How many image tokens each image of (width, height) ``sizes`` stands for in the input ids: Qwen2-VL's
    dynamic resolution (patches merged 2x2), or LLaVA's fixed grid of patches (its CLS feature dropped)."""
    if family.model_type in ("qwen2_vl", "qwen2_5_vl"):
        merge = image_processor.merge_size ** 2
        return [image_processor.get_number_of_image_patches(height, width) // merge for width, height in sizes]
    vision = config["vision_config"]
    grid = (vision["image_size"] // vision["patch_size"]) ** 2
    extra = 1 if config.get("vision_feature_select_strategy", "default") == "full" else 0
    return [grid + extra for _ in sizes]


def pixel_inputs(image_processor, images: list) -> dict[str, Any]:
    """The model's image inputs for ``images`` (PIL), as torch tensors: ``pixel_values`` (and Qwen2-VL's
    ``image_grid_thw``)."""
    return dict(image_processor(images=images, return_tensors="pt"))


def expand_image_tokens(ids: list[int], labels: list[int], image_token_id: int,
                        counts: list[int]) -> tuple[list[int], list[int]]:
    """Repeat each image token of ``ids`` as many times as its image has features; those positions are never
    labelled. The number of image tokens must equal the number of images."""
    positions = [index for index, token in enumerate(ids) if token == image_token_id]
    if len(positions) != len(counts):
        raise ImageProblem(f"{len(positions)} image tokens in the rendered text for {len(counts)} images")
    out_ids, out_labels, start = [], [], 0
    for position, count in zip(positions, counts, strict=True):
        out_ids += ids[start:position] + [image_token_id] * count
        out_labels += labels[start:position] + [-100] * count
        start = position + 1
    return out_ids + ids[start:], out_labels + labels[start:]


@dataclass
class ImageInputs:
    """What the dataset build, train and predict need of a vision-language model folder besides its tokenizer."""

    family: Family
    config: dict[str, Any]
    image_processor: Any
    image_token_id: int

    @classmethod
    def of(cls, model_dir: str | Path, tokenizer) -> ImageInputs | None:
        """The model's image inputs, or None for a text-only model."""
        config = model_config(model_dir)
        family = FAMILIES.get(config.get("model_type"))
        if family is None:
            return None
        return cls(family, config, load_image_processor(model_dir), tokenizer.convert_tokens_to_ids(family.image_token))

    def token_counts(self, sizes: list[tuple[int, int]]) -> list[int]:
        return image_token_counts(self.family, self.config, self.image_processor, sizes)



def expand_rows(columns: dict[str, list], sizes: list[list[tuple[int, int]]], inputs: ImageInputs,
                max_length: int) -> None:
    """Expand each row's image tokens (``columns``: input_ids, labels, n_tokens, n_supervised, truncated,
    full_length as lists, updated in place). A row longer than ``max_length`` afterwards is cut there, unless the
    cut would split an image: then it keeps no trainable token (and the build counts it as dropped)."""
    for row, row_sizes in enumerate(sizes):
        if not row_sizes:
            continue
        if columns["input_ids"][row].count(inputs.image_token_id) < len(row_sizes):  # cut before an image
            columns["labels"][row] = [-100] * len(columns["labels"][row])
            columns["n_supervised"][row] = 0
            continue
        ids, labels = expand_image_tokens(columns["input_ids"][row], columns["labels"][row], inputs.image_token_id,
                                          inputs.token_counts(row_sizes))
        columns["full_length"][row] += len(ids) - len(columns["input_ids"][row])
        if len(ids) > max_length:
            if inputs.image_token_id in ids[max_length:]:
                labels = [-100] * len(labels)
            ids, labels = ids[:max_length], labels[:max_length]
            columns["truncated"][row] = True
        columns["input_ids"][row], columns["labels"][row] = ids, labels
        columns["n_tokens"][row] = len(ids)
        columns["n_supervised"][row] = sum(label != -100 for label in labels)


def prompt_with_images(inputs: ImageInputs, ids: list[int], refs: list[str]) -> tuple[list[int], list]:
    """A prompt's ids with each image token repeated for its image's features, and the images ``refs`` names
    (decoded once, for ``model_image_inputs``)."""
    images = [open_image(ref) for ref in refs]
    counts = inputs.token_counts([image.size for image in images])
    return expand_image_tokens(ids, ids, inputs.image_token_id, counts)[0], images


def model_image_inputs(inputs: ImageInputs, input_ids, images: list, token_types: bool) -> dict[str, Any]:
    """The keyword arguments besides ids that a vision-language forward needs for a batch whose rows hold
    ``images`` (decoded, in row order): their pixel inputs, and (``token_types``: where the model's forward takes
    it, as transformers 5.2x's Qwen2-VL) the image-token mask ``mm_token_type_ids``."""
    if not images:
        return {}
    found = int((input_ids == inputs.image_token_id).sum())
    counts = sum(inputs.token_counts([image.size for image in images]))
    if found != counts:
        raise ImageProblem(f"{found} image tokens in the batch's ids for {counts} image features: the dataset was "
                           "built for another image processor; rebuild it")
    extra = pixel_inputs(inputs.image_processor, images)
    if token_types:
        extra["mm_token_type_ids"] = (input_ids == inputs.image_token_id).long()
    return extra


def takes_token_types(model) -> bool:
    """Whether the model's forward takes ``mm_token_type_ids`` (looked up on the model a PEFT wrapper holds)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "mm_token_type_ids" in inspect.signature(base.forward).parameters


@dataclass
class ImageCollator:
    """Training batches of rows with images: the text collator's padded ids, labels and attention mask, and the
    model's image inputs for the rows' images (read from disk a batch at a time)."""

    inputs: ImageInputs
    text_collator: Any  # what pads a text-only batch (the train stage's DataCollatorForSeq2Seq)
    token_types: bool

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.text_collator([{key: row[key] for key in ("input_ids", "labels")} for row in rows])
        images = [open_image(ref) for row in rows for ref in row.get("images") or []]
        return {**batch, **model_image_inputs(self.inputs, batch["input_ids"], images, self.token_types)}


def trainable_parts(model, family: Family, tower: bool, projector: bool, language: bool) -> dict[str, list[str]]:
    """Which modules of a vision-language model train: ``lora`` (the linear layers LoRA wraps: the language
    model's, and the tower's when it trains; never the output head) and ``whole`` (the projector's top modules,
    trained whole, as LoRA's modules_to_save). Also sets requires_grad for a full fine-tune."""
    import torch

    def part(name: str) -> str:
        return "tower" if name.startswith(family.tower) else "projector" if name.startswith(family.projector) \
            else "language"

    wanted = {"tower": tower, "projector": projector, "language": language}
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point():  # QLoRA's 4-bit weights stay frozen: LoRA trains beside them
            parameter.requires_grad_(wanted[part(name)])
    output = model.get_output_embeddings()
    lora = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and module is not output and wanted[part(name)] and part(name) != "projector"]
    whole = [prefix for prefix in family.projector if projector and any(
        name == prefix for name, _ in model.named_modules())]
    counts = {name: sum(p.numel() for n, p in model.named_parameters() if part(n) == name) for name in wanted}
    shown = [f"{name} {counts[name]:,} parameters ({'trains' if wanted[name] else 'frozen'})" for name in wanted]
    print("vision-language parts: " + ", ".join(shown), file=sys.stderr)
    return {"lora": lora, "whole": whole}


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def copy_processor_files(model_dir: str | Path, out: str | Path) -> list[str]:
    """Copy a vision-language model's processor configs (image processor, processor, video processor) beside the
    tokenizer in ``out``, so the folder loads with transformers' AutoProcessor as the base did."""
    import shutil

    copied = []
    for name in PROCESSOR_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, Path(out) / name)
            copied.append(name)
    return copied
