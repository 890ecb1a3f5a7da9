"""Model sources: builtin is deterministic; local is validated; hub downloads are real code, patched at the hub call."""

import hashlib
import json

import pytest

from conftest import TINY_MODEL
from snaketune.download import fetch, model_path
from snaketune.errors import UserError


def safetensors_bytes(n):
    import torch
    from safetensors.torch import save

    return save({"w": torch.zeros(n)})


def fake_snapshot(folder):
    """A downloaded model folder as a hub would leave it."""
    folder.mkdir(parents=True)
    files = {"config.json": b'{"model_type": "qwen2"}', "tokenizer.json": b"{}",
             "model-00001-of-00002.safetensors": safetensors_bytes(250), "model-00002-of-00002.safetensors":
             safetensors_bytes(3)}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return files


def hub_settings(source, **extra):
    return {"source": source, "id": "qwen/Qwen-14B-Chat", "revision": "v1.0.8", "cache_dir": "/data/models",
            "trust_remote_code": False, **extra}


def check_manifest(manifest, folder, files):
    assert manifest["path"] == str(folder)
    assert manifest["id"] == "qwen/Qwen-14B-Chat" and manifest["revision"] == "v1.0.8"
    assert {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]} == {
        name: (len(content), hashlib.sha256(content).hexdigest()) for name, content in files.items()
    }


def test_modelscope_download_passes_id_revision_and_cache_dir(tmp_path, monkeypatch):
    import modelscope

    calls, snapshot = [], tmp_path / "cache" / "qwen" / "Qwen-14B-Chat"
    files = fake_snapshot(snapshot)

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(snapshot)

    monkeypatch.setattr(modelscope, "snapshot_download", snapshot_download)
    manifest = fetch(hub_settings("modelscope"), tmp_path / "out")
    assert calls == [{"model_id": "qwen/Qwen-14B-Chat", "revision": "v1.0.8", "cache_dir": "/data/models"}]
    assert manifest["source"] == "modelscope"
    check_manifest(manifest, snapshot, files)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_huggingface_download_passes_repo_revision_and_cache_dir(tmp_path, monkeypatch):
    import huggingface_hub

    calls, snapshot = [], tmp_path / "hf" / "snapshots" / "abc123"
    files = fake_snapshot(snapshot)

    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    manifest = fetch(hub_settings("huggingface"), tmp_path / "out")
    assert calls == [{"repo_id": "qwen/Qwen-14B-Chat", "revision": "v1.0.8", "cache_dir": "/data/models"}]
    check_manifest(manifest, snapshot, files)
    assert model_path(tmp_path / "out" / "manifest.json") == (snapshot, False)


def test_a_hub_download_without_model_files_is_refused(tmp_path, monkeypatch):
    import modelscope

    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(modelscope, "snapshot_download", lambda **kwargs: str(tmp_path / "empty"))
    with pytest.raises(UserError, match="has no config.json"):
        fetch(hub_settings("modelscope"), tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_local_model_is_used_in_place_unless_copy_is_asked(tmp_path, tiny_model):
    settings = {"source": "local", "path": str(tiny_model), "copy": False, "trust_remote_code": False}
    manifest = fetch(settings, tmp_path / "in-place")
    assert manifest["path"] == str(tiny_model) and not (tmp_path / "in-place" / "config.json").exists()
    copied = fetch({**settings, "copy": True}, tmp_path / "copied")
    assert (tmp_path / "copied" / "config.json").is_file()
    assert [f["sha256"] for f in copied["files"]] == [f["sha256"] for f in manifest["files"]]


def test_local_path_that_is_not_a_model_folder_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="has no tokenizer files"):
        fetch({"source": "local", "path": str(tmp_path / "weights"), "copy": False, "trust_remote_code": False},
              tmp_path / "out")


def test_builtin_model_is_deterministic_and_loads_with_auto_classes(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    again = fetch(TINY_MODEL, tmp_path / "again")
    first = json.loads((tiny_model / "manifest.json").read_text())
    assert [(f["path"], f["sha256"]) for f in again["files"]] == [(f["path"], f["sha256"]) for f in first["files"]]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.get_vocab()
    assert tokenizer.decode(tokenizer("你好，world")["input_ids"]) == "你好，world"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])


def test_a_truncated_safetensors_file_is_refused_at_download(tmp_path, tiny_model):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"model.safetensors: .*truncated.*; download it again"):
        fetch({"source": "local", "path": str(broken), "copy": False, "trust_remote_code": False}, tmp_path / "out")


def test_a_model_folder_that_vanished_is_an_error_never_a_hub_lookup(tmp_path, tiny_model, monkeypatch):
    import shutil

    here = tmp_path / "here"
    shutil.copytree(tiny_model, here)
    monkeypatch.chdir(tmp_path)
    manifest = fetch({"source": "local", "path": "here", "copy": False, "trust_remote_code": False}, "out")
    assert manifest["path"] == "here"
    folder, _ = model_path("out/manifest.json")
    assert folder == tmp_path / "here"  # absolute: transformers can only read it from disk
    shutil.rmtree(here)
    with pytest.raises(UserError, match=r"out/manifest.json: the model folder it names, here, is gone"):
        model_path("out/manifest.json")


def test_a_model_folder_without_its_weights_is_refused_at_download(tmp_path, tiny_model):
    import shutil

    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    settings = {"source": "local", "path": str(folder), "copy": False, "trust_remote_code": False}
    with pytest.raises(UserError, match=r"lacks weight files: model.safetensors or pytorch_model.bin \(no weights"):
        fetch(settings, tmp_path / "out")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    shutil.copy(tiny_model / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    with pytest.raises(UserError, match=r"lacks weight files: model-00002-of-00002.safetensors; copy or download"):
        fetch(settings, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_gguf_of_an_architecture_transformers_cannot_read_is_one_line(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv7")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match=r"odd.gguf: architecture `rwkv7` cannot be dequantized by transformers "
                                        r"\(it reads .*llama.*qwen2"):
        fetch({"source": "gguf", "path": str(path), "dtype": "bfloat16", "trust_remote_code": False},
              tmp_path / "out")
    (tmp_path / "text.gguf").write_text("not a gguf")
    with pytest.raises(UserError, match="is not a readable GGUF file"):
        fetch({"source": "gguf", "path": str(tmp_path / "text.gguf"), "dtype": "bfloat16",
               "trust_remote_code": False}, tmp_path / "out")
