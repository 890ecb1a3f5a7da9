"""Atomic outputs and checkpoint bookkeeping: a killed job never leaves something that looks finished."""

import pytest

from snaketune.io import atomic_dir, atomic_file
from snaketune.train import complete_checkpoints, prepare_checkpoints


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
    (path / "adapter_model.safetensors").write_bytes(b"w")
    if complete:
        (path / "trainer_state.json").write_text("{}")


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
