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


def test_the_terminal_chat_and_the_service_answer_about_an_image(vision_run):
    """chat.py --image and /image, and the OpenAI client sending a data URL, streamed: the tuned model names the
    colours of squares it never trained on; a path where a data URL belongs is a 400."""
    import base64
    import subprocess
    import sys

    from openai import BadRequestError, OpenAI

    from conftest import start_server, workflow_env
    from snaketune.serve import ChatModel, create_app
    from snaketune.settings import ServiceSettings

    workdir, _ = vision_run
    merged = workdir / "results" / "runs" / "colours-lora" / "merged"
    test = pd.read_parquet(workdir / "results" / "datasets" / "colours" / "tiny-qwen2-vl" / "test.parquet")
    (first, first_colour), (second, second_colour) = [(row.images[0], row.reference) for row in
                                                      test.head(2).itertuples()]
    chat = subprocess.run([sys.executable, str(REPO / "scripts" / "chat.py"), "--model", str(merged), "--image",
                           first, "--max-new-tokens", "4"], input=f"What colour is the square?\n/image {second}\n"
                          "What colour is the square?\n", capture_output=True, text=True, env=workflow_env(),
                          cwd=workdir, timeout=300)
    answers = [line.removeprefix("assistant> ").strip() for line in chat.stdout.splitlines()
               if line.startswith("assistant> ")]
    assert chat.returncode == 0 and answers == [first_colour, second_colour], chat.stderr[-2000:]

    server, thread, url = start_server(create_app(ChatModel(merged, name="shapes"), ServiceSettings()))
    try:
        openai = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        image = "data:image/png;base64," + base64.b64encode((workdir / first).read_bytes()).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                 {"type": "text", "text": "What colour is the square?"}]}]
        pieces = [chunk.choices[0].delta.content or "" for chunk in openai.chat.completions.create(
            model="shapes", messages=messages, max_tokens=4, temperature=0, stream=True)]
        assert "".join(pieces).strip() == first_colour
        messages[0]["content"][0]["image_url"]["url"] = str(workdir / first)  # a server-side path: refused
        with pytest.raises(BadRequestError, match="must be a base64 data URL"):
            openai.chat.completions.create(model="shapes", messages=messages, max_tokens=4)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
