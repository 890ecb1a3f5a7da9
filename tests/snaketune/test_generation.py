"""Predict: batched greedy generation equals one-by-one, and the CSV survives any generated text."""

import pandas as pd

from snaketune.generation import GenerationSettings, predict
from snaketune.templates import render


def test_batched_generation_matches_batch_size_one(tmp_path, tiny_model, tiny_tokenizer):
    questions = ["你好", "Who are you? Tell me everything about yourself.", "1 2 3", "判断下面两个句子的意思是否相同"]
    prompts = [render(tiny_tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True)
               for q in questions]
    pd.DataFrame({"id": [f"t{i}" for i in range(4)], "prompt": prompts, "reference": ["a\rb", "", "x,y", '"q"']}
                 ).to_parquet(tmp_path / "test.parquet")
    outputs = {}
    for batch_size in (1, 4):
        out = tmp_path / f"p{batch_size}.csv"
        assert predict(GenerationSettings(max_new_tokens=12, batch_size=batch_size), tiny_model,
                       tmp_path / "test.parquet", out) == 4
        outputs[batch_size] = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert list(outputs[4].columns) == ["id", "prompt", "reference", "prediction", "generation_seconds"]
    assert list(outputs[1]["prediction"]) == list(outputs[4]["prediction"])
    assert list(outputs[4]["reference"]) == ["a\rb", "", "x,y", '"q"']  # quoting keeps every row whole
    assert list(outputs[4]["id"]) == ["t0", "t1", "t2", "t3"]
