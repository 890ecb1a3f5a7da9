"""Dataset readers: files (JSON, JSONL, CSV, TSV, parquet) of every common layout -> canonical records.

The canonical record is ``{"id", "system", "messages": [{"role", "content"}]}`` for conversations (roles user,
assistant, tool), or ``{"id", "text"}`` for pretraining text. Every row keeps the file and line it came from, so
an error names ``file:line: field``. A bad row is either the end of the build (more than ``max_bad_rows`` of
them) or skipped and counted; it is never dropped without saying so.

Layouts (``format``), each with the field names it reads by default; ``columns`` renames any of them:

- alpaca: instruction, input, output, system, history (``[[question, answer], ...]``)
- sharegpt: conversations (``from``/``value`` turns; human, gpt, system, function_call, observation), system
- messages: messages (OpenAI ``role``/``content``), the sharegpt reader with OpenAI's tags
- firefly: conversation (``[{human, assistant}, ...]``), system
- text: text (pretraining: every token is trained on)
- columns: any table; ``prompt`` and ``response`` are templates over its columns (``"{sentence1}\\n{sentence2}"``)
- preference: prompt, chosen, rejected (trl's preference datasets): the prompt a string or a list of messages, each
  answer a string or a one-message list

Preference pairs (``ranking: true``, LLaMA-Factory's name, or ``format: preference``): alpaca rows carry ``chosen``
and ``rejected`` answers instead of ``output``; sharegpt/messages rows end on a user turn and carry ``chosen`` and
``rejected`` turns. The record's last assistant turn is the chosen answer and ``rejected`` holds the other.

Images (sharegpt and messages): a row's ``images`` list (LLaMA-Factory) or ``image`` path (LLaVA's JSON), or
OpenAI content parts (``{"type": "image_url", "image_url": {"url": ...}}``, a path or a data URL) in a turn. The
text keeps ``<image>`` where each goes (with none, they lead the first user turn); paths resolve against the
dataset file's folder. An image that is missing, unreadable or does not decode makes its row bad.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import math
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snaketune.errors import UserError, located
from snaketune.settings import FORMATS, ReadSettings
from snaketune.vision import ImageProblem, content_parts, place_images

ROLES = ("system", "user", "assistant", "tool")
PROMPT_ROLES = ("user", "tool")  # turns the model reads; the assistant turns after them are trained on
TABULAR = (".csv", ".tsv", ".parquet")  # cells of these may be numbers where text is meant

DEFAULT_COLUMNS = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": "system",
               "history": "history"},
    "sharegpt": {"conversations": "conversations", "system": "system", "images": "images"},
    "messages": {"conversations": "messages", "system": "system", "images": "images"},
    "firefly": {"conversation": "conversation", "system": "system"},
    "text": {"text": "text"},
    "columns": {},
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "system": "system"},
}
PAIR_COLUMNS = {"chosen": "chosen", "rejected": "rejected"}  # added to a layout's columns under ranking
DEFAULT_TAGS = {
    "sharegpt": {"role": "from", "content": "value", "user": "human", "assistant": "gpt", "system": "system",
                 "function_call": "function_call", "observation": "observation"},
    "messages": {"role": "role", "content": "content", "user": "user", "assistant": "assistant",
                 "system": "system", "function_call": "function_call", "observation": "tool"},
}


@dataclass
class Record:
    """One conversation (or pretraining text) in canonical form, with where it came from."""

    id: str
    system: str | None
    messages: list[dict[str, str]]
    line: int
    path: str = ""
    text: str | None = None
    source: dict[str, Any] | None = None  # the row as the file had it (its original columns)
    rejected: str | None = None  # preference pairs: the rejected answer (the last assistant turn is the chosen one)
    images: list[str] = field(default_factory=list)  # paths or data URLs, one per <image> in the messages
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each, as decoded

    def as_dict(self) -> dict[str, Any]:
        if self.text is not None:
            return {"id": self.id, "text": self.text}
        images = {"images": self.images} if self.images else {}
        return {"id": self.id, "system": self.system, "messages": self.messages, **images}

    def content_key(self) -> str:
        """Identity of the content, for exact-duplicate removal (ids and lines left out)."""
        body = json.dumps([self.system, self.messages, self.text] + ([self.rejected] if self.rejected else [])
                          + ([self.images] if self.images else []), ensure_ascii=False, sort_keys=True)
        return hashlib.sha1(body.encode("utf-8")).hexdigest()


@dataclass
class ReadResult:
    records: list[Record]
    bad_rows: list[str]  # "file:line: reason", in file order
    duplicates: int
    rows_read: int


class BadRow(UserError):
    """A problem with one row: the build skips it when ``max_bad_rows`` allows, otherwise stops."""


def bad(path: Path, line: int | None, message: str) -> BadRow:
    return BadRow(str(located(path, line, message)))


# -- files -> (line, row dict) ---------------------------------------------------------------------------------
GUESSED_ENCODINGS = ("utf-8", "gb18030", "big5", "shift_jis", "utf-16")  # what a file that fails may be in


def decodes(path: Path, encoding: str) -> bool:
    """Whether the whole file decodes in ``encoding`` (read in chunks: a large file is never held)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeError:  # UTF-16 without a byte-order mark raises the parent class
        return False
    return True


def text_encoding(path: Path, wanted: str) -> str:
    """The codec to open a text data file with: ``wanted`` (utf-8 reads a byte-order mark too), or for ``auto``
    UTF-8 when the whole file decodes so, else GB18030 (what Excel on Chinese Windows saves CSV as)."""
    if wanted == "auto":
        for candidate in ("utf-8-sig", "gb18030"):
            if decodes(path, candidate):
                return candidate
        raise decoding_error(path, "utf-8")
    return "utf-8-sig" if codecs.lookup(wanted).name == "utf-8" else wanted


def decoding_error(path: Path, encoding: str) -> UserError:
    """One line for a file that does not decode: where (line and byte), and which encoding does read it."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8-sig" if encoding == "utf-8-sig" else encoding)
        where, line = "", None
    except UnicodeDecodeError as exc:
        where, line = f" ({exc.reason} at byte {exc.start})", raw.count(b"\n", 0, exc.start) + 1
    name = "UTF-8" if codecs.lookup(encoding).name in ("utf-8", "utf-8-sig") else encoding
    other = next((candidate for candidate in GUESSED_ENCODINGS if candidate != name.lower()
                  and decodes(path, candidate)), None)
    hint = (f"; it reads as {other}: set the dataset's `encoding: {other}` (or `encoding: auto`)" if other
            else "; no common encoding reads it whole (utf-8, gb18030, big5, shift_jis, utf-16): is it text?")
    return located(path, line, f"not {name} text{where}{hint}")


def iter_file_rows(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, Any]]:
    """Yield ``(line, row)`` from any supported file; JSONL rows that are not JSON come back as BadRow. Text files
    are read in ``encoding`` (see ``text_encoding``); one that does not decode is a one-line error."""
    if not path.exists():
        raise UserError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _iter_parquet_rows(path)
        return
    codec = text_encoding(path, encoding)
    try:
        if suffix in (".csv", ".tsv"):
            yield from _iter_table_rows(path, "\t" if suffix == ".tsv" else ",", codec)
        else:
            yield from iter_json_rows(path, codec)
    except UnicodeDecodeError:
        raise decoding_error(path, codec) from None


def _read_text(path: Path, encoding: str = "utf-8-sig") -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError:
        raise decoding_error(path, encoding) from None


def iter_json_rows(path: Path, encoding: str = "utf-8-sig") -> Iterator[tuple[int, Any]]:
    """Yield ``(line, row)`` from a JSONL file or a JSON array file, whichever ``path`` holds.

    JSONL is read a line at a time, so a file of millions of rows never sits in memory whole.
    """
    if is_json_array(path):
        yield from _iter_json_array(path, _read_text(path, encoding))
        return
    # Lines end at \n only: JSON strings may hold U+2028, U+2029 and U+0085 unescaped, and text-mode line
    # splitting would break a row there. A \r before the \n (CRLF) is whitespace to the JSON parser.
    with path.open(encoding=encoding, newline="\n") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, bad(path, number, f"not valid JSON: {exc.msg} (column {exc.colno})")
        except UnicodeDecodeError:
            raise decoding_error(path, encoding) from None  # the line and byte, and an encoding that reads it


def is_json_array(path: Path) -> bool:
    """Whether a JSON file holds one array (else it is JSONL: a row a line)."""
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Walk a top-level JSON array element by element, so each element knows its starting line."""
    decoder = json.JSONDecoder()
    counted_to, line = 0, 1  # lines are counted incrementally: counting from the start each time is quadratic

    def line_at(p: int) -> int:
        nonlocal counted_to, line
        line += text.count("\n", counted_to, p)
        counted_to = p
        return line

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(text.index("[") + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        start_line = line_at(pos)
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:  # the array cannot be walked past this point: the whole file fails
            raise located(path, exc.lineno, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
        yield start_line, row
        pos = skip(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        raise located(path, line_at(pos), "not valid JSON: expected ',' or ']' between array elements")


def _iter_table_rows(path: Path, delimiter: str, encoding: str = "utf-8-sig") -> Iterator[tuple[int, dict]]:
    with path.open(encoding=encoding, newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise located(path, 1, f"not a valid {path.suffix[1:].upper()} header: {exc}") from None
        start = reader.line_num + 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise located(path, start, f"not valid {path.suffix[1:].upper()}: {exc}") from None
            if cells:
                if len(cells) != len(header):
                    yield start, bad(path, start, f"{len(cells)} cells, the header has {len(header)}")
                else:
                    yield start, dict(zip(header, cells, strict=True))
            start = reader.line_num + 1


def _iter_parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise located(path, None, f"not a readable parquet file ({exc})") from None
    for number, row in enumerate(table.to_pylist(), start=1):  # "line" of a parquet file: its row number
        yield number, {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def header_of(path: Path, encoding: str = "utf-8") -> list[str] | None:
    """Column names of a CSV/TSV/parquet file; None for JSON."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        codec = text_encoding(path, encoding)
        try:
            with path.open(encoding=codec, newline="") as handle:
                return next(csv.reader(handle, delimiter="\t" if suffix == ".tsv" else ","), [])
        except UnicodeDecodeError:
            raise decoding_error(path, codec) from None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    return None


# -- row dict -> Record ---------------------------------------------------------------------------------------
class RowReader:
    """Reads rows of one layout, with the dataset's column names and role tags."""

    def __init__(self, settings: ReadSettings, decode_images: bool = True):
        if settings.format not in FORMATS:
            raise UserError(f"format `{settings.format}` is not one of {', '.join(FORMATS)}")
        self.settings = settings
        self.decode_images = decode_images  # False: images already decoded once (a build's second pass)
        self.layout = settings.format
        self.columns = {**DEFAULT_COLUMNS[self.layout], **(PAIR_COLUMNS if settings.ranking else {}),
                        **settings.columns}
        self.tags = {**DEFAULT_TAGS.get(self.layout, {}), **settings.tags}

    # helpers
    def text(self, path: Path, line: int, row: dict, key: str, required: bool = True) -> str | None:
        name = self.columns.get(key, key)
        value = row.get(name)
        if value is None or (value == "" and not required):
            if required:
                raise bad(path, line, f'field "{name}" missing')
            return None
        if value == "":
            raise bad(path, line, f'field "{name}" is empty')
        if isinstance(value, (int, float)) and not isinstance(value, bool) and path.suffix.lower() in TABULAR:
            value = str(value)
        if not isinstance(value, str):
            raise bad(path, line, f'field "{name}" must be a string, got {type(value).__name__}')
        return value

    def read(self, path: Path, line: int, row: Any) -> Record:
        if isinstance(row, BadRow):
            raise row
        if not isinstance(row, dict):
            raise bad(path, line, f"row must be a JSON object, got {type(row).__name__}")
        record = getattr(self, f"read_{self.layout}")(path, line, row)
        if self.settings.ranking:
            record.messages.append({"role": "assistant", "content": self.answer(path, line, row, "chosen")})
            record.rejected = self.answer(path, line, row, "rejected")
            if record.rejected == record.messages[-1]["content"]:
                raise bad(path, line, f'fields "{self.columns["chosen"]}" and "{self.columns["rejected"]}" are the '
                                      "same answer")
        record.path, record.source = str(path), row
        if record.system is None:
            record.system = self.settings.system
        if record.text is None:
            check_turns(path, line, record)
        if record.images:
            self.check_images(path, line, record)
        return record

    def check_images(self, path: Path, line: int, record: Record) -> None:
        """Each image decodes (or, with ``decode_images`` off, its header reads): else the row is bad, naming the
        image. Keeps their sizes for the build's stats and image tokens."""
        from snaketune.vision import ImageProblem, image_size, open_image, resolve

        try:
            record.images = [resolve(ref, path.parent) for ref in record.images]
            record.image_sizes = [open_image(ref).size if self.decode_images else image_size(ref)
                                  for ref in record.images]
        except ImageProblem as problem:
            raise bad(path, line, str(problem)) from None

    def answer(self, path: Path, line: int, row: dict, key: str) -> str:
        """A preference answer: a string, a turn object (sharegpt ``from``/``value``, OpenAI ``role``/``content``)
        or a list of one assistant message (trl's conversational layout)."""
        name = self.columns[key]
        value = row.get(name)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, dict):  # a turn: the dataset's tags (sharegpt from/value) or OpenAI's role/content
            role_tag, content_tag = (next((tag for tag in (self.tags.get(part), part) if tag and tag in value), part)
                                     for part in ("role", "content"))
            role = value.get(role_tag)
            if role is not None and role not in (self.tags.get("assistant", "assistant"), "assistant"):
                raise bad(path, line, f'field "{name}.{role_tag}": `{role}` is not the assistant\'s')
            value = value.get(content_tag)
            name = f"{name}.{content_tag}"
        if value is None:
            raise bad(path, line, f'field "{name}" missing')
        if not isinstance(value, str):
            raise bad(path, line, f'field "{name}" must be a string, an assistant turn or a list of one; got '
                                  f"{type(value).__name__}")
        if not value.strip():
            raise bad(path, line, f'field "{name}" is empty')
        return value

    # layouts
    def read_alpaca(self, path: Path, line: int, row: dict) -> Record:
        instruction = self.text(path, line, row, "instruction")
        extra = self.text(path, line, row, "input", required=False)
        output = None if self.settings.ranking else self.text(path, line, row, "output")
        messages = []
        history = row.get(self.columns["history"])
        if history is not None:
            if not isinstance(history, list) or not all(
                    isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
                    for pair in history):
                raise bad(path, line, f'field "{self.columns["history"]}" must be a list of [question, answer] '
                                      "string pairs")
            for question, answer in history:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        prompt = f"{instruction}\n{extra}" if extra else instruction
        messages.append({"role": "user", "content": prompt})
        if output is not None:
            messages.append({"role": "assistant", "content": output})
        return Record(row_id(path, line, row), self.text(path, line, row, "system", required=False), messages, line)

    def read_sharegpt(self, path: Path, line: int, row: dict) -> Record:
        key = self.columns["conversations"]
        turns = row.get(key)
        if turns is None:
            raise bad(path, line, f'field "{key}" missing')
        if not isinstance(turns, list) or not turns:
            raise bad(path, line, f'field "{key}" must be a non-empty list')
        role_tag, content_tag = self.tags["role"], self.tags["content"]
        roles = {self.tags[name]: name for name in ("user", "assistant", "system", "function_call", "observation")}
        canonical = {"user": "user", "assistant": "assistant", "system": "system", "function_call": "assistant",
                     "observation": "tool"}
        system, messages, images = self.text(path, line, row, "system", required=False), [], []
        for index, turn in enumerate(turns):
            where = f"{key}[{index}]"
            if not isinstance(turn, dict):
                raise bad(path, line, f'field "{where}" must be an object with "{role_tag}" and "{content_tag}"')
            if isinstance(turn.get(content_tag), list):  # OpenAI content parts: text and images
                try:
                    turn = {**turn, content_tag: self.content_parts(turn[content_tag], f"{where}.{content_tag}",
                                                                   images)}
                except ImageProblem as problem:
                    raise bad(path, line, str(problem)) from None
            for tag in (role_tag, content_tag):
                if not isinstance(turn.get(tag), str):
                    raise bad(path, line, f'field "{where}.{tag}" missing or not a string')
            role = roles.get(turn[role_tag])
            if role is None:
                raise bad(path, line, f'field "{where}.{role_tag}": `{turn[role_tag]}` is not one of '
                                      f'{", ".join(roles)}')
            if role == "system":
                if index != 0:
                    raise bad(path, line, f'field "{where}": a system turn may only come first')
                system = turn[content_tag]
                continue
            messages.append({"role": canonical[role], "content": turn[content_tag]})
        images = self.row_images(path, line, row) + images
        try:
            place_images(messages, len(images))
        except ImageProblem as problem:
            raise bad(path, line, str(problem)) from None
        return Record(row_id(path, line, row), system, messages, line, images=images)

    read_messages = read_sharegpt

    @staticmethod
    def content_parts(parts: list, where: str, images: list[str]) -> str:
        text, found = content_parts(parts, where)
        images += found
        return text

    def row_images(self, path: Path, line: int, row: dict) -> list:
        """The row's image column: a list (LLaMA-Factory's ``images``) or one path (LLaVA's ``image``)."""
        name = self.columns["images"]
        value = row.get(name, row.get("image") if name == "images" else None)
        if value is None:
            return []
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise bad(path, line, f'field "{name}" must be an image path or a list of them')
        return value

    def read_firefly(self, path: Path, line: int, row: dict) -> Record:
        key = self.columns["conversation"]
        turns = row.get(key)
        if turns is None:
            raise bad(path, line, f'field "{key}" missing')
        if not isinstance(turns, list) or not turns:
            raise bad(path, line, f'field "{key}" must be a non-empty list')
        messages = []
        for index, turn in enumerate(turns):
            for role, tag in (("user", "human"), ("assistant", "assistant")):
                if not isinstance(turn, dict) or not isinstance(turn.get(tag), str):
                    raise bad(path, line, f'field "{key}[{index}].{tag}" missing or not a string')
                messages.append({"role": role, "content": turn[tag]})
        return Record(row_id(path, line, row), self.text(path, line, row, "system", required=False), messages, line)

    def read_text(self, path: Path, line: int, row: dict) -> Record:
        text = self.text(path, line, row, "text")
        if not text.strip():
            raise bad(path, line, f'field "{self.columns["text"]}" is empty')
        return Record(row_id(path, line, row), None, [], line, text=text)

    def read_preference(self, path: Path, line: int, row: dict) -> Record:
        """trl's layout: ``prompt`` is a string (one user turn) or a list of ``role``/``content`` messages."""
        name = self.columns["prompt"]
        prompt = row.get(name)
        system = self.text(path, line, row, "system", required=False) if self.columns["system"] in row else None
        if isinstance(prompt, str):
            if not prompt.strip():
                raise bad(path, line, f'field "{name}" is empty')
            return Record(row_id(path, line, row), system, [{"role": "user", "content": prompt}], line)
        if not isinstance(prompt, list) or not prompt:
            raise bad(path, line, f'field "{name}" missing or not a string or a list of messages')
        messages = []
        for index, turn in enumerate(prompt):
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or \
                    not isinstance(turn.get("content"), str):
                raise bad(path, line, f'field "{name}[{index}]" must be an object with string "role" and "content"')
            if turn["role"] == "system" and index == 0:
                system = turn["content"]
            elif turn["role"] not in ROLES[1:]:
                raise bad(path, line, f'field "{name}[{index}].role": `{turn["role"]}` is not one of '
                                      f'{", ".join(ROLES[1:])}')
            else:
                messages.append({"role": turn["role"], "content": turn["content"]})
        return Record(row_id(path, line, row), system, messages, line)

    def read_columns(self, path: Path, line: int, row: dict) -> Record:
        prompt = fill(path, line, self.settings.prompt, row, "prompt")
        response = fill(path, line, self.settings.response, row, "response")
        system = self.text(path, line, row, "system", required=False) if "system" in self.columns else None
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return Record(row_id(path, line, row), system, messages, line)


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def fill(path: Path, line: int, template: str, row: dict, setting: str) -> str:
    """Fill a ``{column}`` template from a row; a column the row lacks is a bad row naming it."""
    values = {}
    for name in template_fields(template):
        value = row.get(name)
        if value is None:
            raise bad(path, line, f'field "{name}" (used by `{setting}`) missing')
        values[name] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return template.format_map(values)


def row_id(path: Path, line: int, row: dict) -> str:
    """The row's own ``id``, or a placeholder that read_records replaces by ``{file stem}-{row number}``."""
    return str(row["id"]) if row.get("id") is not None else ""


def check_turns(path: Path, line: int, record: Record) -> None:
    """Prompt turns (user/tool) and assistant turns alternate, none is empty, and the last is the assistant's."""
    roles = [m["role"] for m in record.messages]
    if not roles or roles[-1] != "assistant":
        raise bad(path, line, 'the last turn must be the assistant\'s (it is what is trained on)')
    for index, message in enumerate(record.messages):
        expected_prompt = index % 2 == 0
        if (message["role"] in PROMPT_ROLES) != expected_prompt:
            expected = "user" if expected_prompt else "assistant"
            raise bad(path, line, f'turn {index} is "{message["role"]}", expected "{expected}" (turns alternate)')
        if not message["content"].strip():
            raise bad(path, line, f'turn {index} ("{message["role"]}") is empty')


def check_columns(settings: ReadSettings, path: Path) -> None:
    """A tabular file must have every column the settings name: one error naming the file and the column."""
    header = header_of(path, settings.encoding)
    if header is None:
        return
    needed = set()
    if settings.format == "columns":
        needed |= set(template_fields(settings.prompt or "")) | set(template_fields(settings.response or ""))
        if "system" in settings.columns:
            needed.add(settings.columns["system"])
    elif settings.format in ("alpaca", "text", "preference"):
        reader = RowReader(settings)
        required = {"alpaca": ("instruction", "output"), "text": ("text",), "preference": ("prompt",)}[settings.format]
        if settings.ranking:
            required = tuple(key for key in required if key != "output") + ("chosen", "rejected")
        needed |= {reader.columns[key] for key in required}
    for name in sorted(needed - set(header)):
        close = [h for h in header if h.lower() == name.lower()]
        hint = f" (did you mean `{close[0]}`?)" if close else f" (columns: {', '.join(header)})"
        raise located(path, 1, f'column "{name}" does not exist{hint}')


class Admission:
    """Which rows of a dataset's files the build keeps, in file order: a bad row is counted (the build stops past
    ``max_bad_rows`` of them), an id may be used once, and a row whose content came before is a duplicate."""

    def __init__(self, settings: ReadSettings, tally: ReadResult):
        self.settings, self.tally = settings, tally
        self.seen_ids: dict[str, str] = {}
        self.seen_content: set[str] = set()

    def bad(self, problem: BadRow | str) -> None:
        self.tally.bad_rows.append(str(problem))
        if len(self.tally.bad_rows) > self.settings.max_bad_rows:
            shown = "\n".join(self.tally.bad_rows[:5])
            raise UserError(f"{shown}\n{len(self.tally.bad_rows)} bad row(s) so far, more than max_bad_rows="
                            f"{self.settings.max_bad_rows}; fix them or raise max_bad_rows to skip them "
                            "(skipped rows are counted in stats.json)") from None

    def check_id(self, path: Path, line: int, row_id: str) -> None:
        """A BadRow when ``row_id`` was used before."""
        if row_id in self.seen_ids:
            raise bad(path, line, f'field "id": `{row_id}` already used on {self.seen_ids[row_id]}')

    def admit(self, path: Path, line: int, row_id: str, key) -> bool:
        """Note a good row's id and content (``key``: its ``content_key``, or the error that raised); whether its
        content is new."""
        self.seen_ids[row_id] = f"{path}:{line}"
        if isinstance(key, Exception):
            raise key
        if self.settings.deduplicate and key in self.seen_content:
            self.tally.duplicates += 1
            return False
        self.seen_content.add(key)
        return True


def iter_records(settings: ReadSettings, tally: ReadResult, decode_images: bool = True) -> Iterator[Record]:
    """Yield every good, new row of every file as a Record, in file order, holding none of them: bad rows and
    duplicates are counted in ``tally`` (its ``records`` stays empty), up to ``max_bad_rows`` bad ones. With
    ``decode_images`` off, images are only sized from their headers (a pass after one that decoded them)."""
    reader = RowReader(settings, decode_images)
    admission = Admission(settings, tally)
    for path in settings.paths:
        check_columns(settings, path)
        for number, (line, row) in enumerate(iter_file_rows(path, settings.encoding), start=1):
            tally.rows_read += 1
            try:
                record = reader.read(path, line, row)
                record.id = record.id or f"{path.stem}-{number}"  # row number: one-line JSON arrays share a line
                admission.check_id(path, line, record.id)
            except BadRow as problem:
                admission.bad(problem)
                continue
            if admission.admit(path, line, record.id, content_key(record)):
                yield record


def content_key(record: Record):
    """``record.content_key()``, or the error it raised (``Admission.admit`` raises it where the row's turn comes)."""
    try:
        return record.content_key()
    except Exception as exc:  # noqa: BLE001 - text no codec writes (a lone surrogate): raised in file order
        return exc


# -- JSONL read in pieces, by lines (the dataset build's workers) --------------------------------------------
def jsonl_codec(path: Path, encoding: str) -> str | None:
    """The codec of a JSONL file that may be read in pieces by lines: UTF-8 (``utf-8-sig``, as ``iter_file_rows``
    opens it); None for anything else (a table, a JSON array, another encoding, a file that is not there)."""
    if path.suffix.lower() in TABULAR or not path.is_file() or is_json_array(path):
        return None
    try:
        codec = text_encoding(path, encoding)
    except UserError:
        return None
    return codec if codec == "utf-8-sig" else None


def line_pieces(path: Path, size: int) -> Iterator[tuple[int, int, int]]:
    """``(start, end, first line)`` of consecutive pieces of ``path`` of about ``size`` bytes, each ending at a line's
    end (the file's end for the last one)."""
    with path.open("rb") as handle:
        start, line, pending = 0, 1, 0  # pending: bytes read past the last piece's end
        while block := handle.read(size):
            cut = block.rfind(b"\n") + 1
            if not cut:
                pending += len(block)
                continue
            end = start + pending + cut
            yield start, end, line
            line += block.count(b"\n")
            start, pending = end, len(block) - cut
        if pending:
            yield start, start + pending, line


@dataclass
class ScannedRows:
    """What ``scan_lines`` found in a piece of a JSONL file, in order, for every line that is not blank: its line and
    byte offset, and either the row's own id ("" when it has none) and ``content_key``, or why the row is bad."""

    lines: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    keys: list[Any] = field(default_factory=list)  # None for a bad row
    problems: dict[int, str] = field(default_factory=dict)  # index of a bad row -> "file:line: reason"
    undecodable: bool = False  # the piece stopped at a line that is not UTF-8


def decode_line(raw: bytes, offset: int) -> str:
    """A line of a UTF-8 JSONL file as ``iter_json_rows`` reads it (a byte-order mark only at the file's start)."""
    return raw.decode("utf-8-sig" if offset == 0 else "utf-8")


def json_row(path: Path, line: int, text: str) -> Any:
    """A JSONL line's row, or the BadRow ``iter_json_rows`` gives for it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return bad(path, line, f"not valid JSON: {exc.msg} (column {exc.colno})")


def scan_lines(reader: RowReader, path: Path, start: int, end: int, first_line: int) -> ScannedRows:
    """Read bytes ``start`` to ``end`` of a JSONL file (whole lines, the first being ``first_line``) as
    ``iter_records`` reads them, keeping only what deciding on each row takes (``Admission``)."""
    with path.open("rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
    found = ScannedRows()
    lines = data.split(b"\n")
    offset = start
    for number, raw in enumerate(lines, start=first_line):
        last = number - first_line == len(lines) - 1
        if last and not raw:
            break
        at, offset = offset, offset + len(raw) + 1
        try:
            text = decode_line(raw if last else raw + b"\n", at)
        except UnicodeDecodeError:
            found.undecodable = True
            break
        if not text.strip():
            continue
        found.lines.append(number)
        found.offsets.append(at)
        try:
            record = reader.read(path, number, json_row(path, number, text))
        except BadRow as problem:
            found.problems[len(found.ids)] = str(problem)
            found.ids.append("")
            found.keys.append(None)
            continue
        found.ids.append(record.id)
        found.keys.append(content_key(record))
    return found


def read_lines(reader: RowReader, path: Path, handle, offsets, lines, numbers) -> list[Record]:
    """The records of rows ``scan_lines`` found good, read again at their byte ``offsets`` (from the open binary
    ``handle`` of ``path``); ``numbers`` are their row numbers in the file (a row without an id is named by it)."""
    records = []
    for offset, line, number in zip(offsets, lines, numbers, strict=True):
        handle.seek(offset)
        record = reader.read(path, line, json_row(path, line, decode_line(handle.readline(), offset)))
        record.id = record.id or f"{path.stem}-{number}"
        records.append(record)
    return records


def no_records_error(settings: ReadSettings, tally: ReadResult) -> UserError:
    reasons = "".join(f"\n{row}" for row in tally.bad_rows[:5])
    why = (f"all {tally.rows_read} rows are bad (first reasons below)"
           if tally.bad_rows and len(tally.bad_rows) == tally.rows_read
           else f"no usable rows ({tally.rows_read} read, {len(tally.bad_rows)} bad, {tally.duplicates} duplicates)")
    return UserError(f"{', '.join(map(str, settings.paths))}: {why}{reasons}")


def read_records(settings: ReadSettings) -> ReadResult:
    """Read every row of every file; bad rows are collected (up to ``max_bad_rows``), duplicates removed."""
    tally = ReadResult([], [], 0, 0)
    records = list(iter_records(settings, tally))
    if not records:
        raise no_records_error(settings, tally)
    tally.records = records
    return tally


# -- LLaMA-Factory dataset_info.json ------------------------------------------------------------------------
LF_COLUMNS = {  # LLaMA-Factory column names -> ours, per formatting
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
               "history": "history", "chosen": "chosen", "rejected": "rejected"},
    "sharegpt": {"messages": "conversations", "system": "system", "chosen": "chosen", "rejected": "rejected"},
}
LF_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
           "system_tag": "system", "function_tag": "function_call", "observation_tag": "observation"}


def from_dataset_info(info_path: str | Path, name: str) -> dict[str, Any]:
    """Read settings for dataset ``name`` of a LLaMA-Factory ``dataset_info.json``: path, format, columns, tags."""
    info_path = Path(info_path)
    if not info_path.exists():
        raise UserError(f"{info_path}: file not found")
    try:
        info = json.loads(_read_text(info_path))
    except json.JSONDecodeError as exc:
        raise located(info_path, exc.lineno, f"not valid JSON: {exc.msg}") from None
    if not isinstance(info, dict) or name not in info:
        known = ", ".join(sorted(info)) if isinstance(info, dict) else "none"
        raise located(info_path, None, f'dataset "{name}" not found (it has: {known})')
    entry = info[name]
    line = _read_text(info_path).split(f'"{name}"')[0].count("\n") + 1
    if not isinstance(entry, dict) or "file_name" not in entry:
        raise located(info_path, line, f'dataset "{name}": field "file_name" missing (hub and script datasets '
                                       "are not read; download the file and name it here)")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in LF_COLUMNS:
        raise located(info_path, line, f'dataset "{name}": formatting `{formatting}` is not alpaca or sharegpt')
    columns = {}
    for theirs, value in (entry.get("columns") or {}).items():
        if theirs not in LF_COLUMNS[formatting]:
            if theirs in ("tools", "images", "videos", "audios", "kto_tag"):
                raise located(info_path, line, f'dataset "{name}": column `{theirs}` (tool, multimodal or KTO '
                                               "data) is not supported")
            raise located(info_path, line, f'dataset "{name}": unknown column key `{theirs}`')
        columns[LF_COLUMNS[formatting][theirs]] = value
    tags = {}
    for theirs, value in (entry.get("tags") or {}).items():
        if theirs not in LF_TAGS:
            raise located(info_path, line, f'dataset "{name}": unknown tag key `{theirs}`')
        tags[LF_TAGS[theirs]] = value
    return {"path": str(info_path.parent / entry["file_name"]), "format": formatting, "columns": columns,
            "tags": tags, "ranking": bool(entry.get("ranking", False))}
