"""Predict: batched greedy generation equals one-by-one, and the CSV survives any generated text."""

import pandas as pd
import pytest

from snaketune.predict import predict
from snaketune.settings import GenerationSettings
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
                       tmp_path / "test.parquet", out, partial(out)) == 4
        outputs[batch_size] = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert list(outputs[4].columns) == ["id", "prompt", "reference", "prediction", "generation_seconds"]
    assert list(outputs[1]["prediction"]) == list(outputs[4]["prediction"])
    assert list(outputs[4]["reference"]) == ["a\rb", "", "x,y", '"q"']  # quoting keeps every row whole
    assert list(outputs[4]["id"]) == ["t0", "t1", "t2", "t3"]


def partial(out):
    """The partial predictions file beside ``out``, where the workflow keeps it."""
    return out.with_name(out.stem + ".partial.csv")


def make_test_split(tmp_path, tokenizer, n=10):
    prompts = [render(tokenizer, [{"role": "user", "content": f"问题 {i}: {'很长' * i}"}], add_generation_prompt=True)
               for i in range(n)]
    pd.DataFrame({"id": [f"t{i}" for i in range(n)], "prompt": prompts, "reference": ["r"] * n}).to_parquet(
        tmp_path / "test.parquet")
    return tmp_path / "test.parquet"


def test_a_killed_prediction_resumes_with_only_the_missing_rows(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    import pytest

    from snaketune import predict as predict_stage

    test = make_test_split(tmp_path, tiny_tokenizer)
    settings = GenerationSettings(max_new_tokens=6, batch_size=3)
    predict(settings, tiny_model, test, tmp_path / "clean.csv", partial(tmp_path / "clean.csv"))

    real = predict_stage.generate_batch
    calls = []

    def dies_on_third_batch(model, tokenizer, prompts, *args):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the job were killed mid-way
        return real(model, tokenizer, prompts, *args)

    monkeypatch.setattr(predict_stage, "generate_batch", dies_on_third_batch)
    out = tmp_path / "predictions.csv"
    with pytest.raises(KeyboardInterrupt):
        predict(settings, tiny_model, test, out, partial(out))
    assert not out.exists() and (tmp_path / "predictions.partial.csv").exists()
    with (tmp_path / "predictions.partial.csv").open("a") as handle:
        handle.write('"t9","cut sho')  # the kill landed mid-row: that row is generated again

    calls.clear()
    assert predict(settings, tiny_model, test, out, partial(out)) == 10
    assert sum(calls) == 4  # 6 rows were saved before the kill; only the other 4 are generated
    resumed, clean = (pd.read_csv(p, keep_default_na=False, dtype=str) for p in (out, tmp_path / "clean.csv"))
    assert list(resumed["prediction"]) == list(clean["prediction"]) and list(resumed["id"]) == list(clean["id"])
    assert not (tmp_path / "predictions.partial.csv").exists()


def test_saved_rows_of_other_settings_are_not_reused(tmp_path, tiny_model, tiny_tokenizer):
    test = make_test_split(tmp_path, tiny_tokenizer, n=4)
    out = tmp_path / "predictions.csv"
    (tmp_path / "predictions.partial.csv.key").write_text("settings of another run")
    (tmp_path / "predictions.partial.csv").write_text('"t0","stale answer","0.1"\n')
    predict(GenerationSettings(max_new_tokens=4, batch_size=2), tiny_model, test, out, partial(out))
    assert "stale answer" not in out.read_text()


def test_base_plus_adapter_predicts_what_the_merged_model_predicts(tmp_path, tiny_model, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from snaketune.merge import merge
    from snaketune.settings import MergeSettings

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    adapter = tmp_path / "adapter"
    get_peft_model(base, lora).save_pretrained(adapter)  # a random, non-zero update
    tiny_tokenizer.save_pretrained(adapter)
    merge(MergeSettings(dtype="float32"), tiny_model, False, adapter, tmp_path / "merged")
    test = make_test_split(tmp_path, tiny_tokenizer, n=6)
    settings = GenerationSettings(max_new_tokens=8, batch_size=3, predict_from="adapter")
    for name, model, adapter_dir in (("from_adapter", tiny_model, adapter), ("from_merged", tmp_path / "merged", None),
                                     ("from_base", tiny_model, None)):
        out = tmp_path / f"{name}.csv"
        predict(settings, model, test, out, partial(out), adapter_dir=adapter_dir)
    adapter_out, merged_out, base_out = (pd.read_csv(tmp_path / f"from_{name}.csv", keep_default_na=False)["prediction"]
                                         for name in ("adapter", "merged", "base"))
    assert list(adapter_out) == list(merged_out) and list(adapter_out) != list(base_out)


def test_predict_cli_from_base_manifest_and_adapter(tmp_path, tiny_model, tiny_tokenizer):
    import json
    import subprocess
    import sys

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import REPO, workflow_env

    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora).save_pretrained(adapter)
    tiny_tokenizer.save_pretrained(adapter)
    test = make_test_split(tmp_path, tiny_tokenizer, n=3)
    command = [sys.executable, str(REPO / "scripts" / "predict.py"), "--test", str(test), "--out",
               str(tmp_path / "p.csv"), "--partial", str(tmp_path / "p.partial.csv"), "--settings",
               json.dumps({"max_new_tokens": 4, "predict_from": "adapter"})]
    result = subprocess.run(command + ["--model-manifest", str(tiny_model / "manifest.json"), "--adapter",
                                       str(adapter)], capture_output=True, text=True, env=workflow_env())
    assert result.returncode == 0 and "predictions: 3" in result.stdout, result.stderr[-2000:]
    base = subprocess.run(command + ["--model-manifest", str(tiny_model / "manifest.json")], capture_output=True,
                          text=True, env=workflow_env())  # the manifest alone: the base model (a baseline run)
    assert base.returncode == 0 and "predictions: 3" in base.stdout, base.stderr[-2000:]
    half = subprocess.run(command + ["--model", str(tiny_model), "--adapter", str(adapter)], capture_output=True,
                          text=True, env=workflow_env())
    assert half.returncode == 1 and "error: --adapter needs --model-manifest" in half.stderr


def test_predictions_open_in_excel_and_carry_the_original_columns(tmp_path, tiny_model, tiny_tokenizer):
    """UTF-8 with a BOM (Excel on Chinese Windows reads GBK otherwise), and each test row's own fields beside the
    rendered prompt, as the dataset file had them."""
    import json

    from snaketune.dataset import build
    from snaketune.layout import dataset_outputs
    from snaketune.settings import DatasetSettings

    data = tmp_path / "pairs.csv"
    data.write_text("sentence1,sentence2,label,prompt\n" + "".join(
        f"今天{i}号,明天{i}号,{'相同' if i % 2 else '不同'},x{i}\n" for i in range(10)), encoding="utf-8")
    outputs = dataset_outputs(tmp_path / "built")
    build(DatasetSettings(path=str(data), format="columns", prompt="{sentence1}\n{sentence2}", response="{label}",
                          eval_size=0, test_size=3), tiny_tokenizer, outputs)
    out = tmp_path / "predictions.csv"
    predict(GenerationSettings(max_new_tokens=2, batch_size=3), tiny_model, outputs["test"], out, partial(out))
    assert out.read_bytes()[:3] == b"\xef\xbb\xbf"
    frame = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert list(frame.columns) == ["id", "prompt", "reference", "prediction", "generation_seconds", "sentence1",
                                   "sentence2", "label", "source_prompt"]
    test = pd.read_parquet(outputs["test"])
    assert list(frame["sentence1"]) == [json.loads(s)["sentence1"] for s in test["source"]]
    assert all(row["sentence1"] in row["prompt"] and row["label"] == row["reference"] for _, row in frame.iterrows())


@pytest.mark.parametrize("rows_per_prefill, grouped, static", [
    (None, False, False), (1, False, False), (3, False, False), (None, True, False), (3, True, False),
    (None, False, True), (3, True, True)],
    ids=["one prefill", "a row a prefill", "chunks of 3", "grouped decoding attention", "chunks and grouped attention",
         "static cache", "chunks, grouped attention and static cache"])
def test_the_greedy_loop_gives_generates_tokens_and_stops_where_it_stops(tiny_model, tiny_tokenizer,
                                                                          rows_per_prefill, grouped, static,
                                                                          monkeypatch):
    """The lean loop's tokens are generate's, however the prompts are read and whichever cache the steps write
    (the preallocated one, ``static``, is what a GPU captures as a CUDA graph; here it runs eagerly)."""
    import torch
    from transformers import AutoModelForCausalLM

    from snaketune.predict import StaticSteps, greedy_tokens, use_grouped_decode

    forward, static_steps = StaticSteps.forward, []
    monkeypatch.setattr(StaticSteps, "forward", lambda self: static_steps.append(self.column) or forward(self))
    reference_model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()  # generate with sdpa throughout
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval() if grouped else reference_model
    if grouped:  # the tiny model has 2 query heads per key/value head: the grouping is exercised
        assert use_grouped_decode(model) and model.config._attn_implementation == "grouped_decode"
    tokenizer = tiny_tokenizer
    tokenizer.padding_side = "left"
    questions = ["你好", "Who are you? Tell me everything about yourself.", "1 2 3", "判断下面两个句子的意思是否相同"]
    prompts = [render(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (inputs["attention_mask"] == 0).any()  # rows of different lengths: left padding is exercised

    def both(new_tokens):
        with torch.no_grad():
            reference = reference_model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                                 pad_token_id=tokenizer.pad_token_id)[:, inputs["input_ids"].shape[1]:]
            width = inputs["input_ids"].shape[1]  # prompts read in chunks, each cut to its own longest prompt
            budget = {"prefill_tokens": rows_per_prefill * width} if rows_per_prefill else {}
            ours = greedy_tokens(model, inputs["input_ids"], inputs["attention_mask"], new_tokens,
                                 tokenizer.pad_token_id, **budget, static=static)
        return reference, ours

    reference, ours = both(20)
    assert torch.equal(ours, reference)
    assert len(static_steps) == (19 if static else 0)  # a step per new token after the prefill's, or none
    # make a token the first row emits at its fourth step an end of row: rows end there and are padded after
    model.generation_config.eos_token_id = reference_model.generation_config.eos_token_id = int(reference[0, 3])
    reference, ours = both(20)
    assert (reference == tokenizer.pad_token_id).any()
    assert torch.equal(ours[:, : reference.shape[1]], reference)
    assert (ours[:, reference.shape[1]:] == tokenizer.pad_token_id).all()  # steps past the end are padding


def test_a_model_with_sliding_window_layers_reads_its_prompts_in_one_prefill(tiny_model, tiny_tokenizer, monkeypatch):
    """Chunks' caches cannot be joined where a layer keeps only a window of keys: such a model reads the whole
    batch at once, decided before any chunk is computed, and still gives generate's tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from snaketune import predict

    config = AutoConfig.from_pretrained(tiny_model)
    config.update({"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0,
                   "layer_types": ["sliding_attention"] + ["full_attention"] * (config.num_hidden_layers - 1)})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    tiny_tokenizer.padding_side = "left"
    prompts = [render(tiny_tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True)
               for q in ["你好", "Who are you? Tell me everything about yourself.", "1 2 3"]]
    inputs = tiny_tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    forwards = []
    model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(kwargs["input_ids"].shape),
                                    with_kwargs=True)
    with torch.no_grad():
        # static asked for: a window layer cannot take the preallocated cache, so the steps grow the cache
        monkeypatch.setattr(predict.StaticSteps, "forward", lambda self: pytest.fail("a static step ran"))
        ours = predict.greedy_tokens(model, inputs["input_ids"], inputs["attention_mask"], 12,
                                     tiny_tokenizer.pad_token_id, prefill_tokens=inputs["input_ids"].shape[1],
                                     static=True)
        prefill_reads = forwards[0]
        reference = model.generate(**inputs, max_new_tokens=12, do_sample=False,
                                   pad_token_id=tiny_tokenizer.pad_token_id)[:, inputs["input_ids"].shape[1]:]
    assert prefill_reads == inputs["input_ids"].shape  # one pass over all three rows, not a row a chunk
    assert torch.equal(ours[:, : reference.shape[1]], reference)


def test_generation_computes_in_float32_on_a_cpu_and_bf16_on_a_gpu(tmp_path, tiny_model, tiny_tokenizer,
                                                                    monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from snaketune.predict import compute_dtype, load_for_generation

    assert compute_dtype("auto", gpu=False) == torch.float32
    assert compute_dtype("bfloat16", gpu=False) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert compute_dtype("auto", gpu=True) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # a V100 or T4
    assert compute_dtype("auto", gpu=True) == torch.float16
    # a model saved in bf16 (as real models are) is computed in float32 on this CPU, or as the setting says
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert next(load_for_generation(tmp_path, None)[1].parameters()).dtype == torch.float32
    assert next(load_for_generation(tmp_path, None, dtype="bfloat16")[1].parameters()).dtype == torch.bfloat16
