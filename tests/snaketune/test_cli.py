"""cli.py: the stage scripts' exit-code contract (a user mistake is one line and exit 1, a bug a traceback, a full
disk one line naming the file) and their shared arguments."""

import argparse
import errno
import os

import pytest

from snaketune.cli import main_guard, make_settings, model_source, model_source_arguments
from snaketune.errors import UserError


def test_a_user_mistake_is_one_error_line_and_exit_1(capsys):
    def body():
        raise UserError("data/x.jsonl:3: messages: missing")

    assert main_guard(body) == 1
    assert capsys.readouterr().err.strip() == "error: data/x.jsonl:3: messages: missing"
    assert main_guard(lambda: None) == 0


def test_a_bug_is_not_hidden(capsys):
    def body():
        raise KeyError("bug")

    with pytest.raises(KeyError):
        main_guard(body)


def test_a_full_disk_is_one_line_naming_the_file_and_also_reaches_snakemakes_terminal(tmp_path, capsys,
                                                                                       monkeypatch):
    read, write = os.pipe()
    monkeypatch.setenv("SNAKETUNE_ERROR_FD", str(write))

    def body():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.parquet"))

    assert main_guard(body) == 1
    os.close(write)
    terminal = os.read(read, 4096).decode()
    os.close(read)
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: no space left on device writing {tmp_path / 'out.parquet'}; ")
    assert f"MB free on {tmp_path}: free some space and run again" in line
    assert terminal.strip() == line


def test_settings_with_an_unknown_key_name_the_key():
    from dataclasses import dataclass

    @dataclass
    class Settings:
        steps: int
        rate: float = 1.0

    assert make_settings(Settings, {"steps": 1, "rate": 2.0}) == Settings(1, 2.0)
    with pytest.raises(UserError, match=r"^--settings: unknown key `rat` \(Settings takes: steps, rate\)$"):
        make_settings(Settings, {"steps": 1, "rat": 2.0})
    with pytest.raises(UserError, match=r"^--settings: `steps` is required \(Settings takes: steps, rate\)$"):
        make_settings(Settings, {})


def test_model_arguments_name_what_is_wrong(tmp_path):
    parser = argparse.ArgumentParser()
    model_source_arguments(parser)
    with pytest.raises(UserError, match="is not a model folder"):
        model_source(parser.parse_args(["--model", str(tmp_path)]))
    (tmp_path / "config.json").write_text("{}")
    assert model_source(parser.parse_args(["--model", str(tmp_path)])) == (tmp_path, False, None)
    with pytest.raises(UserError, match="--adapter needs --model-manifest"):
        model_source(parser.parse_args(["--model", str(tmp_path), "--adapter", "a"]))
