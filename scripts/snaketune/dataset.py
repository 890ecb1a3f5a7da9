"""Dataset build: files -> canonical records -> tokenized train/eval/test parquet with loss masks, stats.json
and a length histogram.

The build is a function of (files, format settings, tokenizer, template, max length, seed) and nothing else: the
rule passes exactly those, so it reruns when one of them changes and only then. ``num_workers`` only sets how many
processes share the tokenizing (the rule's threads): any number writes the same rows in the same order.
"""

from __future__ import annotations

import json
import os
import random
import sys
from array import array
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from snaketune.errors import UserError, located
from snaketune.formats import (
    Admission,
    BadRow,
    ReadResult,
    ReadSettings,
    Record,
    RowReader,
    ScannedRows,
    decoding_error,
    iter_records,
    jsonl_codec,
    line_pieces,
    no_records_error,
    read_lines,
    scan_lines,
)
from snaketune.io import atomic_file, save_png, write_json
from snaketune.settings import DatasetSettings
from snaketune.templates import (
    ChatTemplate,
    TemplateError,
    adopt_system,
    encode_text,
    template_sha256,
    with_system,
)

SPLITS = ("train", "eval", "test")
PRIVATE = ("full_length", "turns")  # used for stats, not written
ENCODE_BATCH = 1000  # rows a worker encodes per call (one Rust tokenizer call, one parquet row group)
SCAN_PIECE = 1 << 20  # bytes of a JSONL file a worker reads per call in the first pass


def split_sizes(n: int, eval_size: float, test_size: float) -> tuple[int, int]:
    """Rows for eval and test: a fraction of ``n`` when below 1, a row count otherwise."""

    def count(size: float) -> int:
        return int(size) if size >= 1 else round(size * n)

    return count(eval_size), count(test_size)


def split_assignment(n: int, settings: DatasetSettings) -> bytearray:
    """The split of each of ``n`` rows (an index into SPLITS): a shuffle with the dataset seed, cut into test,
    eval, then train; the same seed gives the same split."""
    if settings.test_only:
        return bytearray([SPLITS.index("test")]) * n
    n_eval, n_test = split_sizes(n, settings.eval_size, settings.test_size)
    if n_eval + n_test >= n:
        raise UserError(
            f"{settings.source}: {n} rows leave none for training after eval_size={settings.eval_size} "
            f"and test_size={settings.test_size}"
        )
    order = list(range(n))
    random.Random(settings.seed).shuffle(order)
    labels = bytearray(n)  # 0: train
    for index in order[:n_test]:
        labels[index] = SPLITS.index("test")
    for index in order[n_test : n_test + n_eval]:
        labels[index] = SPLITS.index("eval")
    return labels


def split_records(records: list[Record], settings: DatasetSettings) -> dict[str, list[Record]]:
    """``records`` cut into train, eval and test as ``split_assignment`` says, each in file order."""
    labels = split_assignment(len(records), settings)
    return {name: [r for r, label in zip(records, labels, strict=True) if label == number]
            for number, name in enumerate(SPLITS)}


def eos_error(tokenizer, record: Record) -> UserError:
    return located(
        record.path, record.line,
        f"the chat template does not end assistant turns with the tokenizer's eos token `{tokenizer.eos_token}`; a "
        "model trained on it would never stop. Set the model's eos_token to the template's end-of-turn token, or "
        "choose the dataset's `template`",
    )


def encode_records(template: ChatTemplate | None, tokenizer, records: list[Record], max_length: int,
                   images: ImageRows | None = None):
    """The rows of ``records`` as one Arrow table (``split_schema`` and the PRIVATE counts): token ids, labels, and
    the prompt/reference that predict and evaluate use. Conversations go through ``ChatTemplate.encode_batch``
    (arrays); pretraining text and preference pairs through ``encode_rows``. With ``images`` (a vision-language
    model's build), each image's token is repeated for its features and the rows keep their image paths."""
    if images is not None:
        return images.encode(template, tokenizer, records, max_length)
    with_images = next((record for record in records if record.images), None)
    if with_images is not None:
        raise located(with_images.path, with_images.line, "this row has images and the model is text-only: use a "
                                                          "vision-language model (Qwen2-VL, LLaVA ...) for this data")
    if template is None or records[0].rejected is not None:
        return rows_table(encode_rows(template, tokenizer, records, max_length), records[0].rejected is not None)
    import pyarrow as pa

    conversations = [with_system(r.system, r.messages) for r in records]
    try:
        batch = template.encode_batch(conversations, max_length)
    except TemplateError as exc:
        raise UserError(f"{records[0].path}: {exc}") from None
    if not batch.eos_supervised.all():
        raise eos_error(tokenizer, records[int(batch.eos_supervised.argmin())])
    row_starts = pa.array(batch.row_starts, pa.int32())
    columns = {
        "id": [r.id for r in records], "line": [r.line for r in records],
        "input_ids": pa.ListArray.from_arrays(row_starts, pa.array(batch.input_ids, pa.int32())),
        "labels": pa.ListArray.from_arrays(row_starts, pa.array(batch.labels, pa.int32())),
        "n_tokens": pa.array(batch.row_starts[1:] - batch.row_starts[:-1], pa.int64()),
        "n_supervised": pa.array(batch.n_supervised, pa.int64()), "truncated": pa.array(batch.truncated),
        "prompt": batch.prompts, "reference": [r.messages[-1]["content"] for r in records],
        "source": [json.dumps(r.source or {}, ensure_ascii=False, default=str) for r in records],
        "messages": [json.dumps(c, ensure_ascii=False) for c in conversations],
        "full_length": pa.array(batch.length, pa.int64()), "turns": [len(r.messages) for r in records],
    }
    return pa.table(columns, schema=table_schema(False))


def rows_table(rows: list[dict], ranking: bool):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, table_schema(ranking))


def encode_rows(template: ChatTemplate | None, tokenizer, records: list[Record], max_length: int) -> list[dict]:
    """``encode_records`` a row at a time, as dicts: for pretraining text and preference pairs."""
    if template is None:  # pretraining text
        encoded = encode_text(tokenizer, [r.text for r in records], max_length)
        prompts = [""] * len(records)
        references = [""] * len(records)
        conversations = [r.as_dict() for r in records]
    else:
        conversations = [with_system(r.system, r.messages) for r in records]
        try:
            encoded = template.encode(conversations, max_length)
        except TemplateError as exc:
            raise UserError(f"{records[0].path}: {exc}") from None
        for record, row in zip(records, encoded, strict=True):
            if not row.eos_supervised:
                raise eos_error(tokenizer, record)
        prompts = [template.render(c[:-1], add_generation_prompt=True) for c in conversations]
        references = [r.messages[-1]["content"] for r in records]
    pairs = [None] * len(records)
    if records and records[0].rejected is not None:
        try:
            pairs = template.encode_pairs(conversations, [r.rejected for r in records], max_length)
        except TemplateError as exc:
            raise UserError(f"{records[0].path}: {exc}") from None
    rows = [
        {"id": record.id, "line": record.line, "input_ids": row.input_ids, "labels": row.labels,
         "n_tokens": len(row.input_ids), "n_supervised": row.n_supervised, "truncated": row.truncated,
         "prompt": prompt, "reference": reference, "messages": json.dumps(conversation, ensure_ascii=False),
         "source": json.dumps(record.source or {}, ensure_ascii=False, default=str),
         "full_length": row.length, "turns": len(record.messages) if record.text is None else 1}
        for record, row, prompt, reference, conversation
        in zip(records, encoded, prompts, references, conversations, strict=True)
    ]
    for row, pair, record in zip(rows, pairs, records, strict=True):
        if pair is not None:  # a pair trains only when both answers keep a token after the prompt
            row.update(prompt_ids=pair.prompt_ids, chosen_ids=pair.chosen_ids, rejected_ids=pair.rejected_ids,
                       rejected=record.rejected, truncated=row["truncated"] or pair.truncated)
            if not (pair.chosen_ids and pair.rejected_ids):
                row["n_supervised"] = 0
    return rows


def length_summary(lengths: list[int]) -> dict[str, float]:
    import numpy as np

    if not lengths:
        return {"mean": 0, "p50": 0, "p95": 0, "max": 0}
    values = np.asarray(lengths)
    return {"mean": round(float(values.mean()), 2), "p50": float(np.percentile(values, 50)),
            "p95": float(np.percentile(values, 95)), "max": int(values.max())}


def plot_lengths(lengths: dict[str, list[int]], max_length: int, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    for name, values in lengths.items():
        if values:
            axes.hist(values, bins=40, alpha=0.6, label=f"{name} ({len(values)})")
    axes.axvline(max_length, color="black", linestyle="--", linewidth=1, label=f"max_seq_length {max_length}")
    axes.set(xlabel="tokens per row (before truncation)", ylabel="rows", title=title)
    axes.legend(fontsize=8)
    save_png(figure, path)


def split_schema(ranking: bool = False, images: bool = False):
    """The columns of a split; preference datasets add the tokenized pair and the rejected answer, a
    vision-language build each row's image paths."""
    import pyarrow as pa

    tokens = pa.list_(pa.int32())
    pair = [("prompt_ids", tokens), ("chosen_ids", tokens), ("rejected_ids", tokens), ("rejected", pa.string())]
    return pa.schema([("id", pa.string()), ("line", pa.int64()), ("input_ids", tokens), ("labels", tokens),
                      ("n_tokens", pa.int64()), ("n_supervised", pa.int64()), ("truncated", pa.bool_()),
                      ("prompt", pa.string()), ("reference", pa.string()), ("source", pa.string()),
                      ("messages", pa.string())] + (pair if ranking else [])
                     + ([("images", pa.list_(pa.string()))] if images else []))


def table_schema(ranking: bool, images: bool = False):
    """What ``encode_records`` returns: a split's columns and the PRIVATE counts."""
    import pyarrow as pa

    return split_schema(ranking, images).append(pa.field("full_length", pa.int64())).append(
        pa.field("turns", pa.int64()))


@dataclass
class ImageRows:
    """The build's side of a vision-language model: its image inputs, and the folder where images given as data
    URLs are written once (the splits hold paths, never pixels)."""

    inputs: Any  # vision.ImageInputs
    folder: Path

    def encode(self, template: ChatTemplate | None, tokenizer, records: list[Record], max_length: int):
        """``encode_records`` for a vision-language model: the family's image marker in the text, each image's
        token repeated for its features (never labelled), the rows' image paths."""
        import pyarrow as pa

        from snaketune.vision import expand_rows, store_data_url, with_markers

        if template is None or records[0].rejected is not None:
            raise UserError(f"{records[0].path}: vision-language models train on conversations (sharegpt or "
                            "messages), not on pretraining text or preference pairs yet")
        # the family's markers in the text; the images themselves are this method's (not the text-only check's)
        marked = [replace(record, messages=with_markers(record.messages, self.inputs.family), images=[],
                          image_sizes=[]) for record in records]
        table = encode_records(template, tokenizer, marked, max_length)
        columns = {name: table.column(name).to_pylist() for name in (
            "input_ids", "labels", "n_tokens", "n_supervised", "truncated", "full_length")}
        expand_rows(columns, [record.image_sizes for record in records], self.inputs, max_length)
        paths = [[store_data_url(ref, self.folder) for ref in record.images] for record in records]
        for name, values in columns.items():
            table = table.set_column(table.schema.get_field_index(name), name,
                                     pa.array(values, table.schema.field(name).type))
        messages = [json.dumps(with_system(r.system, r.messages), ensure_ascii=False) for r in records]
        table = table.set_column(table.schema.get_field_index("messages"), "messages", pa.array(messages))
        return table.append_column(pa.field("images", pa.list_(pa.string())), [paths]).select(
            table_schema(False, True).names)


class SplitWriter:
    """Appends the encoded rows of one split to its parquet file a batch at a time, so memory holds one batch of
    tokens, not the split; counts what the stats report."""

    def __init__(self, name: str, path: Path, settings: DatasetSettings, images: bool = False):
        import pyarrow.parquet as pq

        self.name, self.settings = name, settings
        self.schema = split_schema(settings.ranking, images)
        self.writer = pq.ParquetWriter(path, self.schema)
        self.lengths = array("l")  # every row's full length, kept or not (the histogram)
        self.counts = {"rows": 0, "turns": 0, "tokens": 0, "supervised_tokens": 0, "truncated": 0,
                       "dropped_no_target": 0, "max_tokens": 0}

    def write(self, table) -> None:
        """Write the rows of ``table`` (``encode_records``) that keep a trainable token; count the others."""
        import pyarrow.compute as pc

        self.lengths.extend(table.column("full_length").to_numpy())
        trainable = pc.greater(table.column("n_supervised"), 0)
        for line in table.filter(pc.invert(trainable)).column("line").to_pylist():
            if self.counts["dropped_no_target"] < 20:
                print(f"warning: {self.settings.source}:{line}: dropped from {self.name}: no trainable token "
                      f"left within max_seq_length={self.settings.max_seq_length}", file=sys.stderr)
            self.counts["dropped_no_target"] += 1
        kept = table.filter(trainable)
        self.writer.write_table(kept.select(self.schema.names).cast(self.schema))
        self.counts["rows"] += kept.num_rows
        for count, column in (("tokens", "n_tokens"), ("turns", "turns"), ("supervised_tokens", "n_supervised"),
                              ("truncated", "truncated")):
            self.counts[count] += pc.sum(kept.column(column)).as_py() or 0
        self.counts["max_tokens"] = max(self.counts["max_tokens"], pc.max(kept.column("n_tokens")).as_py() or 0)

    def close(self) -> dict[str, Any]:
        if not self.counts["rows"]:
            self.writer.write_table(self.schema.empty_table())
        self.writer.close()
        return {**{key: self.counts[key] for key in ("rows", "turns", "tokens")},
                "tokens_per_row_before_truncation": length_summary(self.lengths),
                **{key: self.counts[key] for key in ("supervised_tokens", "truncated", "dropped_no_target",
                                                     "max_tokens")}}


def split_batches(records: Iterator[Record], labels: bytearray) -> Iterator[tuple[str, list[Record]]]:
    """``(split, records)``: each split's records in file order, ENCODE_BATCH at a time (the last batch of each
    split at the end). The batches depend on the data alone, never on the number of workers."""
    pending: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for record, label in zip(records, labels, strict=True):
        batch = pending[SPLITS[label]]
        batch.append(record)
        if len(batch) >= ENCODE_BATCH:
            yield SPLITS[label], batch
            pending[SPLITS[label]] = []
    yield from ((name, batch) for name, batch in pending.items() if batch)


def row_batches(labels: bytearray, size: int) -> list[tuple[int, Any]]:
    """``split_batches``' batches as ``(split number, row indices)``, for rows known by index: the same batches in
    the same order (each full batch where its last row comes, then each split's last batch in SPLITS order)."""
    import numpy as np

    labels = np.frombuffer(labels, np.uint8)
    full, rest = [], []
    for number in range(len(SPLITS)):
        rows = np.flatnonzero(labels == number)
        whole = len(rows) // size * size
        full += [(rows[end - 1], number, rows[end - size : end]) for end in range(size, whole + 1, size)]
        if whole < len(rows):
            rest.append((number, rows[whole:]))
    return [(number, rows) for _, number, rows in sorted(full, key=lambda batch: batch[0])] + rest


@dataclass
class KeptRows:
    """The rows the first pass over JSONL files kept, in file order, as where to read them again: the file (its
    index in the settings' paths), byte offset, line and row number (a row without an id is named by it)."""

    files: array = field(default_factory=lambda: array("q"))
    offsets: array = field(default_factory=lambda: array("q"))
    lines: array = field(default_factory=lambda: array("q"))
    numbers: array = field(default_factory=lambda: array("q"))

    def append(self, file: int, offset: int, line: int, number: int) -> None:
        self.files.append(file)
        self.offsets.append(offset)
        self.lines.append(line)
        self.numbers.append(number)

    def __len__(self) -> int:
        return len(self.lines)

    def batches(self, labels: bytearray) -> Iterator[tuple[str, tuple]]:
        """``(split, (files, offsets, lines, numbers))`` of each batch ``row_batches`` makes of these rows."""
        import numpy as np

        columns = [np.frombuffer(column, np.int64) for column in (self.files, self.offsets, self.lines, self.numbers)]
        for number, rows in row_batches(labels, ENCODE_BATCH):
            yield SPLITS[number], tuple(column[rows] for column in columns)


@dataclass
class BatchEncoder:
    """Turns a batch of ``(split, records)`` into ``(split, encode_records table)``; picklable, so each worker
    process gets its own copy once. With the dataset's ``read`` settings it also reads JSONL files itself: a
    piece's rows (``scan``) and a batch of rows by where they are (``encode_lines``)."""

    template: ChatTemplate | None
    tokenizer: Any
    max_length: int
    read: ReadSettings | None = None
    images: ImageRows | None = None
    handles: dict[int, Any] = field(default_factory=dict, repr=False)  # open files, never pickled

    def __call__(self, batch: tuple[str, list[Record]]) -> tuple[str, Any]:
        name, records = batch
        return name, encode_records(self.template, self.tokenizer, records, self.max_length, self.images)

    @cached_property
    def reader(self) -> RowReader:
        return RowReader(self.read)

    def scan(self, piece: tuple[int, int, int, int]) -> tuple[int, ScannedRows]:
        """``scan_lines`` of ``(file, start, end, first line)``."""
        file, start, end, first_line = piece
        return file, scan_lines(self.reader, self.read.paths[file], start, end, first_line)

    def encode_lines(self, batch: tuple[str, tuple]) -> tuple[str, Any]:
        """``(split, (files, offsets, lines, numbers))``: the rows read again where they are, then encoded."""
        name, (files, offsets, lines, numbers) = batch
        records = []
        for file, rows in group_by_file(files.tolist(), offsets.tolist(), lines.tolist(), numbers.tolist()):
            if file not in self.handles:
                self.handles[file] = self.read.paths[file].open("rb")
            records += read_lines(self.reader, self.read.paths[file], self.handles[file], *rows)
        return self((name, records))

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()

    def __getstate__(self):  # a worker opens its own files and makes its own reader
        state = {**self.__dict__, "handles": {}}
        state.pop("reader", None)
        return state


def group_by_file(files: list[int], *columns: list[int]) -> Iterator[tuple[int, list[list[int]]]]:
    """Consecutive rows of one file: ``(file, [column values of those rows])``."""
    start = 0
    for end in range(1, len(files) + 1):
        if end == len(files) or files[end] != files[start]:
            yield files[start], [column[start:end] for column in columns]
            start = end


WORKER_ENCODER: BatchEncoder | None = None  # a worker process's encoder, set once when the worker starts


def start_worker(encoder: BatchEncoder) -> None:
    global WORKER_ENCODER
    # One core per worker: the tokenizer's own threads would only fight the other workers for the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    WORKER_ENCODER = encoder


def run_in_worker(method: str, task):
    return getattr(WORKER_ENCODER, method)(task)


def in_order(encoder: BatchEncoder, method: str, tasks: Iterator, pool, workers: int) -> Iterator:
    """``encoder``'s ``method`` applied to every task, results in the tasks' order: here, or over ``pool``'s
    ``workers`` processes with twice as many tasks in flight (every worker busy; memory holds only those)."""
    if pool is None:
        yield from map(getattr(encoder, method), tasks)
        return
    pending = deque()
    for task in tasks:
        pending.append(pool.submit(run_in_worker, method, task))
        if len(pending) >= 2 * workers:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class Workers:
    """The build's worker processes, started when a pass first has work for more than one of them (a small dataset
    is not worth starting processes for), then kept for the passes after it."""

    def __init__(self, encoder: BatchEncoder, workers: int):
        self.encoder, self.workers = encoder, workers
        self.pool, self.size = None, 1

    def __call__(self, tasks: int):
        """The pool for a pass of ``tasks`` tasks, or None: the pass runs here."""
        if self.pool is None and min(self.workers, tasks) > 1:
            self.size = min(self.workers, tasks)
            self.pool = worker_pool(self.encoder, self.size)
        return self.pool

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        self.encoder.close()
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=exc[0] is not None)


def worker_pool(encoder: BatchEncoder, workers: int):
    """A pool of ``workers`` fresh processes (spawned: nothing of this process's threads or state is copied; a
    worker that dies fails the build instead of hanging it), or None for one worker, which encodes here."""
    if workers <= 1:
        return nullcontext()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=start_worker,
                               initargs=(encoder,))


@contextmanager
def one_core_here(wanted: bool):
    """While open (when ``wanted``), this process's tokenizer encodes on one thread: one worker is one core, as a
    job given one thread must use, and as each worker process does (its own threads would take every core)."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    if wanted:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if wanted and saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        elif wanted:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


OUTPUTS = ("train", "eval", "test", "stats", "lengths")
MOST_ROWS_DROPPED = 0.5  # a build that keeps less than this share of the rows it read says so


def build_template(settings: DatasetSettings, tokenizer) -> ChatTemplate | None:
    """The dataset's chat template bound to ``tokenizer``; None for pretraining text."""
    if settings.format == "text":
        return None
    try:
        return ChatTemplate.of(tokenizer, settings.template)
    except TemplateError as exc:
        raise UserError(f"{settings.source}: {exc}") from None


def stats_head(settings: DatasetSettings, tokenizer, template: ChatTemplate | None, read: ReadResult) -> dict:
    """What stats.json says before any row is written: settings, template, and what reading found."""
    # The template the tuned model is saved with (train stores it): with the dataset's system prompt as its default,
    # so a conversation without one gets the prompt the model was trained with, not the base model's own.
    saved_template = None if template is None else adopt_system(template, settings.system) if settings.system \
        else template.source
    return {
        "source": settings.path, "format": settings.format, "ranking": settings.ranking,
        "template": None if template is None else settings.template,
        "chat_template": saved_template,
        "chat_template_sha256": None if template is None else template_sha256(saved_template),
        "max_seq_length": settings.max_seq_length, "eos_token": tokenizer.eos_token,
        "rows_read": read.rows_read, "bad_rows_skipped": len(read.bad_rows), "bad_rows": read.bad_rows[:20],
        "duplicates_removed": read.duplicates, "splits": {},
    }


def build(settings: DatasetSettings, tokenizer, outputs: dict[str, str | Path], workers: int = 1,
          image_inputs=None) -> dict[str, Any]:
    """Read, split, tokenize; write the ``train``, ``eval`` and ``test`` parquet files, ``stats`` (JSON) and
    ``lengths`` (PNG) to the paths ``outputs`` names. ``workers`` processes read and tokenize (the rows are the same,
    in the same order, for any number). ``image_inputs``: a vision-language model's (vision.ImageInputs); None for a
    text-only model, which refuses rows with images."""
    template = build_template(settings, tokenizer)
    outputs = {name: Path(outputs[name]) for name in OUTPUTS}
    images = ImageRows(image_inputs, outputs["train"].parent / "images") if image_inputs is not None else None
    encoder = BatchEncoder(template, tokenizer, settings.max_seq_length, settings, images)
    # Two passes over the files, so no split is ever held whole: count the good rows, then split and write them
    # (images are decoded in the first only).
    # JSONL files (UTF-8) are read by the workers, a piece at a time, and read again by where the rows kept are;
    # other files are read here.
    read = ReadResult([], [], 0, 0)
    image_sizes = ImageSizes()
    # a vision-language build reads here: the first pass keeps its images' sizes for the stats
    by_lines = images is None and all(jsonl_codec(path, settings.encoding) for path in settings.paths)
    with Workers(encoder, workers) as pool:
        if by_lines:
            rows = scan_jsonl(settings, encoder, pool, read)
            count = len(rows)
        else:
            count = sum(1 for record in iter_records(settings, read) if image_sizes.add(record))
        if not count:
            raise no_records_error(settings, read)
        labels = split_assignment(count, settings)
        stats = stats_head(settings, tokenizer, template, read)
        if image_sizes.images:
            stats["images"] = image_sizes.summary()
        batches = rows.batches(labels) if by_lines else \
            split_batches(iter_records(settings, ReadResult([], [], 0, 0), decode_images=False), labels)
        here = pool(-(-count // ENCODE_BATCH))
        with one_core_here(here is None):
            encoded = in_order(encoder, "encode_lines" if by_lines else "__call__", batches, here, pool.size)
            stats["splits"], lengths = write_splits(settings, encoded, count, outputs, images is not None)
    kept = sum(split["rows"] for split in stats["splits"].values())
    if read.rows_read and kept < read.rows_read * MOST_ROWS_DROPPED:
        warning = (f"{settings.source}: kept {kept} of {read.rows_read} rows ({len(read.bad_rows)} bad, "
                   f"{read.duplicates} duplicates, {read.rows_read - kept - len(read.bad_rows) - read.duplicates} "
                   "without a trainable token): more than half of the data is gone")
        print(f"warning: {warning}", file=sys.stderr)
        stats["warnings"] = [warning]
    plot_lengths(lengths, settings.max_seq_length, settings.source, outputs["lengths"])
    write_json(outputs["stats"], stats)
    return stats


class ImageSizes:
    """The images of the rows read: how many, and their sizes (stats.json's ``images``)."""

    def __init__(self):
        self.rows, self.widths, self.heights = 0, array("l"), array("l")

    @property
    def images(self) -> int:
        return len(self.widths)

    def add(self, record: Record) -> bool:
        """Count ``record``'s images."""
        if record.images:
            self.rows += 1
            self.widths.extend(width for width, _ in record.image_sizes)
            self.heights.extend(height for _, height in record.image_sizes)
        return True

    def summary(self) -> dict[str, Any]:
        return {"rows_with_images": self.rows, "images": self.images, "width": length_summary(self.widths),
                "height": length_summary(self.heights)}


def scan_jsonl(settings: DatasetSettings, encoder: BatchEncoder, pool: Workers, read: ReadResult) -> KeptRows:
    """The first pass over JSONL files: the workers read them a piece at a time (``scan_lines``), this process
    decides on each row in file order as ``iter_records`` does (``Admission``) and keeps where the good new ones
    are."""
    admission, kept = Admission(settings, read), KeptRows()
    pieces = ((file, *piece) for file, path in enumerate(settings.paths) for piece in line_pieces(path, SCAN_PIECE))
    size = sum(path.stat().st_size for path in settings.paths)
    here = pool(-(-size // SCAN_PIECE))
    numbers = [0] * len(settings.paths)
    stems = [path.stem for path in settings.paths]
    for file, found in in_order(encoder, "scan", pieces, here, pool.size):
        path = settings.paths[file]
        for index, line in enumerate(found.lines):
            read.rows_read += 1
            numbers[file] += 1
            try:
                if found.keys[index] is None:
                    raise BadRow(found.problems[index])
                row_id = found.ids[index] or f"{stems[file]}-{numbers[file]}"
                admission.check_id(path, line, row_id)
            except BadRow as problem:
                admission.bad(problem)
                continue
            if admission.admit(path, line, row_id, found.keys[index]):
                kept.append(file, found.offsets[index], line, numbers[file])
        if found.undecodable:
            raise decoding_error(path, "utf-8-sig")
    return kept


def write_splits(settings: DatasetSettings, encoded: Iterator[tuple[str, Any]], count: int,
                 outputs: dict[str, Path], images: bool = False) -> tuple[dict[str, dict], dict[str, array]]:
    """Write each encoded batch to its split's file (atomically: all three, or none), with a progress bar of rows
    per second and the time left on stderr (the job's log); return each split's stats and row lengths."""
    from tqdm import tqdm

    with ExitStack() as stack:
        writers = {name: SplitWriter(name, stack.enter_context(atomic_file(outputs[name])), settings, images)
                   for name in SPLITS}
        with tqdm(total=count, desc="tokenize", unit="row", file=sys.stderr, mininterval=1) as bar:
            for name, table in encoded:
                writers[name].write(table)
                bar.update(table.num_rows)
        splits = {name: writer.close() for name, writer in writers.items()}
        if not splits["train"]["rows"] and not settings.test_only:
            raise UserError(f"{settings.source}: no training row keeps a trainable token within max_seq_length")
    return splits, {name: writer.lengths for name, writer in writers.items()}


@dataclass
class MixPart:
    """One dataset of a mix: its name, weight and build (the files the dataset stage wrote for it)."""

    name: str
    weight: float
    train: Path
    eval: Path
    stats: Path


def mix_indices(rows: int, weight: float, rng: random.Random) -> list[int]:
    """The train rows a weight takes: every row ``int(weight)`` times, then a seeded sample of the fraction left
    (0.5: half of the rows, 2: every row twice), in file order."""
    whole = int(weight)
    sample = sorted(rng.sample(range(rows), round((weight - whole) * rows)))
    return [index for _ in range(whole) for index in range(rows)] + sample


def split_counts(table) -> dict[str, Any]:
    """The counts stats.json reports for a split, from its parquet table."""
    tokens = table.column("n_tokens").to_pylist()
    return {"rows": table.num_rows, "tokens": sum(tokens), "tokens_per_row_before_truncation": length_summary(tokens),
            "supervised_tokens": sum(table.column("n_supervised").to_pylist()),
            "truncated": sum(table.column("truncated").to_pylist()), "max_tokens": max(tokens, default=0)}


def build_mix(settings: DatasetSettings, parts: list[MixPart], test: Path,
              outputs: dict[str, str | Path]) -> dict[str, Any]:
    """Write a mix of built datasets: each part's train rows taken by its weight, every part's eval rows, and
    ``test`` (the first part's test split) as the test split. The parts must share the chat template their rows
    were rendered with (train saves it with the model)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    outputs = {name: Path(outputs[name]) for name in OUTPUTS}
    part_stats = [json.loads(part.stats.read_text(encoding="utf-8")) for part in parts]
    templates = {stats.get("chat_template") for stats in part_stats}
    if len(templates) > 1:
        raise UserError(f"mix: {', '.join(p.name for p in parts)} were rendered with different chat templates; "
                        "give them the same `template`")
    rng = random.Random(settings.seed)
    schema = split_schema(settings.ranking)
    train, taken = [], {}
    for part in parts:
        table = pq.read_table(part.train, schema=schema)
        indices = mix_indices(table.num_rows, part.weight, rng)
        train.append(table.take(pa.array(indices, pa.int64())))
        taken[part.name] = {"weight": part.weight, "train_rows": table.num_rows, "train_rows_taken": len(indices)}
    splits = {"train": pa.concat_tables(train),
              "eval": pa.concat_tables([pq.read_table(part.eval, schema=schema) for part in parts]),
              "test": pq.read_table(test, schema=schema)}
    if not splits["train"].num_rows:
        raise UserError(f"mix: the weights {dict(settings.mix)} take no training row")
    for name, table in splits.items():
        with atomic_file(outputs[name]) as tmp:
            pq.write_table(table, tmp)
    stats = {"mix": taken, "format": "mix", "ranking": settings.ranking, "template": part_stats[0].get("template"),
             "chat_template": part_stats[0].get("chat_template"),
             "chat_template_sha256": part_stats[0].get("chat_template_sha256"),
             "max_seq_length": max(stats["max_seq_length"] for stats in part_stats),
             "eos_token": part_stats[0].get("eos_token"), "test_split_from": parts[0].name,
             "splits": {name: split_counts(table) for name, table in splits.items()}}
    plot_lengths({name: table.column("n_tokens").to_pylist() for name, table in splits.items()},
                 stats["max_seq_length"], f"mix of {', '.join(taken)}", outputs["lengths"])
    write_json(outputs["stats"], stats)
    return stats
