"""`IndexedDatasetWriter`: writes the MMIDIDX pair (`PREFIX.bin` + `PREFIX.idx`, data_prep/indexed.py has the
layout and the reader) in constant memory, atomically, with the checksums a reader verifies; a killed build
resumes from its recorded `state()`.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import TracebackType

import numpy as np
import xxhash

from common.files import READ_BYTES, write_json_atomic
from data_prep.indexed import (
    CHECKSUM,
    CODE_OF_DTYPE,
    HEADER_BYTES,
    MAGIC,
    VERSION,
    ResumeError,
    checksum,
    paths,
)

_CHUNK = 1 << 20  # entries per chunk when assembling the index


class IndexedDatasetWriter:
    """Write a dataset sentence by sentence; use as a context manager.

    >>> with IndexedDatasetWriter("out/wiki", np.uint16) as w:
    ...     w.add_sequence([101, 7592]); w.add_sequence([2088]); w.end_document()

    On a clean exit the files are renamed into place; on an exception the temporary files are removed.
    """

    def __init__(
        self, prefix: str | os.PathLike, dtype: np.dtype | type, tmp_suffix: str = ".tmp", resume: dict | None = None
    ):
        """With `resume` (a `state()` of a writer of the same prefix that was killed later), its temporary
        files are reopened and cut back to that state; `ResumeError` when they no longer hold it."""
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        bin_path, idx_path, _ = paths(prefix)
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._final = (bin_path, idx_path)
        self._tmp = [Path(str(p) + tmp_suffix) for p in (bin_path, idx_path)]
        self._side = [Path(str(idx_path) + s + tmp_suffix) for s in (".lengths", ".docs")]
        state = resume or {"sequences": 0, "documents": 0, "tokens": 0, "doc_end": 0, "single": 0}
        self.num_sequences, self.num_documents = int(state["sequences"]), int(state["documents"])
        self.num_tokens, self._doc_end = int(state["tokens"]), int(state["doc_end"])
        self.single_sequence_documents = int(state["single"])  # documents of one sequence (NSP skips them)
        self.max_token_id = -1  # largest id written (-1: none yet)
        self._bin_hash = xxhash.xxh3_128()
        self._idx_hash: str | None = None
        self._closed = False
        if resume is None:
            self._bin, self._lengths, self._docs = (open(p, "wb") for p in (self._tmp[0], *self._side))
            self._docs.write(np.int64(0).tobytes())
            return
        sizes = self._sizes()
        if any(not p.is_file() or p.stat().st_size < n for p, n in zip((self._tmp[0], *self._side), sizes)):
            raise ResumeError(f"the temporary files of {self.prefix} are missing or shorter than recorded")
        self._bin, self._lengths, self._docs = (open(p, "r+b") for p in (self._tmp[0], *self._side))
        for f, n in zip((self._bin, self._lengths, self._docs), sizes):
            f.truncate(n)
            f.seek(n)
        self._digest_written()

    def _digest_written(self) -> None:
        """Hash and scan the `.bin` bytes a killed writer left (one read), as if this writer had written them."""
        with open(self._tmp[0], "rb") as f:
            while block := f.read(READ_BYTES - READ_BYTES % self.dtype.itemsize):
                self._digest(np.frombuffer(block, self.dtype))

    def _digest(self, ids: np.ndarray) -> None:
        self._bin_hash.update(np.ascontiguousarray(ids))
        if len(ids):
            self.max_token_id = max(self.max_token_id, int(ids.max()))

    def integrity(self) -> dict:
        """The manifest's `integrity` entry (after `close`): largest id, file sizes and checksums."""
        if self._idx_hash is None:
            raise RuntimeError("integrity() is known only once the writer has closed")
        return {
            "max_token_id": self.max_token_id,
            "bin_bytes": self.num_tokens * self.dtype.itemsize,
            f"bin_{CHECKSUM}": self._bin_hash.hexdigest(),
            "index_bytes": self._index_bytes(),
            f"index_{CHECKSUM}": self._idx_hash,
        }

    def _index_bytes(self) -> int:
        return HEADER_BYTES + 12 * self.num_sequences + 8 * (self.num_documents + 1)

    def _sizes(self) -> tuple[int, int, int]:
        """Bytes of `.bin`, of the lengths and of the document boundaries written so far."""
        return self.num_tokens * self.dtype.itemsize, 4 * self.num_sequences, 8 * (self.num_documents + 1)

    def state(self, sync: bool = False) -> dict:
        """Where the writer is, for `resume` after a kill; flushes (and with `sync` fsyncs) its files first."""
        for f in (self._bin, self._lengths, self._docs):
            f.flush()
            if sync:
                os.fsync(f.fileno())
        return {
            "sequences": self.num_sequences,
            "documents": self.num_documents,
            "tokens": self.num_tokens,
            "doc_end": self._doc_end,
            "single": self.single_sequence_documents,
        }

    def detach(self) -> None:
        """Close the files but keep them (an interrupted build that can be resumed)."""
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        self._closed = True

    def add_sequence(self, ids: np.ndarray | list[int]) -> None:
        """Append one sequence (for BERT data: one sentence of WordPiece ids)."""
        arr = np.asarray(ids, dtype=self.dtype)
        self._digest(arr)
        self._bin.write(arr.tobytes())
        self._lengths.write(np.int32(len(arr)).tobytes())
        self.num_sequences += 1
        self.num_tokens += len(arr)

    def add_sequences(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append many sequences at once: their ids concatenated, and each one's length."""
        ids = np.asarray(ids, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(lengths.sum(dtype=np.int64)) != len(ids):
            raise ValueError("lengths do not add up to the number of ids")
        self._digest(ids)
        self._bin.write(ids.tobytes())
        self._lengths.write(lengths.tobytes())
        self.num_sequences += len(lengths)
        self.num_tokens += len(ids)

    def add_documents(
        self, ids: np.ndarray, lengths: np.ndarray, document_lengths: np.ndarray, open_last: bool = False
    ) -> None:
        """Append whole documents at once: ids, each sequence's length, each document's sequence count.

        Like `add_sequence` then `end_document` per document: the first document continues one left open
        by earlier calls, documents without sequences are skipped, and with `open_last` the last document
        stays open for the next call.
        """
        document_lengths = np.asarray(document_lengths, dtype=np.int64)
        if int(document_lengths.sum()) != len(lengths) or (document_lengths < 0).any():
            raise ValueError("document_lengths must be non-negative and add up to the number of sequences")
        ends = self.num_sequences + np.cumsum(document_lengths)
        self.add_sequences(ids, lengths)
        ends = np.unique(ends[:-1] if open_last else ends)
        ends = ends[ends > self._doc_end]
        self._docs.write(ends.tobytes())
        self.num_documents += len(ends)
        self.single_sequence_documents += int((np.diff(ends, prepend=self._doc_end) == 1).sum())
        if len(ends):
            self._doc_end = int(ends[-1])

    def end_document(self) -> None:
        """Close the current document (a no-op when it holds no sequence)."""
        if self.num_sequences == self._doc_end:
            return
        self._docs.write(np.int64(self.num_sequences).tobytes())
        self.num_documents += 1
        self.single_sequence_documents += self.num_sequences - self._doc_end == 1
        self._doc_end = self.num_sequences

    def close(self, manifest: dict | None = None) -> None:
        """Assemble `.idx`, then rename the files into place: `.bin`, the manifest (if given, with `integrity()`
        added under "integrity"), `.idx` last."""
        if self._closed:
            return
        self.end_document()
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        with open(self._tmp[1], "wb") as idx:
            idx.write(MAGIC)
            idx.write(
                struct.pack("<QBQQ", VERSION, CODE_OF_DTYPE[self.dtype], self.num_sequences, self.num_documents + 1)
            )
            _copy(self._side[0], idx)
            lengths = np.memmap(self._side[0], np.int32, mode="r") if self.num_sequences else np.zeros(0, np.int32)
            start = 0
            for i in range(0, len(lengths), _CHUNK):
                sizes = lengths[i : i + _CHUNK].astype(np.int64) * self.dtype.itemsize
                ptr = np.cumsum(sizes) - sizes + start
                start = int(ptr[-1] + sizes[-1])
                idx.write(ptr.tobytes())
            del lengths
            _copy(self._side[1], idx)
            idx.flush()
            os.fsync(idx.fileno())
        self._idx_hash = checksum(self._tmp[1])
        for p in self._side:
            p.unlink()
        os.replace(self._tmp[0], self._final[0])
        if manifest is not None:
            manifest["integrity"] = self.integrity()
            write_json_atomic(paths(self.prefix)[2], manifest)
        os.replace(self._tmp[1], self._final[1])
        self._closed = True

    def abort(self) -> None:
        """Drop everything written so far."""
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        for p in (*self._tmp, *self._side):
            p.unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _copy(src: Path, dst) -> None:
    with open(src, "rb") as f:
        while block := f.read(1 << 24):
            dst.write(block)
