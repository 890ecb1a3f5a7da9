"""The train stage on a vision-language model (scripts/train.py, the tiny Qwen2-VL layout, the bundled shapes):
LoRA, QLoRA and full fine-tunes learn with the tower frozen, and a killed run resumes to the same step and loss."""

import signal
import subprocess
import time

import pandas as pd
import pytest

from conftest import REPO, TINY_MODEL, run_train, train_command, workflow_env
from snaketune.dataset import build
from snaketune.layout import dataset_outputs
from snaketune.settings import DatasetSettings
from snaketune.train.checkpoints import complete_checkpoints

FAST = {"learning_rate": 0.01, "per_device_train_batch_size": 8, "logging_steps": 5, "save_steps": 10,
        "warmup_steps": 0, "lr_scheduler_type": "constant", "seed": 0}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny Qwen2-VL-layout model and the colour questions built for it."""
    from transformers import AutoTokenizer

    from snaketune.download import fetch
    from snaketune.vision import ImageInputs

    model = tmp_path_factory.mktemp("vision-model")
    fetch({**TINY_MODEL, "architecture": "qwen2_vl", "tokenizer_corpus": [str(REPO / "data" / "shapes" /
                                                                             "colours.jsonl")]}, model)
    data = tmp_path_factory.mktemp("vision-data")
    tokenizer = AutoTokenizer.from_pretrained(model)
    build(DatasetSettings(path=str(REPO / "data" / "shapes" / "colours.jsonl"), format="sharegpt", max_seq_length=64,
                          eval_size=8, test_size=8), tokenizer, dataset_outputs(data),
          image_inputs=ImageInputs.of(model, tokenizer))
    return model / "manifest.json", data


def test_a_build_decodes_each_image_once(built, tmp_path, monkeypatch):
    """The first pass decodes every image (a broken one is a bad row); the second only reads their sizes from the
    headers, and writes the same splits."""
    from collections import Counter

    from transformers import AutoTokenizer

    import snaketune.vision as vision

    def counting(real, counted):
        return lambda ref: counted.update([ref]) or real(ref)

    calls = {"open_image": Counter(), "image_size": Counter()}
    for name, counted in calls.items():
        monkeypatch.setattr(vision, name, counting(getattr(vision, name), counted))
    model, data = built[0].parent, built[1]
    tokenizer = AutoTokenizer.from_pretrained(model)
    build(DatasetSettings(path=str(REPO / "data" / "shapes" / "colours.jsonl"), format="sharegpt", max_seq_length=64,
                          eval_size=8, test_size=8), tokenizer, dataset_outputs(tmp_path),
          image_inputs=vision.ImageInputs.of(model, tokenizer))
    rows = sum(len(pd.read_parquet(data / f"{split}.parquet")) for split in ("train", "eval", "test"))
    assert sum(calls["open_image"].values()) == rows and set(calls["open_image"].values()) == {1}
    assert calls["image_size"] == calls["open_image"]
    for split in ("train", "eval", "test"):
        assert (tmp_path / f"{split}.parquet").read_bytes() == (data / f"{split}.parquet").read_bytes()


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_each_method_learns_with_the_tower_frozen(built, tmp_path, method):
    from safetensors import safe_open

    result = run_train(built, tmp_path, {**FAST, "method": method, "max_steps": 20})
    assert "vision-language parts: tower" in result.stderr and "(frozen)" in result.stderr
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert log["step"].iloc[-1] == 20 and log["loss"].iloc[-1] < 0.5 * log["loss"].iloc[0]
    weights = tmp_path / "adapter" / ("model.safetensors" if method == "full" else "adapter_model.safetensors")
    with safe_open(weights, "pt") as saved:
        names = list(saved.keys())
    assert any("merger" in name for name in names)  # the projector trains (whole, beside an adapter)
    if method != "full":
        assert not any("visual.blocks" in name or "patch_embed" in name for name in names)  # the tower is frozen
    assert (tmp_path / "adapter" / "preprocessor_config.json").is_file()


def test_a_killed_run_resumes_to_the_same_step_and_loss(built, tmp_path):
    settings = {**FAST, "max_steps": 40}
    whole = tmp_path / "whole"
    run_train(built, whole, settings)
    run = tmp_path / "killed"
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(train_command(built, run, settings), env=workflow_env(), start_new_session=True,
                                   stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not any(int(p.name.split("-")[1]) >= 10 for p in complete_checkpoints(run / "checkpoints")):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) != 0 and not (run / "adapter").exists()
    step = int(complete_checkpoints(run / "checkpoints")[-1].name.split("-")[1])
    result = run_train(built, run, settings)
    assert f"resume from {run / 'checkpoints' / f'checkpoint-{step}'}" in result.stderr
    resumed, uninterrupted = pd.read_csv(run / "train_log.csv"), pd.read_csv(whole / "train_log.csv")
    assert list(resumed["step"]) == list(uninterrupted["step"])
    assert resumed["loss"].iloc[-1] == pytest.approx(uninterrupted["loss"].iloc[-1], rel=0.01)
