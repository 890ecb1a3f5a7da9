"""Config validation: every mistake reported at once, each naming file, line and field."""

import copy
import json

import pytest
import yaml

from snaketune.config import load
from snaketune.errors import UserError


def write(tmp_path, config):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def line_of(path, text):
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_default_config_is_valid_and_gets_defaults(default_config):
    cfg = load(default_config)
    assert set(cfg.runs) == {"identity-lora", "identity-base", "matching-lora"}
    run = cfg.runs["identity-lora"]
    assert run["learning_rate"] == 0.01 and run["max_grad_norm"] == 1.0  # run_defaults, then schema default
    assert cfg.runs["matching-lora"]["generation"] == {"max_new_tokens": 8, "batch_size": 16, "do_sample": False,
                                                       "temperature": 1.0, "top_p": 1.0,
                                                       "predict_from": "merged"}
    assert cfg.datasets["identity"]["system"] is None


def test_unknown_key_names_file_line_and_suggests_the_known_one(tmp_path, default_config):
    config = copy.deepcopy(default_config)
    config["runs"]["identity-lora"]["learnig_rate"] = 0.1
    path = write(tmp_path, config)
    with pytest.raises(UserError) as caught:
        load(config, [path])
    assert str(caught.value) == (f"{path}:{line_of(path, 'learnig_rate')}: runs.identity-lora.learnig_rate: "
                                 "unknown key `learnig_rate` (did you mean `learning_rate`?)")


def test_every_problem_is_reported_at_once(tmp_path, default_config):
    config = copy.deepcopy(default_config)
    config["surprise"] = 1
    config["datasets"]["identity"]["format"] = "csv"
    config["runs"]["identity-base"]["lora_rank"] = "sixteen"
    with pytest.raises(UserError) as caught:
        load(config, [write(tmp_path, config)])
    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    assert any(": surprise: unknown key `surprise`" in line for line in lines)
    assert any("datasets.identity.format: 'csv' is not one of" in line for line in lines)
    assert any("runs.identity-base.lora_rank: 'sixteen' is not of type 'integer'" in line for line in lines)


def test_run_naming_an_undefined_model_is_an_error(tmp_path, default_config):
    config = copy.deepcopy(default_config)
    config["runs"]["identity-lora"]["model"] = "qwen-huge"
    path = write(tmp_path, config)
    with pytest.raises(UserError, match=r"runs\.identity-lora\.model: names undefined model `qwen-huge` "
                                        r"\(defined: tiny-qwen2\)") as caught:
        load(config, [path])
    assert str(caught.value).startswith(f"{path}:{line_of(path, 'qwen-huge')}:")


def test_train_stage_rules_are_checked_when_the_config_loads(tmp_path, default_config):
    config = copy.deepcopy(default_config)
    config["runs"]["identity-lora"].update(method="qlora", deepspeed="zero3")
    path = write(tmp_path, config)
    with pytest.raises(UserError) as caught:
        load(config, [path])
    assert str(caught.value).startswith(f"{path}:{line_of(path, 'identity-lora:')}: runs.identity-lora: method "
                                        "`qlora` cannot shard 4-bit weights with ZeRO-3")


def test_unknown_methods_fail_clearly(default_config):
    config = copy.deepcopy(default_config)
    config["runs"]["identity-lora"]["method"] = "dpo"
    with pytest.raises(UserError, match=r"'dpo' is not one of \['lora', 'qlora', 'full'\]"):
        load(config)


def test_source_specific_keys_are_checked(default_config):
    config = copy.deepcopy(default_config)
    config["models"]["hub"] = {"source": "modelscope", "hidden_size": 64}
    with pytest.raises(UserError) as caught:
        load(config)
    assert "models.hub.hidden_size: `hidden_size` does not apply to source `modelscope`" in str(caught.value)
    assert "models.hub: source `modelscope` needs `id`" in str(caught.value)


def test_model_cache_dir_is_where_hub_models_go_unless_an_entry_says_otherwise(default_config):
    config = copy.deepcopy(default_config)
    config["model_cache_dir"] = "/root/autodl-tmp/models"
    config["models"]["qwen"] = {"source": "modelscope", "id": "qwen/Qwen2-0.5B-Instruct"}
    config["models"]["llama"] = {"source": "huggingface", "id": "x/y", "cache_dir": "/data/hf"}
    cfg = load(config)
    assert cfg.models["qwen"]["cache_dir"] == "/root/autodl-tmp/models"
    assert cfg.models["llama"]["cache_dir"] == "/data/hf"
    assert "cache_dir" not in cfg.models["tiny-qwen2"]  # builtin models are built, not downloaded


def test_a_dataset_from_llama_factory_dataset_info(tmp_path, default_config):
    (tmp_path / "qa.json").write_text(json.dumps([{"q": "question", "a": "answer"}]))
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"qa": {"file_name": "qa.json", "columns": {"prompt": "q", "response": "a"}}}))
    config = copy.deepcopy(default_config)
    config["datasets"]["identity"] = {"dataset_info": str(info), "name": "qa", "max_seq_length": 64}
    dataset = load(config).datasets["identity"]
    assert (dataset["path"], dataset["format"], dataset["columns"]) == (str(tmp_path / "qa.json"), "alpaca",
                                                                         {"instruction": "q", "output": "a"})
    config["datasets"]["identity"]["name"] = "qb"
    path = write(tmp_path, config)
    with pytest.raises(UserError) as caught:
        load(config, [path])
    assert str(caught.value) == (f"{path}:{line_of(path, 'name: qb')}: datasets.identity.name: "
                                 f'{info}: dataset "qb" not found (it has: qa)')


def test_dataset_needs_path_and_format_and_columns_needs_its_templates(tmp_path, default_config):
    config = copy.deepcopy(default_config)
    config["datasets"]["identity"] = {"format": "columns", "path": "m.csv", "prompt": "{s1}"}
    config["datasets"]["text-matching"] = {"path": "x.jsonl"}
    path = write(tmp_path, config)
    with pytest.raises(UserError) as caught:
        load(config, [path])
    assert str(caught.value).splitlines() == [
        f"{path}:{line_of(path, 'identity:')}: datasets.identity: format `columns` needs `response`: a template "
        "over the file's columns",
        f"{path}:{line_of(path, 'text-matching:')}: datasets.text-matching: `format` is required (or "
        "`dataset_info` and `name`)",
    ]
