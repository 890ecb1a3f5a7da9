"""Dataset build: deterministic splits, stats that count what happened, nothing dropped in silence."""

import json

import pandas as pd
import pytest

from snaketune.dataset import build, split_records, split_sizes
from snaketune.errors import UserError
from snaketune.formats import Record
from snaketune.layout import dataset_outputs
from snaketune.settings import DatasetSettings


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
    rows = [{"messages": [{"role": "user", "content": f"short {i}"}, {"role": "assistant", "content": "ok"}]}
            for i in range(8)]
    rows.append({"messages": [{"role": "user", "content": "long " * 200}, {"role": "assistant", "content": "x"}]})
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"id": i, **r}) for i, r in enumerate(rows)) + "\n")
    settings = DatasetSettings(path=str(data), format="messages", max_seq_length=64, eval_size=0, test_size=1)
    stats = build(settings, tiny_tokenizer, dataset_outputs(tmp_path / "out"))
    total = {k: sum(s[k] for s in stats["splits"].values()) for k in ("rows", "dropped_no_target")}
    assert total == {"rows": 8, "dropped_no_target": 1}  # the long row lost its answer: counted, not hidden
    test = pd.read_parquet(tmp_path / "out" / "test.parquet")
    assert list(test.columns)[:3] == ["id", "line", "input_ids"]
    if len(test):
        assert test["prompt"][0].endswith("<|im_start|>assistant\n") and test["reference"][0] == "ok"
    written = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert written["chat_template_sha256"] and written["chat_template"] == tiny_tokenizer.chat_template
    assert (tmp_path / "out" / "lengths.png").read_bytes().startswith(b"\x89PNG")


def supervised_text(tokenizer, row):
    """The trained tokens of a parquet row, decoded run by run."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


FORMAT_FILES = {
    "alpaca": ("a.json", json.dumps([{"instruction": "问", "input": "题", "output": "答", "history": [["早", "好"]]}],
                                    ensure_ascii=False), {}),
    "sharegpt": ("s.jsonl", json.dumps({"conversations": [{"from": "human", "value": "问"},
                                                           {"from": "gpt", "value": "答"}]}, ensure_ascii=False), {}),
    "messages": ("m.jsonl", json.dumps({"messages": [{"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": "a"}]}), {}),
    "firefly": ("f.jsonl", json.dumps({"conversation": [{"human": "q1", "assistant": "a1"},
                                                        {"human": "q2", "assistant": "a2"}]}), {}),
    "columns": ("c.csv", "s1,s2,label\n我想还款,怎么还钱,相同\n", {"prompt": "{s1}|{s2}", "response": "{label}"}),
    "text": ("t.jsonl", json.dumps({"text": "plain text to continue"}), {}),
}
TRAINED = {
    "alpaca": ["好<|im_end|>\n", "答<|im_end|>\n"],
    "sharegpt": ["答<|im_end|>\n"],
    "messages": ["a<|im_end|>\n"],
    "firefly": ["a1<|im_end|>\n", "a2<|im_end|>\n"],
    "columns": ["相同<|im_end|>\n"],
    "text": ["plain text to continue<|im_end|>"],  # pretraining: every token, and the eos that ends the text
}


@pytest.mark.parametrize("layout", sorted(FORMAT_FILES))
def test_each_format_builds_with_loss_on_exactly_the_assistant_tokens(tmp_path, tiny_tokenizer, layout):
    name, text, extra = FORMAT_FILES[layout]
    data = tmp_path / name
    data.write_text(text + "\n", encoding="utf-8")
    settings = DatasetSettings(path=str(data), format=layout, max_seq_length=128, eval_size=0, test_size=0, **extra)
    stats = build(settings, tiny_tokenizer, dataset_outputs(tmp_path / "out"))
    (row,) = pd.read_parquet(tmp_path / "out" / "train.parquet").to_dict("records")
    assert supervised_text(tiny_tokenizer, row) == TRAINED[layout]
    assert stats["splits"]["train"]["rows"] == 1 and stats["rows_read"] == 1


def test_stats_count_duplicates_bad_rows_truncation_and_lengths(tmp_path, tiny_tokenizer):
    rows = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})
            for i in range(10)]
    rows += [rows[0], "{broken", json.dumps({"messages": [{"role": "user", "content": "x " * 300},
                                                           {"role": "assistant", "content": "late"}]}),
             json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y " * 300}]})]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    settings = DatasetSettings(path=str(data), format="messages", max_seq_length=64, eval_size=0, test_size=0,
                               max_bad_rows=1)
    stats = build(settings, tiny_tokenizer, dataset_outputs(tmp_path / "out"))
    train = stats["splits"]["train"]
    assert (stats["rows_read"], stats["duplicates_removed"], stats["bad_rows_skipped"]) == (14, 1, 1)
    assert stats["bad_rows"] == [f"{data}:12: not valid JSON: Expecting property name enclosed in double quotes "
                                 "(column 2)"]
    # the long prompt lost its answer to truncation (dropped, counted); the long answer was cut (kept, counted)
    assert (train["rows"], train["dropped_no_target"], train["truncated"], train["turns"]) == (11, 1, 1, 22)
    assert train["tokens_per_row_before_truncation"]["max"] > 300 > train["tokens_per_row_before_truncation"]["p50"]
    assert train["max_tokens"] == 64
    assert "warnings" not in stats  # 11 of 14 kept


def test_a_build_that_keeps_less_than_half_its_rows_says_so(tmp_path, tiny_tokenizer, capsys):
    """An XTuner-style set with most rows repeated: the duplicates are dropped, and the terminal and stats say so."""
    rows = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})
            for i in range(5)] * 20
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    settings = DatasetSettings(path=str(data), format="messages", max_seq_length=64, eval_size=0, test_size=0)
    stats = build(settings, tiny_tokenizer, dataset_outputs(tmp_path / "out"))
    message = f"{data}: kept 5 of 100 rows (0 bad, 95 duplicates, 0 without a trainable token): more than half of " \
              "the data is gone"
    assert stats["warnings"] == [message]
    assert f"warning: {message}" in capsys.readouterr().err


def test_a_test_set_puts_every_row_in_its_test_split(tmp_path, tiny_tokenizer):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": "a"}]}) + "\n"
                            for i in range(7)))
    settings = DatasetSettings(path=str(data), format="messages", test_size="all")
    stats = build(settings, tiny_tokenizer, dataset_outputs(tmp_path / "out"))
    assert [stats["splits"][name]["rows"] for name in ("train", "eval", "test")] == [0, 0, 7]


def test_a_mix_takes_each_datasets_train_rows_by_its_weight_and_the_first_ones_test_split(tmp_path, tiny_tokenizer):
    import random

    import pyarrow.parquet as pq

    from snaketune.dataset import MixPart, build_mix, mix_indices

    assert mix_indices(4, 2.0, random.Random(0)) == [0, 1, 2, 3, 0, 1, 2, 3]
    half = mix_indices(10, 0.5, random.Random(0))
    assert len(half) == 5 and half == sorted(set(half)) and half == mix_indices(10, 0.5, random.Random(0))
    assert mix_indices(10, 0, random.Random(0)) == []
    parts = []
    for name, n in (("identity", 20), ("replay", 10)):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"id": f"{name}-{i}", "messages": [
            {"role": "user", "content": f"{name} question {i}"}, {"role": "assistant", "content": "answer"}]}) + "\n"
            for i in range(n)))
        build(DatasetSettings(path=str(data), format="messages", eval_size=2, test_size=4),
              tiny_tokenizer, dataset_outputs(tmp_path / name))
        files = dataset_outputs(tmp_path / name)
        parts.append(MixPart(name, 1.5 if name == "identity" else 0.5, files["train"], files["eval"], files["stats"]))
    out = dataset_outputs(tmp_path / "mix")
    settings = DatasetSettings(path=[], format="messages", mix=[("identity", 1.5), ("replay", 0.5)])
    stats = build_mix(settings, parts, dataset_outputs(tmp_path / "identity")["test"], out)
    train = pq.read_table(out["train"]).column("id").to_pylist()
    assert sum(i.startswith("identity") for i in train) == 14 + 7 and sum(i.startswith("replay") for i in train) == 2
    assert stats["mix"] == {"identity": {"weight": 1.5, "train_rows": 14, "train_rows_taken": 21},
                            "replay": {"weight": 0.5, "train_rows": 4, "train_rows_taken": 2}}
    assert len(pq.read_table(out["eval"])) == 4  # every dataset's eval rows once
    assert pq.read_table(out["test"]).column("id").to_pylist() == pq.read_table(
        dataset_outputs(tmp_path / "identity")["test"]).column("id").to_pylist()
    assert stats["chat_template"] == tiny_tokenizer.chat_template and stats["splits"]["train"]["rows"] == 23
    other = json.loads(parts[1].stats.read_text())
    parts[1].stats.write_text(json.dumps({**other, "chat_template": "{{ messages }}"}))
    with pytest.raises(UserError, match="different chat templates"):
        build_mix(settings, parts, dataset_outputs(tmp_path / "identity")["test"], out)


def varied_rows(n):
    """Conversations of one to three turns, some long enough to be cut or to lose their answer, some repeated."""
    rows = []
    for i in range(n):
        turns = [{"role": role, "content": f"{role} {i} 问题 " * (1 + (i * 7 + t) % 5)}
                 for t in range(1 + i % 3) for role in ("user", "assistant")]
        if i % 17 == 0:
            turns[0]["content"] = "long " * 80  # the answer falls beyond max_seq_length: dropped, counted
        rows.append({"id": f"r{i % 120 if i % 31 == 0 else i}", "messages": turns})
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def test_one_and_two_workers_write_identical_splits(tmp_path, tiny_tokenizer, monkeypatch):
    import snaketune.dataset

    monkeypatch.setattr(snaketune.dataset, "ENCODE_BATCH", 16)  # many batches in flight from 150 rows
    monkeypatch.setattr(snaketune.dataset, "SCAN_PIECE", 1000)  # the first pass in pieces over the workers too
    data = tmp_path / "d.jsonl"
    data.write_text("\ufeff" + odd_rows(150), encoding="utf-8")  # with a byte-order mark
    settings = DatasetSettings(path=str(data), format="messages", max_seq_length=48, eval_size=20, test_size=0.1,
                               max_bad_rows=10)
    stats = {workers: build(settings, tiny_tokenizer, dataset_outputs(tmp_path / str(workers)), workers=workers)
             for workers in (1, 2)}
    # The rows read here, as records (the reader of every other layout), against the workers reading by lines
    monkeypatch.setattr(snaketune.dataset, "jsonl_codec", lambda path, encoding: None)
    stats["here"] = build(settings, tiny_tokenizer, dataset_outputs(tmp_path / "here"), workers=2)
    assert stats[1] == stats[2] == stats["here"] and stats[1]["splits"]["train"]["dropped_no_target"] > 0
    assert stats[1]["bad_rows"][:2] == [
        f"{data}:6: not valid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{data}:41: the last turn must be the assistant's (it is what is trained on)"]
    for name in ("train", "eval", "test", "stats"):
        one, two, here = (dataset_outputs(tmp_path / str(workers))[name].read_bytes() for workers in (1, 2, "here"))
        assert one == two == here, name
    assert pd.read_parquet(dataset_outputs(tmp_path / "2")["train"])["line"].is_monotonic_increasing


def test_the_build_shows_rows_per_second_and_the_time_left(tmp_path, tiny_tokenizer, capsys):
    import re

    data = tmp_path / "d.jsonl"
    data.write_text(odd_rows(150), encoding="utf-8")
    settings = DatasetSettings(path=str(data), format="messages", max_seq_length=48, eval_size=20, test_size=0.1,
                               max_bad_rows=10)
    stats = build(settings, tiny_tokenizer, dataset_outputs(tmp_path / "out"), workers=2)
    kept = sum(split["rows"] + split["dropped_no_target"] for split in stats["splits"].values())
    bar = capsys.readouterr().err.split("\r")[-1]  # the bar's last state: every row tokenized
    assert re.search(rf"tokenize: 100%.*\| {kept}/{kept} \[\d\d:\d\d<00:00, +[\d.]+row/s\]", bar), bar


def test_batch_encoding_gives_the_reference_rows(tiny_tokenizer):
    """``encode_batch`` (arrays, the build's path) against ``encode`` (row by row): ids, labels, counts, prompts,
    for templates that trim content or end turns without a newline, across truncation."""
    from snaketune.templates import TEMPLATES, ChatTemplate

    pieces = ["x", " ", "\n", "好", "<|im_end|>", "a b", "\n\n", "。", "<|im_start|>", "🙂"]
    conversations = []
    for i in range(60):
        turns = [{"role": "system", "content": pieces[i % 10] * (i % 3)}] if i % 4 == 0 else []
        for t in range(1 + i % 3):
            turns += [{"role": "user", "content": "".join(pieces[(i * 3 + t + k) % 10] for k in range(1 + i % 6))},
                      {"role": "assistant", "content": "".join(pieces[(i + t * 5 + k) % 10] for k in range(i % 7))}]
        conversations.append(turns)
    for source in (tiny_tokenizer.chat_template, TEMPLATES["llama3"].replace("{{- bos_token }}", ""),
                   TEMPLATES["baichuan2"]):
        template = ChatTemplate(tiny_tokenizer, source)
        for max_length in (12, 4096):
            batch = template.encode_batch(conversations, max_length)
            for i, (row, conversation) in enumerate(zip(template.encode(conversations, max_length), conversations,
                                                        strict=True)):
                cut = slice(batch.row_starts[i], batch.row_starts[i + 1])
                assert batch.input_ids[cut].tolist() == row.input_ids and batch.labels[cut].tolist() == row.labels
                assert (batch.length[i], batch.n_supervised[i], batch.truncated[i], batch.eos_supervised[i]) == \
                    (row.length, row.n_supervised, row.truncated, row.eos_supervised)
                assert batch.prompts[i] == template.render(conversation[:-1], add_generation_prompt=True)


def test_the_worker_count_is_not_what_a_build_depends_on():
    """num_workers sets the rule's threads, never its params: a new count reruns no finished build."""
    from types import SimpleNamespace

    from snaketune.workflow import dataset_settings, dataset_threads

    configs = [SimpleNamespace(datasets={"d": DatasetSettings(path="d.jsonl", format="messages", num_workers=n)})
               for n in (None, 1, 8)]
    assert len({dataset_settings(cfg, "d") for cfg in configs}) == 1
    assert "num_workers" not in json.loads(dataset_settings(configs[0], "d"))
    assert [dataset_threads(cfg, "d") for cfg in configs[1:]] == [1, 8] and dataset_threads(configs[0], "d") >= 1


# (bos, eos, special tokens) of each builtin template's family, added to the tiny tokenizer (as test_templates does)
FAMILY_TOKENS = {
    "chatml": (None, "<|im_end|>", []), "qwen": (None, "<|im_end|>", []), "qwen2.5": (None, "<|im_end|>", []),
    "internlm2": ("<s>", "<|im_end|>", ["<s>"]),
    "baichuan2": (None, "</s>", ["</s>", "<reserved_106>", "<reserved_107>"]),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>",
               ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
}


def odd_rows(n):
    """``varied_rows`` and what a fast path could get wrong: space around contents (Llama 3 trims it), special
    tokens and CRLF inside them, emoji and combining accents, system prompts, bad and blank lines."""
    lines = varied_rows(n).splitlines()
    for i in range(0, n, 9):
        row = json.loads(lines[i])
        row["messages"][0]["content"] = f"  {row['messages'][0]['content']}<|im_end|>\r\n🙂 e\u0301 "
        row["messages"][-1]["content"] += " \n"
        if i % 2:
            row["messages"].insert(0, {"role": "system", "content": f" system {i}\n"})
        lines[i] = json.dumps(row, ensure_ascii=False)
    lines[5], lines[40] = "{broken", json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    lines.insert(70, "")
    return "\r\n".join(lines) + "\r\n"


@pytest.mark.parametrize("template", ["auto", *sorted(FAMILY_TOKENS)])
def test_the_fast_path_writes_the_per_prefix_builds_bytes(tmp_path, tiny_model, template, monkeypatch):
    """Layouts and token starts from token bytes against rendering every prefix and the tokenizer's offsets: the
    same files, byte for byte, for every builtin template (and the tiny model's own), bad rows counted alike."""
    from transformers import AutoTokenizer

    import snaketune.dataset
    from snaketune.templates import ChatTemplate

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    if template != "auto":
        bos, eos, extra = FAMILY_TOKENS[template]
        tokenizer.add_special_tokens({"additional_special_tokens": extra} if extra else {})
        tokenizer.bos_token, tokenizer.eos_token = bos, eos
    monkeypatch.setattr(snaketune.dataset, "ENCODE_BATCH", 16)
    data = tmp_path / "d.jsonl"
    data.write_text(odd_rows(150), encoding="utf-8")
    settings = DatasetSettings(path=str(data), format="messages", template=template, max_seq_length=48,
                               eval_size=20, test_size=0.1, max_bad_rows=10)
    stats = {}
    for fast in (True, False):
        monkeypatch.setattr(ChatTemplate, "fast", fast)
        stats[fast] = build(settings, tokenizer, dataset_outputs(tmp_path / str(fast)))
    assert stats[True] == stats[False]
    assert stats[True]["bad_rows"][:2] == [
        f"{data}:6: not valid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{data}:41: the last turn must be the assistant's (it is what is trained on)"]
    assert stats[True]["bad_rows"][2].startswith(f'{data}:126: field "id": `r4` already used on {data}:5')
    assert stats[True]["splits"]["train"]["dropped_no_target"] > 0
    for name in ("train", "eval", "test", "stats"):
        fast, reference = (dataset_outputs(tmp_path / str(fast))[name].read_bytes() for fast in (True, False))
        assert fast == reference, name
