"""Tokenized rows for training, memory-mapped from an Arrow file instead of held as Python lists.

A million rows of token ids as Python lists take tens of GB (every int an object); as Arrow int32 arrays in a
file mapped into memory they take the file's size on disk and only the pages a step reads in RAM. The parquet
split is converted once, one row group at a time, into ``cache`` (an uncompressed Arrow IPC file), and every
process of a run maps the same file.
"""

from __future__ import annotations

import os
from pathlib import Path

COLUMNS = ("input_ids", "labels")


def convert(parquet: Path, cache: Path) -> Path:
    """Write ``parquet``'s token columns to ``cache`` as int32 Arrow IPC, a row group at a time (atomic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = pq.ParquetFile(parquet)
    images = ["images"] if "images" in source.schema_arrow.names else []  # a vision-language build's image paths
    schema = pa.schema([(name, pa.list_(pa.int32())) for name in COLUMNS]
                       + [(name, pa.list_(pa.string())) for name in images])
    partial = cache.with_name(f".{cache.name}.partial")
    with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for group in range(source.num_row_groups):
            table = source.read_row_group(group, columns=list(COLUMNS) + images)
            writer.write_table(table.cast(schema))
    os.replace(partial, cache)
    return cache


class TokenRows:
    """Rows of a tokenized split as dicts of int lists (and a vision-language build's image paths), read from a
    memory-mapped Arrow file."""

    def __init__(self, parquet: str | Path, cache: str | Path | None = None):
        import pyarrow as pa
        import pyarrow.compute as pc

        cache = Path(cache) if cache else Path(parquet).with_suffix(".arrow")
        if not cache.is_file() or cache.stat().st_mtime < Path(parquet).stat().st_mtime:  # none, or of older data
            convert(Path(parquet), cache)
        self.table = pa.ipc.open_file(pa.memory_map(str(cache))).read_all()  # maps, reads nothing yet
        self.input_ids = self.table.column("input_ids")
        self.labels = self.table.column("labels")
        self.lengths = pc.list_value_length(self.input_ids).to_numpy()  # tokens per row, for packing
        self.images = self.table.column("images") if "images" in self.table.column_names else None

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> dict[str, list]:
        row = {"input_ids": self.input_ids[index].values.to_numpy().tolist(),
               "labels": self.labels[index].values.to_numpy().tolist()}
        if self.images is not None:
            row["images"] = self.images[index].as_py()
        return row
