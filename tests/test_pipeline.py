"""The real Snakefile on the tiny default: every stage's output, learning, staleness, and user errors."""

import copy
import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import REPO, TINY_MODEL, planned_jobs, scratch_workflow, snakemake, workflow_env

pytestmark = pytest.mark.workflow


def test_demo_writes_every_stage_output(demo):
    results = demo / "results"
    assert json.loads((results / "models/tiny-qwen2/manifest.json").read_text())["source"] == "builtin"
    for dataset in ("identity", "text-matching"):
        built = results / "datasets" / dataset / "tiny-qwen2"
        assert all((built / f"{split}.parquet").is_file() for split in ("train", "eval", "test"))
        assert json.loads((built / "stats.json").read_text())["splits"]["train"]["rows"] > 0
    for run in ("identity-lora", "identity-base", "matching-lora"):
        folder = results / "runs" / run
        if run == "identity-base":  # a baseline (max_steps: 0) has no train or merge job: it reads the base
            assert not (folder / "adapter").exists() and not (folder / "merged").exists()
            assert not (folder / "train_log.csv").exists() and not (demo / "logs/train" / f"{run}.log").exists()
            assert "computing in torch.float32" in (demo / "logs/predict" / f"{run}.log").read_text()
        else:
            assert (folder / "adapter" / "adapter_config.json").is_file()
            assert (folder / "adapter" / "adapter_model.safetensors").is_file()
            assert list((folder / "merged").glob("*.safetensors"))
            assert (folder / "loss.png").read_bytes()[:4] == b"\x89PNG"
        predictions = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
        assert list(predictions.columns)[:4] == ["id", "prompt", "reference", "prediction"]
        metrics = json.loads((folder / "metrics.json").read_text())
        wanted = {"exact_match", "accuracy", "f1"} if run == "matching-lora" else {"bleu-4", "rouge-l", "exact_match"}
        assert metrics["n"] == len(predictions) and wanted <= set(metrics)
        assert not (folder / "checkpoints").exists()  # removed once the adapter is safely written
    log = pd.read_csv(results / "runs" / "identity-lora" / "train_log.csv")
    assert list(log.columns) == ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second"]
    assert log["loss"].iloc[-1] < log["loss"].iloc[0] / 10
    page = (results / "report.html").read_text()
    assert page.index("<h2>Runs compared</h2>") < page.index("<h2>Plots</h2>") < page.index(
        "<h2>Answers side by side</h2>") < page.index("<h2>Training</h2>")  # what the user came for, first
    exams = page.split("<h2>Exams: accuracy per subject</h2>")[1].split("<h2>")[0]
    assert ">identity-lora</th><th title='sort by identity-base'>identity-base</th>" in exams
    assert "data-v='医学'>医学</td><td class='' data-v='5'>5</td>" in exams and "data-v='overall'>overall</td>" in exams
    confusion = page.split("<h2>Labels: confusion tables</h2>")[1].split("<h2>")[0]
    assert "<h3>matching-lora</h3>" in confusion and ">相同</td>" in confusion
    assert page.count("<div class='scroll'><table") >= 6  # wide tables scroll inside the page
    for plot in ("loss-identity", "loss-text-matching", "metrics-identity", "metrics-text-matching"):
        assert (results / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
    exam = json.loads((results / "runs/identity-lora/exams/mmcu-sample.json").read_text())
    assert (exam["n"], exam["shots"], sorted(exam["subjects"])) == (9, 2, ["医学", "法律"])
    board = pd.read_csv(results / "leaderboard.csv").set_index("run")
    assert board.loc["identity-lora", "mmcu-sample_accuracy"] == exam["accuracy"]
    assert board.loc["identity-lora", "train_seconds"] > 0
    assert (board.loc["identity-base", "method"], board.loc["identity-base", "train_steps"]) == ("none", 0)
    assert board.loc["identity-base", "mmcu-sample_ties"] == 0  # float32 on the CPU: no exact ties
    matching = json.loads((results / "runs/matching-lora/metrics.json").read_text())
    assert set(matching["confusion"]) == {"相同", "不同"} and 0 <= matching["f1"] <= 1
    assert board.loc["matching-lora", "accuracy"] == matching["accuracy"]


def test_snakemakes_own_report_has_the_loss_curves_and_leaderboard(demo):
    result = snakemake(demo, "--report", "snakemake_report.html", "--configfile", str(demo / "config.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    page = (demo / "snakemake_report.html").read_text(errors="replace")
    assert "Loss curves" in page and "Leaderboard" in page and "leaderboard.csv" in page
    assert "report.html" in page and "loss-identity.png" in page and "metrics-text-matching.png" in page


def test_fine_tuning_is_real_learning(demo):
    board = pd.read_csv(demo / "results" / "leaderboard.csv").set_index("run")
    assert board.loc["identity-lora", "exact_match"] >= 0.9
    assert board.loc["identity-base", "exact_match"] < 0.1
    assert board.loc["identity-base", "train_steps"] == 0


def test_merged_model_loads_and_answers_with_auto_classes_alone(demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = demo / "results" / "runs" / "identity-lora" / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi, who made you?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**ids, max_new_tokens=30, do_sample=False)
    answer = tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == "The snaketune team built me."
    assert output[0, -1].item() in model.generation_config.eos_token_id  # it stopped by itself


def test_the_trained_adapter_loads_with_auto_peft_from_any_folder(demo, tmp_path):
    """The adapter names its base by absolute path, so `AutoPeftModelForCausalLM` finds it from another folder."""
    import json
    import os
    import subprocess
    import sys

    from conftest import workflow_env

    adapter = demo / "results" / "runs" / "identity-lora" / "adapter"
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(recorded) and os.path.isdir(recorded)
    script = ("from peft import AutoPeftModelForCausalLM\n"
              f"model = AutoPeftModelForCausalLM.from_pretrained({str(adapter)!r})\n"
              "print(model.peft_config['default'].base_model_name_or_path)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env=workflow_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == recorded


def test_right_after_a_full_run_nothing_is_stale(demo):
    result = snakemake(demo, "--configfile", str(demo / "config.yaml"), "--dry-run")
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.parametrize("stage, gone, replanned", [
    # what Snakemake deletes when a forced job is interrupted: its outputs, while everything after it stays
    ("train", ["adapter", "train_log.csv", "train_summary.json", "loss.png"],
     ["evaluate", "exam", "merge", "predict", "report", "train"]),
    ("merge", ["merged"], ["evaluate", "exam", "merge", "predict", "report"]),
])
def test_a_rerun_after_an_interrupted_forced_job_rebuilds_it_and_what_follows(demo, tmp_path, stage, gone,
                                                                               replanned):
    copied = tmp_path / "demo"
    shutil.copytree(demo, copied, symlinks=True)
    for name in gone:
        path = copied / "results" / "runs" / "identity-lora" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = snakemake(copied, "--configfile", str(copied / "config.yaml"), "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = planned_jobs(result)
    assert sorted({rule for rule, _ in jobs}) == replanned
    assert all("identity-lora" in wildcards for rule, wildcards in jobs if rule != "report")


def dry_run_with(demo, default_config, edit, name):
    config = copy.deepcopy(default_config)
    edit(config)
    path = demo / name
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    result = snakemake(demo, "--configfile", str(path), "--dry-run")
    assert result.returncode == 0, result.stderr
    return planned_jobs(result)


def config_error(tmp_path, default_config, edit):
    config = copy.deepcopy(default_config)
    edit(config)
    path = scratch_workflow(tmp_path, config)
    result = snakemake(tmp_path, "--configfile", str(path), "--dry-run")
    return path, result


def test_unknown_config_key_fails_with_one_line_naming_it(tmp_path, default_config):
    path, result = config_error(tmp_path, default_config,
                                lambda c: c["runs"]["identity-base"].update(lora_rnak=4))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "lora_rnak" in text)
    assert (f"error: {path}:{line}: runs.identity-base.lora_rnak: unknown key `lora_rnak` "
            "(did you mean `lora_rank`?)") in result.stderr.splitlines()


def test_run_naming_an_undefined_model_fails_with_one_line(tmp_path, default_config):
    path, result = config_error(tmp_path, default_config,
                                lambda c: c["runs"]["identity-lora"].update(model="qwen-14b"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert any(line.startswith(f"error: {path}:") and "runs.identity-lora.model: names undefined model `qwen-14b`"
               in line for line in result.stderr.splitlines())


def test_bad_data_rows_fail_the_dataset_job_with_file_line_field(tmp_path):
    (tmp_path / "data").mkdir()
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    (tmp_path / "data" / "not_json.jsonl").write_text("\n".join([good, good, "{not json", good]) + "\n")
    (tmp_path / "data" / "no_messages.jsonl").write_text("\n".join([good, '{"conversation": []}', good]) + "\n")
    config = {
        "models": {"tiny": TINY_MODEL},
        "datasets": {"not-json": {"path": "data/not_json.jsonl", "format": "messages"},
                     "no-messages": {"path": "data/no_messages.jsonl", "format": "messages"}},
        "runs": {"a": {"model": "tiny", "dataset": "not-json"}, "b": {"model": "tiny", "dataset": "no-messages"}},
    }
    path = scratch_workflow(tmp_path, config)
    targets = [f"results/datasets/{name}/tiny/stats.json" for name in ("not-json", "no-messages")]
    result = snakemake(tmp_path, "--configfile", str(path), "--keep-going", *targets)
    assert result.returncode != 0
    expected = {"not-json": "error: data/not_json.jsonl:3: not valid JSON: Expecting property name enclosed in "
                            "double quotes (column 2)",
                "no-messages": 'error: data/no_messages.jsonl:2: field "messages" missing'}
    for name, line in expected.items():
        log = (tmp_path / "logs" / "dataset" / name / "tiny.log").read_text()
        assert line in log.splitlines() and "Traceback" not in log
        assert not list((tmp_path / "results" / "datasets").glob(f"{name}/**/*.*"))  # nothing looks finished


def test_datasets_from_dataset_info_and_a_csv_build_through_the_workflow(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"conversations": [{"from": "human", "value": f"问题{i}"}, {"from": "gpt", "value": f"答案{i}"}]}
            for i in range(12)]
    (data / "chat.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"chat": {"file_name": "chat.json", "formatting": "sharegpt"}}))
    (data / "pairs.csv").write_text("s1,s2,label\n" + "".join(f"句子{i},句子{i + 1},{i % 2}\n" for i in range(12)),
                                    encoding="utf-8")
    config = {
        "models": {"tiny": TINY_MODEL},
        "datasets": {
            "chat": {"dataset_info": "data/dataset_info.json", "name": "chat", "test_size": 2, "eval_size": 1},
            "pairs": {"path": "data/pairs.csv", "format": "columns", "prompt": "{s1} / {s2}", "response": "{label}",
                      "template": "qwen", "test_size": 2, "eval_size": 1},
        },
        "runs": {"a": {"model": "tiny", "dataset": "chat"}, "b": {"model": "tiny", "dataset": "pairs"}},
    }
    path = scratch_workflow(tmp_path, config)
    targets = [f"results/datasets/{name}/tiny/stats.json" for name in ("chat", "pairs")]
    snakemake(tmp_path, *targets, "--configfile", str(path), check=True)
    chat = json.loads((tmp_path / targets[0]).read_text())
    pairs = json.loads((tmp_path / targets[1]).read_text())
    assert (chat["format"], chat["rows_read"], chat["splits"]["train"]["rows"]) == ("sharegpt", 12, 9)
    assert pairs["template"] == "qwen" and "You are a helpful assistant." in pairs["chat_template"]
    test = pd.read_parquet(tmp_path / "results/datasets/pairs/tiny/test.parquet")
    assert test["prompt"][0].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert (tmp_path / "results/datasets/pairs/tiny/lengths.png").exists()
    # editing the dataset_info.json reruns the build that read it, and nothing else
    info = json.loads((data / "dataset_info.json").read_text())
    info["chat"]["columns"] = {"messages": "conversations"}
    (data / "dataset_info.json").write_text(json.dumps(info))
    jobs = planned_jobs(snakemake(tmp_path, *targets, "--dry-run", "--configfile", str(path)))
    assert jobs == [("dataset", "dataset=chat, model=tiny")]


def test_lint_reports_nothing():
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--snakefile", str(REPO / "Snakefile")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


@pytest.mark.parametrize("stage", ["download", "replay", "dataset", "train", "merge", "export", "predict", "evaluate",
                                   "exam", "report"])
def test_every_stage_script_has_readable_help(stage):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / f"{stage}.py"), "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "Example:" in result.stdout and "usage:" in result.stdout


def dry_run_with_code(code, workdir):
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(code / "Snakefile"), "--directory",
               str(workdir), "--profile", str(code / "profiles" / "local"), "--cores", "2", "--dry-run",
               "--configfile", str(workdir / "config.yaml")]
    result = subprocess.run(command, capture_output=True, text=True, env=workflow_env(), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_an_upgrade_adding_a_setting_at_its_default_reruns_nothing_and_a_changed_default_reruns(demo, tmp_path):
    code = tmp_path / "snaketune"  # snaketune as a later release, with one more train setting
    code.mkdir()
    for part in ("Snakefile", "rules", "scripts", "config", "profiles", "envs"):
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, code / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, code / part)
    settings = code / "scripts" / "snaketune" / "settings.py"  # TrainSettings and `added` live there
    original = settings.read_text()
    anchor = "\n    @property\n    def trains(self)"
    assert original.count(anchor) == 1

    def release(field_line):
        settings.write_text(original.replace(anchor, f"\n    {field_line}\n{anchor}", 1))

    release("new_knob: float = added(0.0)")  # a new setting at the value that changes nothing
    result = dry_run_with_code(code, demo)
    assert "Nothing to be done" in result.stdout + result.stderr

    release("new_knob: float = added(0.5, same_output_at=0.0)")  # a later default that does change training
    jobs = planned_jobs(dry_run_with_code(code, demo))
    assert {wildcards for rule, wildcards in jobs if rule == "train"} == {"run=identity-lora", "run=matching-lora"}
