"""Megatron-compatible memory-mapped indexed datasets (`PREFIX.bin` + `PREFIX.idx`, format `MMIDIDX`).

Layout (see ../shared/FORMATS.md and Megatron-LM `megatron/core/datasets/indexed_dataset.py`):
`.bin` holds every sequence's tokens back to back in one dtype; `.idx` holds a 9-byte magic, a uint64
version (1), a uint8 dtype code, uint64 sequence and document counts, then int32 sequence lengths,
int64 byte pointers into `.bin` and int64 document boundaries (cumulative sequence counts, starting 0).

Design choices:
- The reader maps both files once and hands out numpy views: opening costs O(1) Python objects
  whatever the number of sequences, and `ds[i]` is a zero-copy slice of the `.bin` map.
- The writer keeps memory constant: token ids go straight to `.bin`, lengths and document
  boundaries are spilled to side files and assembled into `.idx` chunk by chunk at close.
- Nothing appears under the final names until the writer closes cleanly: it writes `*.tmp` files
  and renames them (`.bin` first, then the optional JSON manifest, `.idx` last: the `.idx` is the commit
  marker), so a killed run never leaves a valid-looking pair.
- The writer records what a reader checks before trusting the files (`integrity()`, which it adds to the
  manifest it writes): the largest token id, and an xxh3-128 checksum of `.bin` (hashed as it is written, no
  second pass; re-read once when a killed build resumes) and of `.idx` (hashed once at close). xxh3 because
  the checksums guard against damage, not an adversary, and it hashes ~10 GB/s where sha256 does ~1 GB/s
  (docs/PERFORMANCE.md), so a reader can check an index of many GB at every start.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from pathlib import Path
from types import TracebackType

import numpy as np
import xxhash

from common.errors import UserError
from common.files import write_json_atomic

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count

DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}

_CHUNK = 1 << 20  # entries per chunk when assembling the index
_READ = 1 << 24  # bytes per read when hashing a file
CHECKSUM = "xxh3_128"  # the checksum algorithm named in the manifest's `integrity` keys


def checksum(path: str | os.PathLike, nbytes: int | None = None) -> str:
    """xxh3-128 of a file (of its first `nbytes` bytes), as hex."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        left = os.fstat(f.fileno()).st_size if nbytes is None else nbytes
        while left > 0 and (block := f.read(min(_READ, left))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


class IndexedDatasetError(UserError):
    """A `.bin`/`.idx` pair that is missing, truncated or inconsistent."""


class ResumeError(Exception):
    """The temporary files of a killed writer cannot be resumed (the caller starts over)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (Megatron's rule: vocabulary below 65500), int32 otherwise.

    Not uint32: Megatron's MMIDIDX has no code for it (its `DType` stops at uint16 = 8), and int32 holds
    ids up to 2**31 - 1, far beyond any vocabulary."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def paths(prefix: str | os.PathLike) -> tuple[Path, Path, Path]:
    """`(PREFIX.bin, PREFIX.idx, PREFIX.json)`."""
    p = str(prefix)
    return Path(p + ".bin"), Path(p + ".idx"), Path(p + ".json")


def exists(prefix: str | os.PathLike) -> bool:
    """True when any file of the dataset (`.bin`, `.idx` or manifest) is present."""
    return any(p.exists() for p in paths(prefix))


def expand(name: str) -> list[str]:
    """The dataset prefixes one `--data NAME` stands for, sorted:

    - NAME itself when `NAME.idx` exists;
    - else its shards `NAME_00000`, `NAME_00001`, ... as `bert-prep build --shards K` writes them (all K that
      the first shard's manifest records must be there);
    - else, when NAME holds a glob character (`*?[`), every prefix whose `.idx` matches NAME or `NAME.idx`
      (`'data/*'`, `'data/wiki_*'`; temporary files of a running build never match).
    UserError when NAME names nothing."""
    if Path(name + ".idx").is_file():
        return [name]
    shards = []
    while Path(f"{name}_{len(shards):05d}.idx").is_file():
        shards.append(f"{name}_{len(shards):05d}")
    if shards:
        try:
            recorded = int(json.loads(Path(shards[0] + ".json").read_text()).get("shards", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            recorded = 0
        if recorded > len(shards):
            raise UserError(
                f"--data {name}: shard {name}_{len(shards):05d} is missing ({shards[0]}.json records {recorded} "
                "shards); restore it or rebuild the dataset"
            )
        return shards
    if glob.has_magic(name):
        matches = glob.glob(name) + glob.glob(name + ".idx")
        found = sorted({m[: -len(".idx")] for m in matches if m.endswith(".idx") and Path(m).is_file()})
        if found:
            return found
    raise UserError(
        f"dataset {name}.bin/.idx does not exist (nor shards {name}_00000..., nor a glob match); pass a PREFIX "
        "written by `bert-prep build`"
    )


class IndexedDataset:
    """Read-only view of `PREFIX.bin/.idx`: `len(ds)`, `ds[i]` (a numpy view), document boundaries."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        bin_path, idx_path, _ = paths(prefix)
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise IndexedDatasetError(f"{p} does not exist; pass the dataset prefix written by `bert-prep build`")
        self._idx = _map(idx_path)
        if len(self._idx) < HEADER_BYTES or bytes(self._idx[: len(MAGIC)]) != MAGIC:
            raise IndexedDatasetError(f"{idx_path} is not an MMIDIDX index (bad magic or truncated header)")
        version, code, n, d = struct.unpack("<QBQQ", bytes(self._idx[len(MAGIC) : HEADER_BYTES]))
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_path} has index version {version}; only version {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path} has unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        need = HEADER_BYTES + 4 * n + 8 * n + 8 * d
        if len(self._idx) not in (need, need + n):  # + n: optional int8 sequence modes (multimodal)
            raise IndexedDatasetError(
                f"{idx_path} is truncated or corrupted: {len(self._idx)} bytes, expected {need} for {n} sequences"
            )
        off = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(self._idx, np.int32, n, off)
        self.sequence_pointers = np.frombuffer(self._idx, np.int64, n, off + 4 * n)
        self.document_indices = np.frombuffer(self._idx, np.int64, d, off + 12 * n)
        self._bin = _map(bin_path)
        if n:
            end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
            if end > len(self._bin):
                raise IndexedDatasetError(
                    f"{bin_path} is truncated: the index needs {end} bytes, the file has {len(self._bin)}"
                )
        self.tokens = np.frombuffer(self._bin, self.dtype, len(self._bin) // self.dtype.itemsize)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        """Tokens of sequence `i`, a read-only view into the memory map."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sequence_lengths[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence `i` (the Megatron reader's `get`)."""
        seq = self[i]
        return seq[offset:] if length is None else seq[offset : offset + length]

    @property
    def num_documents(self) -> int:
        return max(len(self.document_indices) - 1, 0)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def document(self, j: int) -> range:
        """Sequence indices of document `j`."""
        return range(int(self.document_indices[j]), int(self.document_indices[j + 1]))

    @property
    def manifest(self) -> dict:
        """`PREFIX.json` written by `bert-prep build` ({} when absent, e.g. for Megatron-written data)."""
        path = paths(self.prefix)[2]
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise IndexedDatasetError(f"{path} is not a readable JSON manifest ({e}); rebuild the dataset") from e


def _map(path: Path) -> memoryview | np.ndarray:
    """Read-only map of a whole file (an empty buffer for an empty file, which mmap refuses)."""
    if path.stat().st_size == 0:
        return np.zeros(0, np.uint8)
    return np.memmap(path, np.uint8, mode="r")


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
            while block := f.read(_READ - _READ % self.dtype.itemsize):
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
