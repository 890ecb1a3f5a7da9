"""Readers map every layout people already have to the canonical record, and name file, line and field on bad rows."""

import json

import pandas as pd
import pytest

from snaketune.errors import UserError
from snaketune.formats import from_dataset_info, read_records
from snaketune.settings import ReadSettings


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat(user="hi", answer="hello", **extra):
    return json.dumps({**extra, "messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": answer}]}, ensure_ascii=False)


def read(path, layout, **settings):
    return read_records(ReadSettings(path=str(path), format=layout, **settings))


def turns(record):
    return [(m["role"], m["content"]) for m in record.messages]


# -- one test per layout: rows, roles, system ------------------------------------------------------------------
def test_messages_rows_become_canonical_records_with_their_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        chat(),
        "",
        json.dumps({"id": "x", "messages": [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                            {"role": "user", "content": "q2"},
                                            {"role": "assistant", "content": "a2"}]}),
    ])
    first, second = read(path, "messages", system="default").records
    assert first.as_dict() == {"id": "d-1", "system": "default",
                               "messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}
    assert (second.id, second.system, second.line) == ("x", "be brief", 3)
    assert turns(second) == [("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")]


def test_messages_as_one_json_array_file_as_xtuner_writes_it(tmp_path):
    rows = [json.loads(chat("你好", "您好")), json.loads(chat("two", "2"))]
    path = tmp_path / "x.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    first, second = read(path, "messages").records
    assert turns(first) == [("user", "你好"), ("assistant", "您好")] and (first.line, second.line) == (2, 14)


def test_alpaca_with_input_system_and_history(tmp_path):
    rows = [{"instruction": "翻译", "input": "hello", "output": "你好", "system": "translator",
             "history": [["先说一句", "好的"]]},
            {"instruction": "说", "output": "好"}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    first, second = read(path, "alpaca").records
    assert turns(first) == [("user", "先说一句"), ("assistant", "好的"), ("user", "翻译\nhello"), ("assistant", "你好")]
    assert first.system == "translator" and turns(second) == [("user", "说"), ("assistant", "好")]
    assert (first.line, second.line) == (2, 14)


def test_sharegpt_maps_every_role(tmp_path):
    row = {"system": "tools on", "conversations": [
        {"from": "human", "value": "weather?"}, {"from": "function_call", "value": '{"name": "weather"}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}]}
    with_system_turn = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                          {"from": "gpt", "value": "a"}]}
    path = write_lines(tmp_path / "s.jsonl", [json.dumps(row), json.dumps(with_system_turn)])
    first, second = read(path, "sharegpt").records
    assert first.system == "tools on"
    assert turns(first) == [("user", "weather?"), ("assistant", '{"name": "weather"}'), ("tool", "sunny"),
                            ("assistant", "It is sunny.")]
    assert second.system == "s" and turns(second) == [("user", "q"), ("assistant", "a")]


def test_firefly_conversation_turns(tmp_path):
    row = {"conversation_id": 1, "category": "Brainstorming", "system": "你是助手",
           "conversation": [{"human": "问1", "assistant": "答1"}, {"human": "问2", "assistant": "答2"}]}
    path = write_lines(tmp_path / "f.jsonl", [json.dumps(row, ensure_ascii=False)])
    (record,) = read(path, "firefly").records
    assert record.system == "你是助手"
    assert turns(record) == [("user", "问1"), ("assistant", "答1"), ("user", "问2"), ("assistant", "答2")]


def test_pretraining_text_rows(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps({"text": "天气很好。"}), json.dumps({"text": "Second."})])
    first, second = read(path, "text").records
    assert (first.text, first.messages, second.text) == ("天气很好。", [], "Second.")


def test_column_mapping_of_a_text_matching_csv(tmp_path):
    path = tmp_path / "m.csv"
    table = {"sentence1": ["我想还款", "今天天气"], "sentence2": ["怎么还钱", "明天下雨"], "label": [1, 0]}
    pd.DataFrame(table).to_csv(path, index=False)
    first, second = read(path, "columns", prompt="判断两句话意思是否相同：\n{sentence1}\n{sentence2}",
                         response="{label}", system="你是文本匹配助手").records
    assert turns(first) == [("user", "判断两句话意思是否相同：\n我想还款\n怎么还钱"), ("assistant", "1")]
    assert (first.line, second.line, first.system) == (2, 3, "你是文本匹配助手")


@pytest.mark.parametrize("suffix", ["csv", "tsv", "parquet"])
def test_tabular_files_in_alpaca_layout_with_renamed_columns(tmp_path, suffix):
    frame = pd.DataFrame({"question": ["q1", "q2"], "answer": ["a1", "a2"], "context": ["", "ctx"]})
    path = tmp_path / f"t.{suffix}"
    if suffix == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False, sep="\t" if suffix == "tsv" else ",")
    first, second = read(path, "alpaca", columns={"instruction": "question", "output": "answer",
                                                  "input": "context"}).records
    assert turns(first) == [("user", "q1"), ("assistant", "a1")]
    assert turns(second) == [("user", "q2\nctx"), ("assistant", "a2")]


def test_a_csv_cell_with_newlines_keeps_the_line_it_starts_on(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text('instruction,output\n"two\nlines",a\n"one",\n', encoding="utf-8")
    result = read(path, "alpaca", max_bad_rows=1)
    assert turns(result.records[0]) == [("user", "two\nlines"), ("assistant", "a")]
    assert result.bad_rows == [f'{path}:4: field "output" is empty']


def test_llama_factory_dataset_info_with_columns_and_tags(tmp_path):
    (tmp_path / "chat.json").write_text(json.dumps([
        {"msgs": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "sys": "s"}]))
    (tmp_path / "qa.json").write_text(json.dumps([{"q": "question", "a": "answer"}]))
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({
        "qa": {"file_name": "qa.json", "columns": {"prompt": "q", "response": "a"}},
        "chat": {"file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "msgs", "system": "sys"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                          "assistant_tag": "assistant"}},
    }, indent=2))
    qa = from_dataset_info(info, "qa")
    assert qa == {"path": str(tmp_path / "qa.json"), "format": "alpaca",
                  "columns": {"instruction": "q", "output": "a"}, "tags": {}, "ranking": False}
    (record,) = read_records(ReadSettings(**qa)).records
    assert turns(record) == [("user", "question"), ("assistant", "answer")]
    (record,) = read_records(ReadSettings(**from_dataset_info(info, "chat"))).records
    assert record.system == "s" and turns(record) == [("user", "q"), ("assistant", "a")]


# -- hygiene --------------------------------------------------------------------------------------------------
def test_exact_duplicates_are_removed_and_counted(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [chat("a", "1"), chat("b", "2"), chat("a", "1"), chat("a", "1")])
    result = read(path, "messages")
    assert [r.line for r in result.records] == [1, 2] and result.duplicates == 2 and result.rows_read == 4
    assert len(read(path, "messages", deduplicate=False).records) == 4


def test_bad_rows_up_to_max_bad_rows_are_skipped_and_listed(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [chat(), "{oops", chat("q", "  "), chat("x", "y")])
    result = read(path, "messages", max_bad_rows=2)
    assert [r.line for r in result.records] == [1, 4]
    assert result.bad_rows == [f"{path}:2: not valid JSON: Expecting property name enclosed in double quotes "
                               "(column 2)", f'{path}:3: turn 1 ("assistant") is empty']


def test_more_bad_rows_than_allowed_stops_with_the_first_few(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [chat(), "{oops", chat("q", "  ")])
    with pytest.raises(UserError) as caught:
        read(path, "messages", max_bad_rows=1)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith(f"{path}:2: not valid JSON") and lines[1].startswith(f"{path}:3: turn 1")
    assert "2 bad row(s) so far, more than max_bad_rows=1" in lines[2]


# -- malformed input: one line naming file, line and field ----------------------------------------------------
@pytest.mark.parametrize("layout, row, message", [
    ("messages", {"conversation": []}, 'field "messages" missing'),
    ("messages", {"messages": [{"role": "user", "content": "q"}]}, "the last turn must be the assistant's"),
    ("messages", {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
     'field "messages[0].role": `robot` is not one of'),
    ("messages", {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
     'field "messages[0].content" missing or not a string'),
    ("messages", {"messages": [{"role": "assistant", "content": "a"}]}, 'turn 0 is "assistant", expected "user"'),
    ("messages", {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
     'turn 0 ("user") is empty'),
    ("alpaca", {"instruction": "a"}, 'field "output" missing'),
    ("alpaca", {"instruction": 3, "output": "b"}, 'field "instruction" must be a string, got int'),
    ("alpaca", {"instruction": "a", "output": "b", "history": [["only one"]]}, 'field "history" must be a list'),
    ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, 'field "conversations[0].from": `bot`'),
    ("sharegpt", {"conversations": "text"}, 'field "conversations" must be a non-empty list'),
    ("firefly", {"conversation": [{"human": "q"}]}, 'field "conversation[0].assistant" missing'),
    ("text", {"text": ["not", "text"]}, 'field "text" must be a string, got list'),
    ("messages", "a string", "row must be a JSON object, got str"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, layout, row, message):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(row)])
    with pytest.raises(UserError) as caught:
        read(path, layout)
    assert str(caught.value).startswith(f"{path}:1: ") and message in str(caught.value)


def test_a_broken_json_array_names_the_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(UserError, match=r"a\.json:3: not valid JSON: Expecting ',' delimiter"):
        read(path, "alpaca")


def test_a_csv_column_that_does_not_exist(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("sentence1,sentence2,label\na,b,1\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        read(path, "columns", prompt="{sentence1} {Sentence3}", response="{label}")
    assert str(caught.value) == f'{path}:1: column "Sentence3" does not exist (columns: sentence1, sentence2, label)'
    with pytest.raises(UserError, match=r'column "Label" does not exist \(did you mean `label`\?\)'):
        read(path, "columns", prompt="{sentence1}", response="{Label}")


def test_a_dataset_name_absent_from_dataset_info(tmp_path):
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"alpaca_zh": {"file_name": "a.json"}, "identity": {"file_name": "i.json"}}))
    with pytest.raises(UserError) as caught:
        from_dataset_info(info, "alpaca_en")
    assert str(caught.value) == f'{info}: dataset "alpaca_en" not found (it has: alpaca_zh, identity)'


def test_duplicate_ids_are_an_error_not_a_silent_overwrite(tmp_path):
    row = json.loads(chat())
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({**row, "id": 7}), json.dumps({**row, "id": 7})])
    with pytest.raises(UserError, match=rf"d\.jsonl:2: field \"id\": `7` already used on {path}:1"):
        read(path, "messages")


def test_a_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl: file not found"):
        read(tmp_path / "nope.jsonl", "messages")


def test_rows_of_a_one_line_json_array_get_distinct_ids(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps([{"instruction": f"q{i}", "output": "a"} for i in range(3)]), encoding="utf-8")
    assert [r.id for r in read(path, "alpaca").records] == ["one-1", "one-2", "one-3"]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path, separator):
    """JSON allows U+2028/U+2029/U+0085 unescaped (json.dumps(ensure_ascii=False) writes them); only \\n ends a row."""
    path = tmp_path / "d.jsonl"
    path.write_text("\r\n".join([chat(f"one{separator}two"), chat(), '{"messages": [}', chat("last")]) + "\r\n",
                    encoding="utf-8")
    result = read(path, "messages", max_bad_rows=1)
    assert [(r.line, turns(r)[0][1]) for r in result.records] == [(1, f"one{separator}two"), (2, "hi"), (4, "last")]
    assert result.rows_read == 4 and len(result.bad_rows) == 1 and result.bad_rows[0].startswith(f"{path}:3: ")


def test_a_file_of_only_bad_rows_keeps_their_reasons(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"messages": []}', '{"text": 1}', "not json"])
    with pytest.raises(UserError) as caught:
        read(path, "messages", max_bad_rows=10)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{path}: all 3 rows are bad (first reasons below)"
    assert [line.split(": ")[0] for line in lines[1:]] == [f"{path}:1", f"{path}:2", f"{path}:3"]


@pytest.mark.parametrize("encoding", ["gb18030", "gbk", "auto"])
def test_a_gbk_csv_reads_with_its_encoding_or_auto(tmp_path, encoding):
    data = tmp_path / "excel.csv"
    data.write_bytes("句子1,句子2,标签\r\n今天天气很好,今天天气不错,相同\r\n我喜欢猫,他讨厌狗,不同\r\n".encode("gbk"))
    records = read(data, "columns", prompt="{句子1}\n{句子2}", response="{标签}", encoding=encoding).records
    assert [turns(r) for r in records] == [[("user", "今天天气很好\n今天天气不错"), ("assistant", "相同")],
                                           [("user", "我喜欢猫\n他讨厌狗"), ("assistant", "不同")]]
    assert [r.line for r in records] == [2, 3]


def test_auto_takes_utf8_first_and_names_a_file_no_encoding_reads(tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [chat("你好", "您好")])
    assert turns(read(data, "messages", encoding="auto").records[0]) == [("user", "你好"), ("assistant", "您好")]
    (tmp_path / "binary.jsonl").write_bytes(b'{"a": 1}\n\x80\xff\xfe\x00\xd8')
    with pytest.raises(UserError, match=r"binary.jsonl:2: not UTF-8 text .*no common encoding reads it whole"):
        read(tmp_path / "binary.jsonl", "messages", encoding="auto")
