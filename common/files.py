"""Files that are either absent or complete: written through a temporary file, fsynced, then renamed."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import xxhash

from common.errors import UserError

READ_BYTES = 1 << 24  # bytes per read when hashing a file


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it and a rename: a crash leaves the old file or
    the new one. The temporary name is unique (`path.tmp-PID-RANDOM.tmp`), so two writers of one path never write
    into each other's temporary file; the last rename wins."""
    tmp = Path(f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # `*.tmp`: swept by bert-prep
    try:
        with open(tmp, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: dict) -> None:
    """`obj` as indented JSON, atomically (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def json_lines(path: str | os.PathLike, hint: str) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line of a JSON Lines file; a line that is not JSON is a one-line
    `UserError` naming the file and line, then `hint` (what the file should be)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n} is not JSON ({e.msg}); {hint}") from None


def xxh3_file(path: str | os.PathLike, nbytes: int | None = None, sync: bool = False) -> str:
    """XXH3-128 of a file (of its first `nbytes` bytes), as hex: the checksum of datasets and checkpoints.
    `sync` also fsyncs the file while its pages are at hand."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        left = os.fstat(f.fileno()).st_size if nbytes is None else nbytes
        while left > 0 and (block := f.read(min(READ_BYTES, left))):
            h.update(block)
            left -= len(block)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()
