"""Readers map each layout to the canonical record and name file, line and field on bad rows."""

import json

import pytest

from snaketune.errors import UserError
from snaketune.formats import read_records


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat(user="hi", answer="hello"):
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})


def test_messages_rows_become_canonical_records_with_their_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        chat(),
        "",
        json.dumps({"id": "x", "messages": [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
    ])
    first, second = read_records(path, "messages", default_system="default")
    assert first.as_dict() == {"id": "d-1", "system": "default",
                               "messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}
    assert (second.id, second.system, second.line) == ("x", "be brief", 3)


def test_a_row_that_is_not_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [chat(), chat(), '{"messages": [oops'])
    with pytest.raises(UserError, match=r"d\.jsonl:3: not valid JSON"):
        read_records(path, "messages")


def test_a_row_missing_messages_names_the_field(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [chat(), json.dumps({"conversation": []})])
    with pytest.raises(UserError, match=r'd\.jsonl:2: field "messages" missing'):
        read_records(path, "messages")


@pytest.mark.parametrize("messages, field", [
    ([{"role": "user", "content": "q"}], 'the last message must have role "assistant"'),
    ([{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}], "messages[0].role"),
    ([{"role": "user"}, {"role": "assistant", "content": "a"}], "messages[0].content"),
    ([{"role": "assistant", "content": "a"}], 'turn 0 is "assistant", expected "user"'),
])
def test_malformed_conversations_are_rejected_with_the_field(tmp_path, messages, field):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": messages})])
    with pytest.raises(UserError) as caught:
        read_records(path, "messages")
    assert str(caught.value).startswith(f"{path}:1: ") and field in str(caught.value)


def test_json_array_rows_know_their_starting_line(tmp_path):
    rows = [{"instruction": "翻译", "input": "hello", "output": "你好"}, {"instruction": "说", "output": "好"}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    first, second = read_records(path, "alpaca")
    assert first.messages == [{"role": "user", "content": "翻译\nhello"}, {"role": "assistant", "content": "你好"}]
    assert second.messages[0]["content"] == "说"
    assert (first.line, second.line) == (2, 7)


def test_alpaca_row_without_output_names_line_of_the_array_element(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c"}\n]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r'a\.json:3: field "output" missing'):
        read_records(path, "alpaca")


def test_duplicate_ids_are_an_error_not_a_silent_overwrite(tmp_path):
    row = json.loads(chat())
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({**row, "id": 7}), json.dumps({**row, "id": 7})])
    with pytest.raises(UserError, match=r"d\.jsonl:2: field \"id\": `7` already used on line 1"):
        read_records(path, "messages")


def test_bundled_samples_read_cleanly():
    from conftest import REPO

    assert len(read_records(REPO / "data" / "identity.jsonl", "messages")) == 234
    assert len(read_records(REPO / "data" / "text_matching.json", "alpaca")) == 80
