"""Preference pairs, from every layout people have to the ids trl trains on, and DPO/ORPO through the train CLI:
each layout reads, its pairs tokenize as ``apply_chat_template`` renders them, bad pairs are counted, and every
method trains, resumes after a kill and reports the model's own preference accuracy."""

import json
import signal
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import REPO, workflow_env
from snaketune.config import load
from snaketune.dataset import build
from snaketune.errors import UserError
from snaketune.formats import from_dataset_info, read_records
from snaketune.layout import dataset_outputs, train_arguments
from snaketune.settings import DatasetSettings, ReadSettings
from snaketune.train.checkpoints import complete_checkpoints

PROMPT, CHOSEN, REJECTED = "Greet Ann.", "Hello, Ann!", "Thank you, Ann!"
LAYOUTS = {  # format, extra settings, one row
    "alpaca ranking": ("alpaca", {"ranking": True},
                       {"instruction": "Greet", "input": "Ann.", "chosen": CHOSEN, "rejected": REJECTED}),
    "sharegpt ranking": ("sharegpt", {"ranking": True},
                         {"conversations": [{"from": "human", "value": PROMPT}],
                          "chosen": {"from": "gpt", "value": CHOSEN}, "rejected": {"from": "gpt", "value": REJECTED}}),
    "messages ranking": ("messages", {"ranking": True},
                         {"messages": [{"role": "user", "content": PROMPT}],
                          "chosen": {"role": "assistant", "content": CHOSEN},
                          "rejected": {"role": "assistant", "content": REJECTED}}),
    "trl strings": ("preference", {}, {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}),
    "trl conversational": ("preference", {},
                           {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": PROMPT}],
                            "chosen": [{"role": "assistant", "content": CHOSEN}],
                            "rejected": [{"role": "assistant", "content": REJECTED}]}),
}


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_preference_layout_reads_as_a_conversation_ending_on_the_chosen_answer(tmp_path, layout):
    fmt, extra, row = LAYOUTS[layout]
    path = write_rows(tmp_path / "pairs.jsonl", [row])
    (record,) = read_records(ReadSettings(path=str(path), format=fmt, **extra)).records
    prompt = "Greet\nAnn." if layout == "alpaca ranking" else PROMPT
    assert record.messages == [{"role": "user", "content": prompt}, {"role": "assistant", "content": CHOSEN}]
    assert record.rejected == REJECTED
    assert record.system == ("Be kind." if layout == "trl conversational" else None)


def test_llama_factory_ranking_entries_read_through_dataset_info(tmp_path):
    write_rows(tmp_path / "dpo.jsonl", [{"q": PROMPT, "good": CHOSEN, "bad": REJECTED}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"dpo_en": {
        "file_name": "dpo.jsonl", "ranking": True, "columns": {"prompt": "q", "chosen": "good", "rejected": "bad"}}}))
    found = from_dataset_info(tmp_path / "dataset_info.json", "dpo_en")
    assert found["ranking"] is True and found["columns"] == {"instruction": "q", "chosen": "good", "rejected": "bad"}
    (record,) = read_records(ReadSettings(**found)).records
    assert record.messages[-1]["content"] == CHOSEN and record.rejected == REJECTED


@pytest.mark.parametrize("row, message", [
    ({"prompt": PROMPT, "chosen": CHOSEN, "rejected": CHOSEN}, 'fields "chosen" and "rejected" are the same answer'),
    ({"prompt": PROMPT, "chosen": CHOSEN}, 'field "rejected" missing'),
    ({"prompt": PROMPT, "chosen": CHOSEN, "rejected": [{"role": "user", "content": "x"}]},
     'field "rejected.role": `user` is not the assistant\'s'),
    ({"prompt": PROMPT, "chosen": "  ", "rejected": REJECTED}, 'field "chosen" is empty'),
    ({"chosen": CHOSEN, "rejected": REJECTED}, 'field "prompt" missing or not a string or a list of messages'),
], ids=["same answer", "no rejected", "rejected by the user", "empty chosen", "no prompt"])
def test_a_bad_pair_is_counted_with_its_file_line_and_field(tmp_path, row, message):
    good = {"prompt": "Thank Bo.", "chosen": "Thank you, Bo!", "rejected": "Hello, Bo!"}
    path = write_rows(tmp_path / "pairs.jsonl", [good, row])
    result = read_records(ReadSettings(path=str(path), format="preference", max_bad_rows=1))
    assert len(result.records) == 1 and result.bad_rows == [f"{path}:2: {message}"]


def test_ranking_on_a_layout_without_pairs_is_refused():
    with pytest.raises(UserError, match="ranking: true needs format alpaca, sharegpt, messages, preference"):
        ReadSettings(path="x.jsonl", format="firefly", ranking=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pairs_are_tokenized_as_the_chat_template_renders_them(tmp_path, tiny_tokenizer, layout):
    fmt, extra, row = LAYOUTS[layout]
    rows = [row] + [{**row, "id": f"other-{i}"} for i in range(3)]  # ids keep the copies apart from duplicates
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    out = dataset_outputs(tmp_path / "built")
    build(DatasetSettings(path=str(path), format=fmt, eval_size=1, test_size=1, deduplicate=False, **extra),
          tiny_tokenizer, out)
    split = pd.read_parquet(out["train"]).iloc[0]
    conversation = json.loads(split["messages"])
    prompt = tiny_tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
    for side, answer in (("chosen_ids", CHOSEN), ("rejected_ids", REJECTED)):
        whole = tiny_tokenizer.apply_chat_template(conversation[:-1] + [{"role": "assistant", "content": answer}],
                                                   tokenize=True, return_dict=False)
        assert list(split["prompt_ids"]) == list(prompt) and list(split["prompt_ids"]) + list(split[side]) == whole
        assert tiny_tokenizer.decode(split[side]).startswith(answer)  # the completion is the answer and its turn end
    # the SFT columns of the same row: the chosen conversation, loss on the answer only
    assert list(split["input_ids"]) == list(split["prompt_ids"]) + list(split["chosen_ids"])
    assert list(split["labels"]) == [-100] * len(prompt) + list(split["chosen_ids"])
    assert split["rejected"] == REJECTED and split["reference"] == CHOSEN


def test_long_pairs_keep_the_prompt_and_cut_the_answers_and_a_prompt_too_long_is_dropped_and_counted(
        tmp_path, tiny_tokenizer):
    long_prompt = "Greet " + "very " * 40 + "Ann."
    rows = [{"id": f"r{i}", "prompt": PROMPT, "chosen": CHOSEN + " Welcome" * 20, "rejected": REJECTED}
            for i in range(4)] + [{"id": "long", "prompt": long_prompt, "chosen": CHOSEN, "rejected": REJECTED}]
    out = dataset_outputs(tmp_path / "built")
    stats = build(DatasetSettings(path=str(write_rows(tmp_path / "p.jsonl", rows)), format="preference",
                                  max_seq_length=24, eval_size=0, test_size=1, seed=3), tiny_tokenizer, out)
    kept = pd.concat([pd.read_parquet(out[name]) for name in ("train", "test")])
    assert "long" not in set(kept["id"])
    assert sum(split["dropped_no_target"] for split in stats["splits"].values()) == 1
    for _, row in kept.iterrows():
        assert len(row["prompt_ids"]) + len(row["chosen_ids"]) == 24 and row["truncated"]


# -- config ------------------------------------------------------------------------------------------------------
def config_with(runs, tmp_path):
    raw = yaml.safe_load((REPO / "config" / "examples" / "tiny-dpo-orpo.yaml").read_text(encoding="utf-8"))
    raw["runs"].update(runs)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return raw, path


def config_errors(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    raw, path = config_with(runs, tmp_path)
    with pytest.raises(UserError) as caught:
        load(raw, [path])
    return str(caught.value).splitlines()


def test_a_run_started_from_another_takes_its_model(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    raw, path = config_with({}, tmp_path)
    cfg = load(raw, [path])
    assert cfg.runs["greet-dpo"].from_run == "greet-sft" and cfg.runs["greet-dpo"].model == "tiny-qwen2"
    assert cfg.runs["greet-dpo"].train.stage == "dpo" and cfg.runs["greet-orpo"].from_run is None


@pytest.mark.parametrize("runs, message", [
    ({"x": {"from_run": "nope", "dataset": "greeting-pairs", "stage": "dpo"}},
     "runs.x.from_run: names undefined run `nope`"),
    ({"a": {"from_run": "b", "dataset": "greetings"}, "b": {"from_run": "a", "dataset": "greetings"}},
     "runs.a.from_run: runs start from each other in a circle: a -> b -> a"),
    ({"x": {"from_run": "greet-sft", "model": "other", "dataset": "greeting-pairs", "stage": "dpo"}},
     "runs.x.model: `other` differs from `tiny-qwen2`, the model of `greet-sft` it starts from"),
    ({"x": {"model": "tiny-qwen2", "dataset": "greetings", "stage": "dpo"}},
     "runs.x.stage: stage dpo trains on preference pairs; dataset `greetings` has none"),
    ({"x": {"dataset": "greetings"}}, "runs.x: `model` is required (or `from_run`: the run to start from)"),
    ({"x": {"from_run": "greet-sft", "dataset": "greeting-pairs", "stage": "dpo", "packing": "tokens"}},
     "packing `tokens` does not apply to stage dpo"),
    ({"x": {"model": "tiny-qwen2", "dataset": "greeting-pairs", "stage": "orpo", "pref_ftx": 0.5}},
     "`pref_ftx` is for stage dpo (orpo has its supervised loss already), not orpo"),
], ids=["undefined", "circle", "other model", "no pairs", "no model", "packing", "pref_ftx"])
def test_a_wrong_preference_run_is_one_line_naming_file_line_and_field(tmp_path, monkeypatch, runs, message):
    lines = config_errors(runs, tmp_path, monkeypatch)
    assert any(message in line and line.startswith(str(tmp_path / "config.yaml") + ":") for line in lines), lines


# -- training through the CLI ------------------------------------------------------------------------------------
FAST = {"learning_rate": 0.01, "per_device_train_batch_size": 8, "logging_steps": 2, "save_steps": 5,
        "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "warmup_steps": 0, "pref_beta": 0.2}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_model, tiny_tokenizer):
    out = tmp_path_factory.mktemp("pairs")
    build(DatasetSettings(path=str(REPO / "data" / "greeting_pairs.jsonl"), format="preference",
                          max_seq_length=64, eval_size=24, test_size=8), tiny_tokenizer, dataset_outputs(out))
    return tiny_model / "manifest.json", out


def train_command(pairs, run_dir, settings):
    manifest, data = pairs
    return [sys.executable, str(REPO / "scripts" / "train.py"), "--model-manifest", str(manifest),
            *train_arguments(data, run_dir), "--settings", json.dumps(settings)]


def run_train(pairs, run_dir, settings, ok=True):
    result = subprocess.run(train_command(pairs, run_dir, settings), capture_output=True, text=True,
                            env=workflow_env())
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("stage, method", [("dpo", "lora"), ("dpo", "qlora"), ("dpo", "full"), ("orpo", "lora"),
                                           ("orpo", "full")])
def test_each_method_learns_the_preference_and_logs_its_rewards(pairs, tmp_path, stage, method):
    run_train(pairs, tmp_path, {**FAST, "stage": stage, "method": method, "max_steps": 24})
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert {"rewards_accuracies", "rewards_margins", "rewards_chosen", "rewards_rejected"} <= set(log.columns)
    assert log["rewards_margins"].iloc[-1] > log["rewards_margins"].iloc[0]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    preference = summary["preference"]
    assert preference["pairs"] == 24 and preference["margin"] > preference["start_margin"]
    assert summary["reward_accuracy"] is not None and summary["speedups"]["packing"] is False
    assert (tmp_path / "adapter" / ("model.safetensors" if method == "full" else "adapter_model.safetensors")).exists()


def test_pref_ftx_adds_a_supervised_loss_that_keeps_the_chosen_answers_likely(pairs, tmp_path):
    """DPO alone may widen the margin by making both answers less likely (the chosen one too); the supervised term
    on the chosen answers (trl's sft loss, weight pref_ftx) pulls the chosen answers up against the reference."""
    settings = {**FAST, "stage": "dpo", "max_steps": 24}
    run_train(pairs, tmp_path / "dpo", settings)
    run_train(pairs, tmp_path / "ftx", {**settings, "pref_ftx": 1.0})
    alone, with_ftx = (pd.read_csv(tmp_path / run / "train_log.csv") for run in ("dpo", "ftx"))
    assert with_ftx["rewards_chosen"].iloc[-1] > max(alone["rewards_chosen"].iloc[-1], 0)
    assert with_ftx["rewards_margins"].iloc[-1] > with_ftx["rewards_margins"].iloc[0]
    summary = json.loads((tmp_path / "ftx" / "train_summary.json").read_text())
    assert summary["settings"]["pref_ftx"] == 1.0 and summary["preference"]["margin"] > summary["preference"][
        "start_margin"]


@pytest.mark.parametrize("stage, gpus", [("dpo", 2), ("orpo", 2), ("dpo", 1)])
def test_a_full_fine_tune_shards_over_two_zero3_processes(pairs, tmp_path, stage, gpus):
    """The expensive real run: DeepSpeed ZeRO-3 in two CPU processes under torchrun; DPO's reference is a second
    sharded model, and its fused head needs prefetching off (train.deepspeed_config). In one process the policy's
    decoder layers are ZeRO-3 leaf modules with whole parameters (train.zero3_whole), the reference beside it."""
    settings = {**FAST, "stage": stage, "method": "full", "deepspeed": "zero3", "gpus": gpus, "learning_rate": 1e-3,
                "max_steps": 8, "save_steps": 4}
    run_train(pairs, tmp_path, settings)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["processes"] == gpus and summary["global_step"] == 8
    assert summary["preference"]["pairs"] == 24 and summary["reward_accuracy"] is not None
    assert (tmp_path / "adapter" / "model.safetensors").exists()  # the shards gathered into one model


def test_model_preference_accuracy_matches_scoring_each_answer_alone(pairs, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from snaketune.train.preference import pair_rows, preference_accuracy

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rows = pair_rows(pairs[1] / "eval.parquet", pairs[1] / "cache")
    result = preference_accuracy(model, rows, pad_id=0, batch_size=5)  # padded batches of unequal lengths
    wins, margins = [], []
    with torch.no_grad():
        for row in rows:
            scores = []
            for side in ("chosen_ids", "rejected_ids"):
                ids = torch.tensor([row["prompt_ids"] + row[side]])
                logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
                scores.append(sum(logps[len(row["prompt_ids"]) - 1 + i, t].item() for i, t in enumerate(row[side])))
            wins.append(scores[0] > scores[1])
            margins.append(scores[0] - scores[1])
    assert result["accuracy"] == pytest.approx(sum(wins) / len(wins), abs=1e-4)
    assert result["margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-3)


def test_a_killed_dpo_run_resumes_where_it_stopped_with_the_start_it_measured(pairs, tmp_path):
    settings = {**FAST, "stage": "dpo", "max_steps": 30}
    reference = tmp_path / "reference"
    run_train(pairs, reference, settings)
    run_dir = tmp_path / "killed"
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(train_command(pairs, run_dir, settings), env=workflow_env(), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        while not complete_checkpoints(run_dir / "checkpoints"):
            assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) != 0
    assert "error: stopped by a signal at step" in (tmp_path / "first.log").read_text()
    stopped = int(complete_checkpoints(run_dir / "checkpoints")[-1].name.split("-")[1])
    assert 5 <= stopped < 30
    result = run_train(pairs, run_dir, settings)
    assert f"resume from {run_dir / 'checkpoints' / f'checkpoint-{stopped}'}" in result.stderr
    resumed, uninterrupted = (pd.read_csv(d / "train_log.csv") for d in (run_dir, reference))
    assert list(resumed["step"]) == list(uninterrupted["step"])
    assert resumed["loss"].iloc[-1] == pytest.approx(uninterrupted["loss"].iloc[-1], rel=0.02)
    first, again = (json.loads((d / "train_summary.json").read_text())["preference"] for d in (reference, run_dir))
    assert again["start_accuracy"] == first["start_accuracy"] and again["start_margin"] == first["start_margin"]


def test_a_preference_stage_on_a_dataset_without_pairs_is_one_line(tmp_path, tiny_model, tiny_tokenizer):
    out = tmp_path / "sft"
    build(DatasetSettings(path=str(REPO / "data" / "greetings.jsonl"), format="messages", eval_size=8, test_size=8),
          tiny_tokenizer, dataset_outputs(out))
    result = run_train((tiny_model / "manifest.json", out), tmp_path / "run", {**FAST, "stage": "orpo"}, ok=False)
    assert "error: stage orpo trains on preference pairs" in result.stderr and "Traceback" not in result.stderr
