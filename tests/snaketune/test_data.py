"""Dataset build: deterministic splits, stats that count what happened, nothing dropped in silence."""

import json

import pandas as pd
import pytest

from snaketune.data import DatasetSettings, build, split_records, split_sizes
from snaketune.errors import UserError
from snaketune.formats import Record


def records(n):
    return [Record(f"r{i}", None, [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}], i)
            for i in range(1, n + 1)]


def test_split_sizes_take_fractions_or_counts():
    assert split_sizes(200, 0.05, 0.1) == (10, 20)
    assert split_sizes(200, 3, 7) == (3, 7)


def test_split_is_deterministic_disjoint_and_complete():
    settings = DatasetSettings(path="d.jsonl", format="messages", eval_size=0.1, test_size=0.2, seed=3)
    first, second = split_records(records(50), settings), split_records(records(50), settings)
    ids = {name: [r.id for r in rows] for name, rows in first.items()}
    assert ids == {name: [r.id for r in rows] for name, rows in second.items()}
    assert [len(ids[s]) for s in ("train", "eval", "test")] == [35, 5, 10]
    assert sorted(sum(ids.values(), []), key=lambda x: int(x[1:])) == [f"r{i}" for i in range(1, 51)]
    other = split_records(records(50), DatasetSettings(path="d", format="messages", test_size=0.2, seed=4))
    assert [r.id for r in other["test"]] != ids["test"]


def test_splits_that_leave_no_training_rows_are_refused():
    with pytest.raises(UserError, match="leave none for training"):
        split_records(records(4), DatasetSettings(path="d.jsonl", format="messages", eval_size=2, test_size=2))


def test_build_writes_parquet_and_stats_and_reports_truncation(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"}]}] * 8
    rows.append({"messages": [{"role": "user", "content": "long " * 200}, {"role": "assistant", "content": "x"}]})
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"id": i, **r}) for i, r in enumerate(rows)) + "\n")
    settings = DatasetSettings(path=str(data), format="messages", max_seq_length=64, eval_size=0, test_size=1)
    stats = build(settings, tiny_tokenizer, tmp_path / "out")
    total = {k: sum(s[k] for s in stats["splits"].values()) for k in ("rows", "dropped_no_target")}
    assert total == {"rows": 8, "dropped_no_target": 1}  # the long row lost its answer: counted, not hidden
    test = pd.read_parquet(tmp_path / "out" / "test.parquet")
    assert list(test.columns)[:3] == ["id", "line", "input_ids"]
    if len(test):
        assert test["prompt"][0].endswith("<|im_start|>assistant\n") and test["reference"][0] == "ok"
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["chat_template_sha256"]
