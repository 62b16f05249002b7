"""Parquet and Arrow inputs: the texts of one string column, streamed in record batches.

- Parquet: `ParquetFile.iter_batches` over the text column alone, through a 1 MB read buffer (pages stream
  through it; without it pyarrow would read whole column chunks), in batches sized to hold about
  `max_bytes` of text (measured on the first rows), so memory follows `--chunk-mb` as for text files.
- Arrow: an IPC stream (what `datasets.save_to_disk` writes) or file, memory-mapped; each record batch is
  zero-copy and is converted to Python strings in slices of about `max_bytes` of text.
- A corrupt file, a missing column or a non-string column is a `UserError` naming the file and the column,
  raised before a row is read when the footer or schema shows it, else at the batch that shows it.
- A null row reads as an empty one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc
import pyarrow.parquet as pq

from common.errors import UserError
from data_prep.inputs import Input, ReadStats

_READ_BUFFER = 1 << 20
_MAX_BATCH_ROWS = 65536
_ERRORS = (pa.ArrowException, OSError, UnicodeDecodeError)


def rows(inp: Input, key: str, stats: ReadStats, done: int, max_bytes: int) -> Iterator[str]:
    """The texts of column `key` of one Parquet or Arrow file, in row order; `stats` follows the reading."""
    read = _parquet_batches if inp.format == "parquet" else _arrow_batches
    batches = read(inp.path, key, stats, done, max_bytes)
    try:
        for column in batches:
            column = _as_text(column)
            stats.text_bytes += pc.sum(pc.binary_length(column)).as_py() or 0
            yield from (t if t is not None else "" for t in column.to_pylist())
    except _ERRORS as e:
        raise UserError(f"{inp.path} column {key!r} could not be read ({_first_line(e)}); check the file") from e
    finally:
        batches.close()


def _parquet_batches(path: Path, key: str, stats: ReadStats, done: int, max_bytes: int) -> Iterator[pa.Array]:
    try:
        pf = pq.ParquetFile(path, buffer_size=_READ_BUFFER, pre_buffer=False)
    except _ERRORS as e:
        raise UserError(f"{path} is not a readable Parquet file ({_first_line(e)}); check --format and the file") from e
    with pf:
        _text_column(pf.schema_arrow, path, key)
        total, size, rows_done = pf.metadata.num_rows, path.stat().st_size, 0
        try:
            for batch in pf.iter_batches(batch_size=_probe_rows(pf, key, max_bytes), columns=[key], use_threads=False):
                yield batch.column(0)
                rows_done += batch.num_rows
                stats.bytes_read = done + size * rows_done // max(total, 1)
        except _ERRORS as e:
            raise UserError(f"{path} column {key!r} could not be read ({_first_line(e)}); check the file") from e


def _probe_rows(pf: pq.ParquetFile, key: str, max_bytes: int) -> int:
    """Rows per batch that hold about `max_bytes` of text, measured on the file's first rows (the metadata's
    sizes are those of the encoded pages: a dictionary-encoded column would look far smaller than it is)."""
    if not max_bytes or not pf.metadata.num_rows:
        return 1024
    first = next(pf.iter_batches(batch_size=64, columns=[key], use_threads=False))
    column = _as_text(first.column(0))
    return _batch_rows(pc.sum(pc.binary_length(column)).as_py() or 0, len(column), max_bytes)


def _arrow_batches(path: Path, key: str, stats: ReadStats, done: int, max_bytes: int) -> Iterator[pa.Array]:
    try:
        source = pa.memory_map(str(path))
        is_file = source.read(6) == b"ARROW1"
        source.seek(0)
        reader = pa.ipc.open_file(source) if is_file else pa.ipc.open_stream(source)
    except _ERRORS as e:
        raise UserError(f"{path} is not a readable Arrow file ({_first_line(e)}); check --format and the file") from e
    size = path.stat().st_size
    try:
        index = reader.schema.get_field_index(_text_column(reader.schema, path, key))
        n = reader.num_record_batches if is_file else None
        batches = (reader.get_batch(i) for i in range(n)) if is_file else reader
        for i, batch in enumerate(batches):
            column = batch.column(index)
            step = _batch_rows(column.nbytes, len(column), max_bytes)
            for start in range(0, len(column), step):
                yield column.slice(start, step)
            stats.bytes_read = done + (size * (i + 1) // max(n, 1) if is_file else min(source.tell(), size))
    except _ERRORS as e:
        raise UserError(f"{path} column {key!r} could not be read ({_first_line(e)}); check the file") from e
    finally:
        source.close()


def _as_text(column: pa.Array) -> pa.Array:
    """A string or large_string array (dictionary and string_view columns converted: the length kernel
    wants offsets)."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = column.cast(pa.large_string())
    return column


def _text_column(schema: pa.Schema, path: Path, key: str) -> str:
    """`key`, once the schema shows it is a string column."""
    if key not in schema.names:
        names = ", ".join(repr(n) for n in schema.names[:8]) + (", ..." if len(schema.names) > 8 else "")
        raise UserError(f"{path} has no column {key!r} (it has {names}); set --text-key to the text column")
    kind = schema.field(key).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise UserError(f"{path} column {key!r} holds {kind}, not text; set --text-key to a string column")
    return key


def _batch_rows(text_bytes: int, num_rows: int, max_bytes: int) -> int:
    """Rows per batch that hold about `max_bytes` of text (1024 rows when unbounded or unknown)."""
    if not max_bytes or not text_bytes or not num_rows:
        return 1024
    return int(min(max(max_bytes * num_rows // text_bytes, 1), _MAX_BATCH_ROWS))


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]
