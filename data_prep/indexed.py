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

import numpy as np

from common.errors import UserError
from common.files import xxh3_file

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

CHECKSUM = "xxh3_128"  # the checksum algorithm named in the manifest's `integrity` keys


def checksum(path: str | os.PathLike, nbytes: int | None = None) -> str:
    """xxh3-128 of a file (of its first `nbytes` bytes), as hex."""
    return xxh3_file(path, nbytes)


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
