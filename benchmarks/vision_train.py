#!/usr/bin/env python
"""A vision-language LoRA run through the dataset and train stages' own code, on one GPU (issue 34):

a random-init model of Qwen2-VL-2B's shape (vision tower of 32 blocks, 1280 wide; Qwen2 1.5B language model) in
bf16, its image processor as Qwen2-VL-2B-Instruct ships it, ``--rows`` rows of a question on one ``--image-size``
square image (random noise, so no image compresses to fewer patches) and an answer, built by
``snaketune.dataset.build`` (paths in the parquet, image tokens expanded) and trained by
``snaketune.train.recipe.train`` with LoRA r16 on the language model, the projector whole, the tower frozen (the
stage's defaults). Reports tokens/s and images/s (median over the steps after the first two) and peak GPU memory.

    python benchmarks/vision_train.py --out benchmarks/results/vision_train_h100.json
    python benchmarks/vision_train.py --shape tiny --rows 32 --steps 4 --out /tmp/vision.json   # the CPU check
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

SHAPES = {  # text: the language model; vision: the tower (hidden_size: what the merger projects to)
    "qwen2-vl-2b": {"text": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                 rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                                 max_position_embeddings=32768, tie_word_embeddings=True),
                    "vision": dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=1536, mlp_ratio=4)},
    "tiny": {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1024,
                          rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=False),
             "vision": dict(depth=1, embed_dim=64, num_heads=2, hidden_size=64, mlp_ratio=2)},
}
IMAGE_PROCESSOR = {  # Qwen2-VL-2B-Instruct's preprocessor_config.json
    "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
    "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "do_resize": True, "do_rescale": True,
    "do_normalize": True, "do_convert_rgb": True, "rescale_factor": 0.00392156862745098,
}
WORDS = "the square circle colour red blue green left right above below how many what where which image".split()


def build_model(shape: str, folder: Path) -> None:
    """The random-init model, a byte-level BPE tokenizer with Qwen2-VL's image tokens, the image processor."""
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig

    from snaketune.download import VISION_TOKENS, build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(" ".join(WORDS) + "\n", encoding="utf-8")
    tokenizer = build_tokenizer([str(corpus)], 400, VISION_TOKENS["qwen2_vl"])
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>"), ("image", "<|image_pad|>"),
        ("video", "<|video_pad|>"))}
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    text = {**SHAPES[shape]["text"], "eos_token_id": eos, "pad_token_id": pad, "bos_token_id": None}
    config = Qwen2VLConfig(text_config=text, vision_config={**SHAPES[shape]["vision"], "patch_size": 14,
                                                            "spatial_merge_size": 2, "temporal_patch_size": 2},
                           tie_word_embeddings=text["tie_word_embeddings"],
                           **{f"{name}_token_id": value for name, value in ids.items()})
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR, indent=2), encoding="utf-8")


def write_rows(folder: Path, rows: int, size: int, words: int) -> Path:
    """``rows`` sharegpt rows with one noise image each, as a user's data folder holds them."""
    import numpy as np
    from PIL import Image

    rng, images = random.Random(0), folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0)
    lines = []
    for index in range(rows):
        name = f"images/{index:04d}.png"
        Image.fromarray(noise.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
        question = " ".join(rng.choice(WORDS) for _ in range(words)) + "?"
        answer = " ".join(rng.choice(WORDS) for _ in range(words)) + "."
        lines.append(json.dumps({"images": [name], "conversations": [
            {"from": "human", "value": "<image>" + question}, {"from": "gpt", "value": answer}]}))
    path = folder / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2-vl-2b", choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=448, help="pixels a side (448: 256 image tokens)")
    parser.add_argument("--words", type=int, default=48, help="words in each question and each answer")
    parser.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--work", default="/tmp/snaketune-vision")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import pandas as pd
    import torch
    from transformers import AutoTokenizer

    from snaketune.dataset import OUTPUTS, build
    from snaketune.settings import DatasetSettings, TrainSettings
    from snaketune.train.recipe import TrainFiles, train
    from snaketune.vision import ImageInputs

    work = Path(args.work)
    began = time.perf_counter()
    build_model(args.shape, work / "model")
    data = write_rows(work / "data", args.rows, args.image_size, args.words)
    setup = time.perf_counter() - began
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    built = work / "built"
    outputs = {name: built / f"{name}.parquet" for name in ("train", "eval", "test")}
    outputs.update(stats=built / "stats.json", lengths=built / "lengths.png")
    assert set(outputs) == set(OUTPUTS)
    began = time.perf_counter()
    stats = build(DatasetSettings(path=str(data), format="sharegpt", max_seq_length=2048, eval_size=2,
                                  test_size=2), tokenizer, outputs, workers=1,
                  image_inputs=ImageInputs.of(work / "model", tokenizer))
    build_seconds = time.perf_counter() - began
    run = work / "run"
    files = TrainFiles(train=outputs["train"], eval=outputs["eval"], stats=outputs["stats"], adapter=run / "adapter",
                       train_log=run / "train_log.csv", summary=run / "summary.json", curve=run / "loss.png",
                       checkpoints=run / "checkpoints")
    settings = TrainSettings(method="lora", lora_rank=16, lora_alpha=32, lora_dropout=0.0, learning_rate=1e-4,
                             max_steps=args.steps, per_device_train_batch_size=args.batch, logging_steps=1,
                             save_steps=10_000, lr_scheduler_type="constant", precision="auto")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = train(settings, work / "model", False, files, run_name="vision")
    log = pd.read_csv(files.train_log)
    speeds = log["tokens_per_second"].dropna().tolist()[2:] or log["tokens_per_second"].dropna().tolist()
    tokens_per_row = stats["splits"]["train"]["tokens"] / stats["splits"]["train"]["rows"]
    tokens_per_second = statistics.median(speeds)
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
        else "cpu", "torch": torch.__version__, "shape": args.shape, "image_size": args.image_size,
        "image_tokens_per_row": ImageInputs.of(work / "model", tokenizer).token_counts(
            [(args.image_size, args.image_size)])[0],
        "tokens_per_row": round(tokens_per_row, 1), "rows": stats["splits"]["train"]["rows"],
        "per_device_train_batch_size": args.batch, "steps": args.steps,
        "tokens_per_second": round(tokens_per_second, 1),
        "images_per_second": round(tokens_per_second / tokens_per_row, 2),  # one image a row
        "peak_memory_gib": summary.get("peak_memory_gib"), "speedups": summary.get("speedups"),
        "gradient_checkpointing": summary.get("gradient_checkpointing"),
        "dataset_build_seconds": round(build_seconds, 1), "setup_seconds": round(setup, 1),
        "losses": [round(x, 4) for x in log["loss"].dropna()],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
