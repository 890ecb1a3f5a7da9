"""layout.py: which run's job builds each file (shared upstream jobs), what each run reads and is made of."""

import pytest

from conftest import REPO
from snaketune.config import load_files
from snaketune.layout import PATTERNS, Layout

RUNS = {
    # differs from identity-lora only after training: shares its train and merge jobs, predicts itself
    "identity-long": {"model": "tiny-qwen2", "dataset": "identity", "generation": {"max_new_tokens": 64},
                      "evaluation": {"exams": ["mmcu-sample"], "shots": 2}},
    "identity-adapter": {"model": "tiny-qwen2", "dataset": "identity", "learning_rate": 0.002,
                         "generation": {"predict_from": "adapter"}},
    "identity-more": {"model": "tiny-qwen2", "dataset": "identity", "from_run": "identity-lora"},
    "more-base": {"model": "tiny-qwen2", "dataset": "identity", "from_run": "identity-lora", "max_steps": 0},
}


@pytest.fixture
def layout(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths are relative to the working directory, as in the workflow
    return Layout(load_files([], {"runs": RUNS, "datasets": {
        "both": {"mix": {"identity": 1, "text-matching": 1}}}}))


def test_runs_that_differ_only_after_training_share_its_jobs_and_predict_on_their_own(layout):
    assert layout.owner("train", "identity-long") == layout.owner("merge", "identity-long") == "identity-lora"
    assert layout.owner("predict", "identity-long") == "identity-long"
    assert layout.run_file("merged", "identity-long") == PATTERNS["merged"].format(run="identity-lora")
    assert layout.run_file("predictions", "identity-long") == PATTERNS["predictions"].format(run="identity-long")
    assert layout.owner("train", "identity-adapter") == "identity-adapter"  # another learning rate


def test_what_predict_chat_and_serve_load_for_each_kind_of_run(layout):
    manifest = PATTERNS["model_manifest"].format(model="tiny-qwen2")
    assert layout.run_model("identity-lora") == {"model": PATTERNS["merged"].format(run="identity-lora")}
    assert layout.run_model("identity-base") == {"manifest": manifest}  # a baseline reads the base
    assert layout.run_model("identity-adapter") == {
        "manifest": manifest, "adapter": PATTERNS["adapter"].format(run="identity-adapter")}
    assert layout.run_model("more-base") == {"model": PATTERNS["merged"].format(run="identity-lora")}
    assert layout.start_model("identity-more") == {"start": PATTERNS["merged"].format(run="identity-lora")}


def test_a_run_is_made_of_its_upstream_files_and_merges_only_where_something_reads_the_merge(layout):
    built = layout.built_files("identity-lora")
    for name in ("model_manifest", "train_split", "test_split", "adapter", "merged", "predictions", "metrics"):
        assert any(path == PATTERNS[name].format(model="tiny-qwen2", dataset="identity", run="identity-lora")
                   for path in built), name
    adapter_run = layout.built_files("identity-adapter")
    assert PATTERNS["adapter"].format(run="identity-adapter") in adapter_run
    assert PATTERNS["merged"].format(run="identity-adapter") not in adapter_run
    baseline = layout.built_files("identity-base")
    assert not [path for path in baseline if "/runs/identity-base/" in path and "adapter" in path]
    assert set(layout.final_outputs()) >= {PATTERNS["leaderboard"], PATTERNS["report_html"], *built}


def test_a_mix_is_built_from_its_datasets_and_answers_the_first_ones_test_rows(layout):
    inputs = layout.dataset_inputs("both", "tiny-qwen2")
    assert inputs["mix_test"] == PATTERNS["test_split"].format(dataset="identity", model="tiny-qwen2")
    assert len(inputs["mix_train"]) == len(inputs["mix_eval"]) == 2
    mixed = Layout(load_files([], {"runs": {"mixed": {"model": "tiny-qwen2", "dataset": "both"}},
                                   "datasets": {"both": {"mix": {"text-matching": 1, "identity": 1}}}}))
    assert mixed.scored_on("mixed") == "text-matching" and mixed.scored_on("identity-lora") == "identity"
