"""Tied embeddings through the real Snakefile: Llama and Qwen2 layouts whose output head is the input embedding
(as in Qwen2.5-0.5B, Llama-3.2-1B and SmolLM2) train with LoRA, QLoRA and in full, merge, predict and score."""

import json

import pytest

from conftest import TINY_MODEL, scratch_workflow, snakemake

pytestmark = pytest.mark.workflow

RUNS = {"llama-lora": ("tiny-llama", "lora"), "llama-full": ("tiny-llama", "full"),
        "qwen2-lora": ("tiny-qwen2", "lora"), "qwen2-qlora": ("tiny-qwen2", "qlora")}


def tied_config():
    run = {"dataset": "identity", "max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1,
           "learning_rate": 0.01, "generation": {"max_new_tokens": 4}}
    return {
        "models": {"tiny-llama": {**TINY_MODEL, "architecture": "llama", "tie_word_embeddings": True},
                   "tiny-qwen2": {**TINY_MODEL, "tie_word_embeddings": True}},
        "datasets": {"identity": {"path": "data/identity.jsonl", "format": "messages", "max_seq_length": 64,
                                  "eval_size": 4, "test_size": 6}},
        "runs": {name: {**run, "model": model, "method": method} for name, (model, method) in RUNS.items()},
    }


@pytest.fixture(scope="module")
def tied_workflow(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tied")
    config = scratch_workflow(workdir, tied_config())
    snakemake(workdir, "--configfile", str(config), check=True)
    return workdir


def test_tied_models_train_merge_and_predict_in_every_method(tied_workflow):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    for run, (model, method) in RUNS.items():
        base = AutoModelForCausalLM.from_pretrained(tied_workflow / "results/models" / model)
        assert base.config.tie_word_embeddings and base.lm_head.weight is base.model.embed_tokens.weight
        merged_dir = tied_workflow / "results/runs" / run / "merged"
        saved = set()
        for shard in merged_dir.glob("*.safetensors"):
            with safe_open(shard, "pt") as weights:
                saved |= set(weights.keys())
        assert "model.embed_tokens.weight" in saved and "lm_head.weight" not in saved, run  # stored once
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)
        assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.model.embed_tokens.weight
        changed = [name for name, weight in merged.state_dict().items()
                   if not torch.equal(weight, base.state_dict()[name])]
        assert any("q_proj" in name for name in changed), (run, changed)  # the training is in the merged model
        if method != "full":  # LoRA leaves the shared embedding as it was
            assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight), run
        metrics = json.loads((tied_workflow / "results/runs" / run / "metrics.json").read_text())
        assert metrics["n"] == 6
        log = (tied_workflow / "logs/merge" / f"{run}.log")
        if method != "full":
            assert "merged weights equal base + peft's own delta" in log.read_text(), run


def test_an_adapter_may_not_train_a_tied_embedding(tmp_path):
    config = tied_config()
    config["runs"] = {"head": {**config["runs"]["qwen2-lora"], "modules_to_save": ["lm_head"]}}
    path = scratch_workflow(tmp_path, config)
    result = snakemake(tmp_path, "--configfile", str(path))
    assert result.returncode != 0
    log = (tmp_path / "logs/train/head.log").read_text()
    assert "error: modules_to_save/lora_target name lm_head, which this model ties" in log
    assert "Traceback" not in log
