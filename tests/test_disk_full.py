"""A full disk: every stage says so in one line that reaches Snakemake's terminal, even when the job's log (on the
same full disk) cannot be written; no traceback, and the outputs of an earlier run stay whole."""

import json
import os
import re
import shlex
import subprocess
from contextlib import contextmanager

import pandas as pd

from conftest import REPO, workflow_env
from snaketune.templates import render


def fill(path):
    """Write zeros to ``path`` until its file system is full."""
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(handle, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(handle)


@contextmanager
def full_disk(folder, size="512k"):
    """A small tmpfs at ``folder``, filled up (needs root, as CI has)."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        fill(folder / "filler")
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def run_stage(command: str, log) -> subprocess.CompletedProcess:
    """A stage script as its rule runs it: `script ... 3>&2 > {log} 2>&1` under bash, stderr being Snakemake's."""
    env = {**workflow_env(), "SNAKETUNE_ERROR_FD": "3"}
    env["PATH"] = f"{REPO / 'scripts'}:{env['PATH']}"
    return subprocess.run(["bash", "-c", f"{command} 3>&2 > {shlex.quote(str(log))} 2>&1"], capture_output=True,
                          text=True, env=env)


def errors(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_predict_on_a_full_disk_says_so_on_the_terminal(tmp_path, tiny_model, tiny_tokenizer):
    prompts = [render(tiny_tokenizer, [{"role": "user", "content": f"q{i}"}], add_generation_prompt=True)
               for i in range(3)]
    pd.DataFrame({"id": ["a", "b", "c"], "prompt": prompts, "reference": ["r"] * 3}).to_parquet(
        tmp_path / "test.parquet")
    with full_disk(tmp_path / "full") as full:
        result = run_stage(f"predict.py --model {tiny_model} --test {tmp_path / 'test.parquet'} --out "
                           f"{full / 'predictions.csv'} --partial {full / 'partial.csv'} --settings "
                           f"'{json.dumps({'max_new_tokens': 4})}'", full / "predict.log")
        assert result.returncode == 1 and "Traceback" not in result.stderr
        [line] = errors(result)
        assert re.fullmatch(rf"error: no space left on device writing {full}/\S+; \d+ MB free on {full}: free some "
                            r"space and run again", line), line
        assert not (full / "predictions.csv").exists()


def test_merge_on_a_full_disk_is_one_line_and_keeps_the_earlier_merge(tmp_path, tiny_model, tiny_tokenizer):
    """safetensors reports the full disk as its own error type; the line is the same."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                   LoraConfig(r=4, target_modules="all-linear")).save_pretrained(adapter)
    tiny_tokenizer.save_pretrained(adapter)
    manifest = tiny_model / "manifest.json"
    with full_disk(tmp_path / "full", size="2m") as full:
        (full / "filler").unlink()
        first = run_stage(f"merge.py --model-manifest {manifest} --adapter {adapter} --out {full / 'merged'}",
                          tmp_path / "merge.log")
        assert first.returncode == 0, (tmp_path / "merge.log").read_text()[-2000:]
        before = {p.name: p.read_bytes() for p in (full / "merged").iterdir()}
        fill(full / "filler")  # now fill what is left
        again = run_stage(f"merge.py --model-manifest {manifest} --adapter {adapter} --out {full / 'merged'} "
                          "--settings '{\"dtype\": \"float32\"}'", full / "merge.log")
        assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr[-2000:]
        [line] = errors(again)
        assert line.startswith("error: no space left on device ") and f"MB free on {full}" in line, line
        assert {p.name: p.read_bytes() for p in (full / "merged").iterdir()} == before  # the last merge, whole


def test_every_stage_rule_gives_its_script_snakemakes_terminal_as_fd_3():
    for rule in sorted((REPO / "rules").glob("*.smk")):
        text = rule.read_text()
        for command in re.findall(r'shell:\s*\n((?:\s*".*"\n)+)', text):
            if "> {log:q} 2>&1" in command:
                assert "3>&2 > {log:q} 2>&1" in command, rule.name
    assert "SNAKETUNE_ERROR_FD" in (REPO / "rules" / "common.smk").read_text()

