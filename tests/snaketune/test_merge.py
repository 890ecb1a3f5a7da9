"""Merge: the adapter folded into the base, in the base's dtype, one shard at a time in memory, and a folder
that loads with the auto classes alone."""

import json
import subprocess
import sys

import pytest

from conftest import workflow_env
from snaketune.templates import render


def test_remote_code_files_of_the_base_go_into_the_merged_folder(tmp_path):
    import json

    from snaketune.merge import copy_remote_code

    base, out = tmp_path / "base", tmp_path / "out"
    base.mkdir(), out.mkdir()
    (base / "modeling_qwen.py").write_text("# model code")
    (base / "tokenization_qwen.py").write_text("# tokenizer code")
    (base / "config.json").write_text(json.dumps({"model_type": "qwen"}))
    assert copy_remote_code(base, out) == []  # no auto_map: native architecture, nothing to carry
    auto_map = {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
    (base / "config.json").write_text(json.dumps({"auto_map": auto_map}))
    assert copy_remote_code(base, out) == ["modeling_qwen.py", "tokenization_qwen.py"]
    assert (out / "modeling_qwen.py").read_text() == "# model code"


def test_merged_logits_equal_base_plus_adapter_and_load_in_a_fresh_process(tmp_path, tiny_model, tiny_tokenizer):
    import json
    import subprocess
    import sys

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import workflow_env
    from snaketune.merge import merge
    from snaketune.settings import MergeSettings

    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora).save_pretrained(adapter)
    tiny_tokenizer.save_pretrained(adapter)
    assert merge(MergeSettings(dtype="float32"), tiny_model, False, adapter, tmp_path / "merged") < 1e-4

    text = render(tiny_tokenizer, [{"role": "user", "content": "你好, who are you?"}], add_generation_prompt=True)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()
    with torch.no_grad():
        expected = adapted(torch.tensor([ids])).logits[0]
    fresh = subprocess.run([sys.executable, "-c", (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}).eval()\n"
        f"AutoTokenizer.from_pretrained({str(tmp_path / 'merged')!r})\n"
        f"print(json.dumps(model(torch.tensor([{ids}])).logits[0].tolist()))")],
        capture_output=True, text=True, env=workflow_env(), check=True)
    merged = torch.tensor(json.loads(fresh.stdout.strip().splitlines()[-1]))
    assert (merged - expected).abs().max().item() < 1e-4
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        assert (expected - base(torch.tensor([ids])).logits[0]).abs().max() > 1e-2  # the adapter changes things


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory, tiny_tokenizer):
    """A bf16 model of 300 MB (big enough for its copies to show in the process's memory) and a LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    folder = tmp_path_factory.mktemp("bf16")
    config = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=1024, intermediate_size=4096,
                         num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=8,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder / "base", max_shard_size="100MB")
    tiny_tokenizer.save_pretrained(folder / "base")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(folder / "adapter")
    tiny_tokenizer.save_pretrained(folder / "adapter")
    return folder


def test_the_merged_model_keeps_the_base_dtype_and_size_with_one_copy_in_memory(bf16_base):
    import re

    from safetensors import safe_open

    from conftest import REPO

    base, adapter, merged = bf16_base / "base", bf16_base / "adapter", bf16_base / "merged"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "merge.py"), "--model-manifest",
                             str(write_manifest(base)), "--adapter", str(adapter), "--out", str(merged)],
                            capture_output=True, text=True, env=workflow_env())
    assert result.returncode == 0, result.stderr[-3000:]
    weights = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    assert len(list(merged.glob("*.safetensors"))) == len(list(base.glob("*.safetensors"))) > 2
    for shard in merged.glob("*.safetensors"):
        with safe_open(shard, "pt") as saved:
            assert {str(saved.get_tensor(key).dtype) for key in saved.keys()} == {"torch.bfloat16"}
    size = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    assert abs(size - weights) < 0.01 * weights  # the merged folder is the base's size, not twice it
    assert "merging shard by shard: 70 adapted weights, 0 replaced" in result.stderr
    held = float(re.search(r"memory held by the merge: (\d+) MiB", result.stderr).group(1)) * 2**20
    # one 100 MB shard at a time; the logits checks read the bf16 files memory-mapped (a float32 copy, or the
    # whole model held while merging, would be 2x or 1x the weights)
    assert held < 0.5 * weights


def write_manifest(folder):
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"source": "local", "path": str(folder), "trust_remote_code": False}))
    return manifest


def lora_pair(tmp_path, tiny_tokenizer, **lora_settings):
    """A float32 base saved in shards of at most 100 kB and a random (non-zero) LoRA adapter over it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **lora_settings)
    peft_model = get_peft_model(model, lora)
    for module in peft_model.modules():  # a trained lm_head: not the base's any more
        if module.__class__.__name__ == "ModulesToSaveWrapper":
            torch.nn.init.normal_(module.modules_to_save["default"].weight)
    peft_model.save_pretrained(tmp_path / "adapter")
    tiny_tokenizer.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def test_shard_by_shard_merge_writes_what_peft_merges_in_memory(tmp_path, tiny_tokenizer, capfd):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from snaketune.merge import merge
    from snaketune.settings import MergeSettings

    base, adapter = lora_pair(tmp_path, tiny_tokenizer, modules_to_save=["lm_head"], use_rslora=True)
    assert len(list(base.glob("*.safetensors"))) > 2
    assert merge(MergeSettings(), base, False, adapter, tmp_path / "merged") < 1e-4
    assert "merging shard by shard: 14 adapted weights, 1 replaced" in capfd.readouterr().err
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    expected = expected.state_dict()
    merged = tmp_path / "merged"
    assert sorted(p.name for p in merged.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    assert (merged / "model.safetensors.index.json").read_text() == (base / "model.safetensors.index.json").read_text()
    written = {}
    for shard in merged.glob("*.safetensors"):
        written.update(load_file(shard))
    assert set(written) == set(expected)
    for key, tensor in written.items():
        assert (tensor - expected[key]).abs().max() < 1e-5, key


def test_adapters_the_shards_cannot_take_are_merged_in_memory(tmp_path, tiny_tokenizer, capfd):
    from snaketune.merge import merge
    from snaketune.settings import MergeSettings

    base, adapter = lora_pair(tmp_path, tiny_tokenizer, use_dora=True)
    assert merge(MergeSettings(), base, False, adapter, tmp_path / "merged") < 1e-4
    assert "merging in memory (adapter settings {'use_dora': True} rules out" in capfd.readouterr().err


def test_the_weight_check_catches_a_merged_weight_that_is_not_base_plus_delta(tmp_path, tiny_tokenizer):
    """In bf16 the logits cannot tell a wrong merge from rounding on a deep model; the check of every merged
    weight against peft's own delta can."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from snaketune.merge import check_weights, merge
    from snaketune.settings import MergeSettings

    base, adapter = lora_pair(tmp_path, tiny_tokenizer)
    merge(MergeSettings(), base, False, adapter, tmp_path / "merged")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    assert check_weights(adapted, tmp_path / "merged", torch.float32) == 14
    shard = next(p for p in (tmp_path / "merged").glob("*.safetensors")
                 if any(k.endswith("q_proj.weight") for k in load_file(p)))
    tensors = load_file(shard)
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    original = load_file(next(p for p in base.glob("*.safetensors") if key in load_file(p)))[key]
    tensors[key] = original + 2 * (tensors[key] - original)  # the update applied twice (a wrong scaling)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="not base \\+ the adapter's delta"):
        check_weights(adapted, tmp_path / "merged", torch.float32)
