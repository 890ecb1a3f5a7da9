"""Dataset readers: each maps a row of a known layout to the canonical record.

The canonical record is ``{"id", "system", "messages": [{"role", "content"}]}``. Every row keeps the line it
came from, so an error names ``file:line: field``; a row is never dropped without saying so.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snaketune.errors import UserError, located

ROLES = ("system", "user", "assistant")


@dataclass
class Record:
    """One conversation in canonical form, with where it came from."""

    id: str
    system: str | None
    messages: list[dict[str, str]]
    line: int

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "system": self.system, "messages": self.messages}


def iter_json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, row)`` from a JSONL file or a JSON array file, whichever ``path`` holds."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise located(path, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if text.lstrip().startswith("["):
        yield from _iter_json_array(path, text)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise located(path, number, f"not valid JSON: {exc.msg} (column {exc.colno})") from None


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Walk a top-level JSON array element by element, so each element knows its starting line."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise located(path, exc.lineno, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
        yield line, row
        pos = skip(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        raise located(path, line, "not valid JSON: expected ',' or ']' between array elements")


def _text_field(path: Path, line: int, row: dict, key: str, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise located(path, line, f'field "{key}" missing')
        return None
    if not isinstance(row[key], str):
        raise located(path, line, f'field "{key}" must be a string, got {type(row[key]).__name__}')
    return row[key]


def _row_id(path: Path, line: int, row: dict) -> str:
    return str(row["id"]) if row.get("id") is not None else f"{path.stem}-{line}"


def read_messages(path: Path, line: int, row: dict) -> Record:
    """OpenAI layout: ``{"messages": [{"role": ..., "content": ...}, ...]}``."""
    if "messages" not in row:
        raise located(path, line, 'field "messages" missing')
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise located(path, line, 'field "messages" must be a non-empty list')
    system, turns = None, []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise located(path, line, f'field "{where}" must be an object with "role" and "content"')
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise located(path, line, f'field "{where}.{key}" missing or not a string')
        role = message["role"]
        if role not in ROLES:
            raise located(path, line, f'field "{where}.role": `{role}` is not one of {", ".join(ROLES)}')
        if role == "system":
            if index != 0:
                raise located(path, line, f'field "{where}": a system message may only come first')
            system = message["content"]
        else:
            turns.append({"role": role, "content": message["content"]})
    return Record(_row_id(path, line, row), system, turns, line)


def read_alpaca(path: Path, line: int, row: dict) -> Record:
    """Alpaca layout: ``instruction``, optional ``input``, ``output``, optional ``system``."""
    instruction = _text_field(path, line, row, "instruction")
    extra = _text_field(path, line, row, "input", required=False)
    output = _text_field(path, line, row, "output")
    prompt = f"{instruction}\n{extra}" if extra else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Record(_row_id(path, line, row), _text_field(path, line, row, "system", required=False), messages, line)


READERS = {"messages": read_messages, "alpaca": read_alpaca}


def check_turns(path: Path, record: Record) -> None:
    """A conversation alternates user/assistant and ends with the assistant turn that is trained on."""
    roles = [m["role"] for m in record.messages]
    if not roles or roles[-1] != "assistant":
        raise located(path, record.line, 'field "messages": the last message must have role "assistant"')
    for index, role in enumerate(roles):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise located(path, record.line, f'field "messages": turn {index} is "{role}", expected "{expected}"')


def read_records(path: str | Path, layout: str, default_system: str | None = None) -> list[Record]:
    """Read every row of ``path`` in ``layout`` into canonical records; the first bad row raises."""
    path = Path(path)
    reader = READERS[layout]
    records, seen = [], {}
    for line, row in iter_json_rows(path):
        if not isinstance(row, dict):
            raise located(path, line, f"row must be a JSON object, got {type(row).__name__}")
        record = reader(path, line, row)
        check_turns(path, record)
        if record.id in seen:
            raise located(path, line, f'field "id": `{record.id}` already used on line {seen[record.id]}')
        seen[record.id] = line
        if record.system is None:
            record.system = default_system
        records.append(record)
    if not records:
        raise UserError(f"{path}: no rows")
    return records
