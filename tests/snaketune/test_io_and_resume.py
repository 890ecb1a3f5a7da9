"""Atomic outputs and checkpoint bookkeeping: a killed job never leaves something that looks finished."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from snaketune.io import atomic_dir, atomic_file, file_problem, safetensors_problem, write_json
from snaketune.train.checkpoints import complete_checkpoints, prepare_checkpoints


def test_atomic_file_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_the_folder_only_on_success(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as staging:
        (staging / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as staging:
            (staging / "b").write_text("2")
            raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in target.iterdir()] == ["a"]


def make_checkpoint(folder, step, complete=True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.ones(4, 4)}, path / "adapter_model.safetensors")
    torch.save({"state": {}}, path / "optimizer.pt")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_half_written_checkpoint_is_never_picked_up(tmp_path):
    prepare_checkpoints(tmp_path / "ckpt", "settings-a")
    make_checkpoint(tmp_path / "ckpt", 50)
    make_checkpoint(tmp_path / "ckpt", 100)
    make_checkpoint(tmp_path / "ckpt", 150, complete=False)
    assert [p.name for p in complete_checkpoints(tmp_path / "ckpt")] == ["checkpoint-50", "checkpoint-100"]
    assert prepare_checkpoints(tmp_path / "ckpt", "settings-a").name == "checkpoint-100"


def test_checkpoints_of_other_settings_are_discarded(tmp_path):
    prepare_checkpoints(tmp_path / "ckpt", "settings-a")
    make_checkpoint(tmp_path / "ckpt", 50)
    assert prepare_checkpoints(tmp_path / "ckpt", "settings-b") is None
    assert complete_checkpoints(tmp_path / "ckpt") == []


@pytest.mark.parametrize("damage, file", [
    ("truncate", "adapter_model.safetensors"), ("truncate", "optimizer.pt"), ("truncate", "trainer_state.json"),
    ("delete", "adapter_model.safetensors"),
])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_and_the_older_one_resumed(tmp_path, capsys, damage,
                                                                                         file):
    folder = tmp_path / "ckpt"
    prepare_checkpoints(folder, "settings-a")
    make_checkpoint(folder, 50)
    newest = make_checkpoint(folder, 100) / file
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    else:
        newest.unlink()
    assert prepare_checkpoints(folder, "settings-a").name == "checkpoint-50"
    warning = capsys.readouterr().err.strip()
    assert warning.startswith(f"warning: skipping checkpoint {folder / 'checkpoint-100'}: ") and "\n" not in warning
    assert not (folder / "checkpoint-100").exists()  # a later save of step 100 starts from an empty folder


def test_whole_files_pass_and_cut_ones_are_named(tmp_path):
    save_file({"a": torch.zeros(3, 5), "b": torch.ones(7)}, tmp_path / "m.safetensors")
    torch.save({"x": torch.ones(2)}, tmp_path / "o.pt")
    write_json(tmp_path / "s.json", {"step": 1})
    assert [file_problem(tmp_path / n) for n in ("m.safetensors", "o.pt", "s.json")] == [None, None, None]
    whole = (tmp_path / "m.safetensors").read_bytes()
    for size in (4, 20, len(whole) - 1):
        (tmp_path / "cut.safetensors").write_bytes(whole[:size])
        assert safetensors_problem(tmp_path / "cut.safetensors")
    (tmp_path / "long.safetensors").write_bytes(whole + b"\0")
    assert "padded" in safetensors_problem(tmp_path / "long.safetensors")


def test_outputs_follow_the_umask_not_the_private_modes_of_temporary_files(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "inside.txt").write_text("y")
        write_json(tmp_path / "r.json", {})
        os.umask(0o077)
        with atomic_file(tmp_path / "private.txt") as tmp:
            tmp.write_text("z")
    finally:
        os.umask(old)
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("f.txt", "d", "d/inside.txt", "r.json",
                                                                          "private.txt")}
    assert modes == {"f.txt": 0o644, "d": 0o755, "d/inside.txt": 0o644, "r.json": 0o644, "private.txt": 0o600}
