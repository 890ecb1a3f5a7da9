"""Vision-language fine-tuning through the real Snakefile (config/examples/tiny-vision.yaml): a tiny Qwen2-VL-layout
model learns the colour of a square on held-out images; images travel by path from the data file to predictions,
the merged folder loads as transformers' image-text-to-text model with its image processor, and the report shows
each test image."""

import json

import pandas as pd
import pytest
import yaml

from conftest import REPO, planned_jobs, scratch_workflow, snakemake

pytestmark = pytest.mark.workflow

EXAMPLE = REPO / "config" / "examples" / "tiny-vision.yaml"


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vision")
    config = scratch_workflow(workdir, yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")))
    snakemake(workdir, "--configfile", str(config), check=True)
    return workdir, config


def test_the_tuned_model_names_the_squares_colour_on_held_out_images(vision_run):
    workdir, _ = vision_run
    board = pd.read_csv(workdir / "results" / "leaderboard.csv").set_index("run")
    assert board.loc["colours-lora", "n"] == 40  # every held-out image answered
    assert board.loc["colours-lora", "exact_match"] >= 0.9
    assert board.loc["colours-base", "exact_match"] <= 0.25  # the untuned model: no better than guessing
    predictions = pd.read_csv(workdir / "results" / "runs" / "colours-lora" / "predictions.csv")
    images = [json.loads(value) for value in predictions["images"]]
    assert all(len(paths) == 1 and (workdir / paths[0]).is_file() for paths in images)
    assert set(predictions["reference"]) == {"red", "green", "blue", "yellow"}


def test_the_build_counts_its_images_and_keeps_paths_not_pixels(vision_run):
    workdir, _ = vision_run
    built = workdir / "results" / "datasets" / "colours" / "tiny-qwen2-vl"
    stats = json.loads((built / "stats.json").read_text())
    assert stats["images"]["images"] == stats["images"]["rows_with_images"] == 240
    assert stats["images"]["width"]["max"] == 56
    train = pd.read_parquet(built / "train.parquet")
    assert all(len(paths) == 1 and paths[0].startswith("data/shapes/images/") for paths in train["images"])
    assert (built / "train.parquet").stat().st_size < 100_000  # ids and paths: no image bytes


def test_the_merged_folder_loads_with_its_image_processor_and_nothing_is_stale(vision_run):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    workdir, config = vision_run
    merged = workdir / "results" / "runs" / "colours-lora" / "merged"
    model = AutoModelForImageTextToText.from_pretrained(merged)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert AutoImageProcessor.from_pretrained(merged).merge_size == 2
    assert "class='thumb'" in (workdir / "results" / "report.html").read_text(encoding="utf-8")
    again = snakemake(workdir, "--configfile", str(config), "--dry-run")
    assert again.returncode == 0 and planned_jobs(again) == []
