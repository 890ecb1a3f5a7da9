"""Config validation: every mistake reported at once, each naming file, line and field."""

import copy
import json
import os

import pytest
import yaml

from conftest import REPO
from snaketune.config import load
from snaketune.errors import UserError
from snaketune.layout import Layout
from snaketune.settings import ExamSettings, GenerationSettings
from snaketune.workflow import dataset_settings


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
    assert run.train.learning_rate == 0.01 and run.train.max_grad_norm == 1.0  # run_defaults, then the default
    assert cfg.runs["matching-lora"].generation == GenerationSettings(max_new_tokens=8, batch_size="auto", seed=42)
    assert run.exam == ExamSettings(shots=2, batch_size=16)
    assert cfg.datasets["identity"].system is None


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
    with pytest.raises(UserError, match=r"'dpo' is not one of \['lora', 'qlora', 'full', 'none'\]"):
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
    assert (dataset.path, dataset.format, dataset.columns) == (str(tmp_path / "qa.json"), "alpaca",
                                                               {"instruction": "q", "output": "a"})
    config["datasets"]["identity"]["name"] = "qb"
    path = write(tmp_path, config)
    with pytest.raises(UserError) as caught:
        load(config, [path])
    assert str(caught.value) == (f"{path}:{line_of(path, 'name: qb')}: datasets.identity.name: "
                                 f'{info}: dataset "qb" not found (it has: qa)')


def test_dataset_needs_path_and_format_and_columns_needs_its_templates(tmp_path, default_config):
    config = copy.deepcopy(default_config)
    (tmp_path / "m.csv").write_text("s1,s2\na,b\n")
    (tmp_path / "x.jsonl").write_text("{}\n")
    config["datasets"]["identity"] = {"format": "columns", "path": str(tmp_path / "m.csv"), "prompt": "{s1}"}
    config["datasets"]["text-matching"] = {"path": str(tmp_path / "x.jsonl")}
    path = write(tmp_path, config)
    with pytest.raises(UserError) as caught:
        load(config, [path])
    assert str(caught.value).splitlines() == [
        f"{path}:{line_of(path, 'identity:')}: datasets.identity: format `columns` needs `response`: a template "
        "over the file's columns",
        f"{path}:{line_of(path, 'text-matching:')}: datasets.text-matching: `format` is required (or "
        "`dataset_info` and `name`)",
    ]


def test_missing_data_paths_name_file_line_key_and_path(tmp_path, default_config):
    config = copy.deepcopy(default_config)
    config["datasets"]["identity"]["path"] = "data/identty.jsonl"  # a typo
    config["datasets"]["text-matching"]["path"] = "data"  # a folder
    config["exams"]["mmcu-sample"]["path"] = "data/mmcu"
    config["datasets"]["new"] = {"path": ["data/identity.jsonl", "data/more.jsonl"], "format": "messages"}
    path = write(tmp_path, config)
    with pytest.raises(UserError) as caught:
        load(config, [path])
    assert str(caught.value).splitlines() == [
        f"{path}:{line_of(path, 'identty')}: datasets.identity.path: file `data/identty.jsonl` not found "
        f"(paths are relative to {os.getcwd()})",
        f"{path}:{path.read_text().splitlines().index('    path: data') + 1}: datasets.text-matching.path: `data` is "
        "a folder; name the data file inside it",
        f"{path}:{line_of(path, 'new:') + 1}: datasets.new.path.1: file `data/more.jsonl` not found (paths are "
        f"relative to {os.getcwd()})",
        f"{path}:{line_of(path, 'path: data/mmcu')}: exams.mmcu-sample.path: folder `data/mmcu` not found (paths "
        f"are relative to {os.getcwd()})",
    ]


def test_a_dataset_info_whose_file_is_missing_is_an_error(tmp_path, default_config):
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"qa": {"file_name": "qa.json"}}))
    config = copy.deepcopy(default_config)
    config["datasets"]["identity"] = {"dataset_info": str(info), "name": "qa"}
    path = write(tmp_path, config)
    with pytest.raises(UserError) as caught:
        load(config, [path])
    assert str(caught.value) == (f"{path}:{line_of(path, 'dataset_info')}: datasets.identity.dataset_info: file "
                                 f"`{tmp_path / 'qa.json'}` not found (paths are relative to {os.getcwd()})")


@pytest.mark.parametrize("name", ["abc\n", "-x", "a b"])
def test_names_must_match_the_pattern_in_full(default_config, name):
    config = copy.deepcopy(default_config)
    config["runs"][name] = {"model": "tiny-qwen2", "dataset": "identity"}
    with pytest.raises(UserError, match="may hold only letters, digits"):
        load(config)


def test_a_sweep_can_set_one_key_of_a_stage_block(default_config):
    config = copy.deepcopy(default_config)
    config["runs"]["gen"] = {"model": "tiny-qwen2", "dataset": "identity", "generation": {"batch_size": 4},
                             "sweep": {"generation.max_new_tokens": [1, 40]}}
    cfg = load(config)
    points = [cfg.runs[name].generation for name in ("gen-generation.max_new_tokens1",
                                                     "gen-generation.max_new_tokens40")]
    assert [(g.max_new_tokens, g.batch_size) for g in points] == [(1, 4), (40, 4)]
    config["runs"]["gen"]["sweep"] = {"generation.max_new_tokenz": [1]}
    with pytest.raises(UserError, match="`generation.max_new_tokenz` is not a run setting that can be swept"):
        load(config)


def test_mixes_replays_and_test_sets_are_checked_with_file_and_line(tmp_path, default_config):
    config = copy.deepcopy(default_config)
    config["datasets"].update({
        "replay": {"replay": "data/nowhere.txt", "system": "Be helpful."},
        "both": {"replay": "data/identity.jsonl", "path": "data/identity.jsonl"},
        "mixed": {"mix": {"identity": 1.0, "ghost": 0.5, "qa": 1}},
        "qa": {"path": "data/identity.jsonl", "format": "messages", "test_size": "all"},
    })
    config["runs"]["identity-lora"]["dataset"] = "qa"
    config["runs"]["identity-lora"]["evaluation"]["test_sets"] = ["qa", "missing"]
    path = write(tmp_path, config)
    with pytest.raises(UserError) as problem:
        load(config, [path])
    lines = str(problem.value).splitlines()
    expected = [
        (f"{path}:{line_of(path, 'nowhere.txt')}: datasets.replay.replay: file `data/nowhere.txt` not found"),
        (f"{path}:{line_of(path, '  both:') + 2}: datasets.both.path: `path` does not go with `replay`"),
        "datasets.mixed.mix.ghost: names undefined dataset `ghost`",
        "datasets.mixed.mix.qa: `qa` has test_size: all (test rows only); score on it with evaluation.test_sets",
        "runs.identity-lora.dataset: dataset `qa` has test_size: all",
        "runs.identity-lora.evaluation.test_sets: names undefined dataset `missing`",
    ]
    for wanted in expected:
        assert any(wanted in line for line in lines), (wanted, lines)
    assert len(lines) == len(expected), lines


def test_a_mix_trains_as_its_datasets_do_and_builtin_models_can_tie_embeddings(default_config):
    config = copy.deepcopy(default_config)
    config["datasets"]["mixed"] = {"mix": {"text-matching": 0.5, "identity": 1.0}}  # not in alphabetical order
    config["models"]["tiny-qwen2"]["tie_word_embeddings"] = True
    config["models"]["from-gguf"] = {"source": "gguf", "path": "data/identity.jsonl"}
    with pytest.raises(UserError, match="models.from-gguf.path: `data/identity.jsonl` is not a .gguf file"):
        load(config)
    del config["models"]["from-gguf"]
    cfg = load(config)
    assert cfg.datasets["mixed"].mix == [("text-matching", 0.5), ("identity", 1.0)]  # in the config's order ...
    assert json.loads(dataset_settings(cfg, "mixed"))["mix"] == [["text-matching", 0.5], ["identity", 1.0]]
    assert Layout(cfg).dataset_inputs("mixed", "tiny-qwen2")["mix_test"] == (  # ... the first one's test split
        "results/datasets/text-matching/tiny-qwen2/test.parquet")
    assert cfg.datasets["mixed"].max_seq_length == 128 and cfg.datasets["mixed"].paths == []
    assert cfg.models["tiny-qwen2"]["tie_word_embeddings"] is True


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path, default_config):
    text = yaml.safe_dump(default_config, sort_keys=False, allow_unicode=True)
    # a second identity-lora run (YAML would keep it and drop the first) and a repeated learning_rate
    text = text.replace("  identity-base:\n", "  identity-lora:\n    model: tiny-qwen2\n    dataset: identity\n"
                                              "  identity-base:\n    learning_rate: 0.5\n    learning_rate: 0.1\n", 1)
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    first_run, second_run = [i for i, line in enumerate(text.splitlines(), 1) if line == "  identity-lora:"]
    rates = [i for i, line in enumerate(text.splitlines(), 1) if line in ("    learning_rate: 0.5",
                                                                          "    learning_rate: 0.1")]
    with pytest.raises(UserError) as problem:
        load(yaml.safe_load(text), [path])
    lines = str(problem.value).splitlines()
    assert f"{path}:{second_run}: runs.identity-lora: given twice (also at line {first_run}); YAML would keep this " \
           "one and drop the other: remove one" in lines
    assert any(line.startswith(f"{path}:{rates[1]}: runs.identity-base.learning_rate: given twice (also at line "
                               f"{rates[0]})") for line in lines)


@pytest.mark.parametrize("key, value", [("learning_rate", ".nan"), ("learning_rate", ".inf"),
                                        ("warmup_steps", "-.inf")])
def test_nan_and_infinity_are_config_errors(tmp_path, default_config, key, value):
    text = yaml.safe_dump(default_config, sort_keys=False, allow_unicode=True)
    text = text.replace("  identity-base:\n", f"  identity-base:\n    {key}: {value}\n", 1)
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as problem:
        load(yaml.safe_load(text), [path])
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row == f"    {key}: {value}")
    assert str(problem.value).splitlines()[0] == (
        f"{path}:{line}: runs.identity-base.{key}: must be a finite number, not {float(value.replace('.', ''))}")


def test_config_files_and_overrides_merge_as_snakemake_merges_them(tmp_path, default_config, monkeypatch):
    from snakemake.utils import update_config

    from snaketune.config import load_files, merge_into

    monkeypatch.chdir(REPO)  # the default config's data paths are relative to the working directory
    base = write(tmp_path, default_config)
    change = {"runs": {"identity-lora": {"learning_rate": 0.002, "evaluation": {"metrics": ["bleu"]}}},
              "run_defaults": {"max_steps": 3}, "disk_gib": 40}
    over = tmp_path / "over.yaml"
    over.write_text(yaml.safe_dump(change), encoding="utf-8")
    overrides = {"gpu_memory_gib": 24, "runs": {"matching-lora": {"lora_rank": 4}}}

    snakemake_merged = copy.deepcopy(default_config)
    update_config(snakemake_merged, change)
    update_config(snakemake_merged, overrides)
    assert merge_into(merge_into(copy.deepcopy(default_config), change), overrides) == snakemake_merged

    cfg = load_files([base, over], overrides)
    assert cfg == load(snakemake_merged, [base, over])
    lora = cfg.runs["identity-lora"]
    assert lora.train.learning_rate == 0.002 and lora.train.max_steps == 3 and lora.evaluation.metrics == ["bleu"]
    assert lora.evaluation.exams == ["mmcu-sample"] and lora.evaluation.shots == 2  # merged into, not replaced
    assert cfg.runs["matching-lora"].train.lora_rank == 4 and (cfg.gpu_memory_gib, cfg.disk_gib) == (24, 40)
    assert load_files([]) == load(default_config)  # no files: the embedded default, as the Snakefile reads it


@pytest.mark.parametrize("text, message", [
    (None, "cannot read the config file"),
    ("runs: [a\n", "config.yaml:2: not valid YAML"),
    ("- a\n- b\n", "config.yaml: a config file holds a mapping (`key: value` lines), not a list"),
])
def test_a_config_file_that_is_missing_malformed_or_not_a_mapping_is_one_line(tmp_path, text, message):
    from snaketune.config import load_files

    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as raised:
        load_files([path])
    assert message in str(raised.value) and len(str(raised.value).splitlines()) == 1
