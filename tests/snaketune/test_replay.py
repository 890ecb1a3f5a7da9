"""Replay: the model's own answers to a prompt file become a messages dataset; unfinished answers are counted."""

import json

import pytest

from snaketune.errors import UserError
from snaketune.replay import read_prompts, replay
from snaketune.settings import ReplaySettings
from snaketune.templates import render


def test_prompt_files_are_text_lines_or_jsonl_and_bad_lines_are_named(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("What is 2 + 2?\n\n  Name a fruit.  \n", encoding="utf-8")
    assert read_prompts(text) == [{"id": "replay-1", "line": 1, "prompt": "What is 2 + 2?"},
                                  {"id": "replay-3", "line": 3, "prompt": "Name a fruit."}]
    lines = tmp_path / "p.jsonl"
    lines.write_text(json.dumps({"id": "a", "prompt": "Line one\nline two"}) + "\n" + json.dumps({"q": 1}) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:2: field \"prompt\" missing"):
        read_prompts(lines)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_the_replay_set_holds_the_models_own_greedy_answers(tmp_path, tiny_model, tiny_tokenizer):
    import shutil

    from snaketune.predict import load_for_generation

    # The random tiny model never says its eos; a copy whose generation config also ends on the fourth token it
    # greedily writes for the first prompt gives answers that end (others may not: they are left out, counted).
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    tokenizer, model = load_for_generation(model_dir, None)
    first = render(tiny_tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}],
                   add_generation_prompt=True)
    inputs = tokenizer([first], return_tensors="pt", add_special_tokens=False)
    stop = int(model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, -1])
    model.generation_config.eos_token_id = [model.generation_config.eos_token_id[0], stop]
    model.generation_config.save_pretrained(model_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("你好\nWho are you?\n1 2 3\n", encoding="utf-8")
    out = tmp_path / "replay.jsonl"
    counts = replay(ReplaySettings(prompts=str(prompts), system="Be brief.", max_new_tokens=30), model_dir, out)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert counts == {"prompts": 3, "answers": len(rows), "left_out": 3 - len(rows)} and rows[0]["id"] == "replay-1"
    assert rows  # the first prompt's answer ends
    tokenizer, model = load_for_generation(model_dir, None)
    for row in rows:
        system, user, answer = row["messages"]
        assert system == {"role": "system", "content": "Be brief."} and answer["role"] == "assistant"
        inputs = tokenizer([render(tiny_tokenizer, [system, user], add_generation_prompt=True)], return_tensors="pt",
                           add_special_tokens=False)
        new = model.generate(**inputs, max_new_tokens=30, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
        end = next(i for i, token in enumerate(new) if token in model.generation_config.eos_token_id)
        # transformers' generate, up to the end of turn: the answer the model gives
        assert answer["content"] == tokenizer.decode(new[:end], skip_special_tokens=True).strip()


def test_answers_that_do_not_end_are_left_out_and_counted(tmp_path, tiny_model, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Who are you?\nTell me a long story.\n", encoding="utf-8")
    with pytest.raises(UserError, match="no answer ended within replay_max_new_tokens=1"):
        replay(ReplaySettings(prompts=str(prompts), max_new_tokens=1), tiny_model, tmp_path / "r.jsonl")
    assert "p.txt:1: left out of the replay set" in capsys.readouterr().err
