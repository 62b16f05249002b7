"""Is a dataset what `bert-prep build` wrote? The checks `bert-pretrain` runs before step 1.

The manifest (format_version 2) carries an `integrity` entry written by `IndexedDatasetWriter.close`:
`max_token_id`, `bin_bytes`, `bin_xxh3_128`, `index_bytes`, `index_xxh3_128`. `check(ds, manifest, vocab)`:

1. the index is consistent in itself and with the `.bin` size (`check_index`: lengths non-negative,
   pointers the running sum of the lengths from 0, the last sequence inside the `.bin`, document indices
   increasing from 0 to the sequence count); O(sequences), vectorized, chunked;
2. the recorded largest id is inside the vocabulary; the index's size and checksum are the recorded ones;
3. the tokens are scanned against `min(vocab_size - 1, max_token_id)`: the whole `.bin` when it holds at most
   `FULL_SCAN_BYTES` (then its checksum is compared too), else `SAMPLE_BLOCKS` blocks of `SAMPLE_BLOCK_BYTES`
   evenly spread over it (always the same blocks: every rank and every relaunch checks alike).

Each failure is one `UserError` naming the file and, for a bad token, its document and sequence. A bad
token outside the scanned blocks, or written after the start, is met when a sample reads it
(`pretrain.data` skips that sample). A format_version 1 manifest (no `integrity`) is accepted with one
warning and only the token scan (against the vocabulary); `bert-prep inspect PREFIX --write-manifest`
upgrades it (`record(ds)`, a full read). Data written by Megatron has no manifest: `--write-manifest`
scans it the same way.
"""

from __future__ import annotations

import warnings

import numpy as np

from common.errors import UserError
from data_prep import indexed

FULL_SCAN_BYTES = 256 << 20  # a .bin up to this size is read whole at start (well under a second)
SAMPLE_BLOCKS = 256  # larger ones: this many blocks ...
SAMPLE_BLOCK_BYTES = 256 << 10  # ... of this size (64 MiB in all), evenly spread
_CHUNK = 1 << 24  # entries per vectorized pass
_INTEGRITY_KEYS = ("max_token_id", "bin_bytes", "index_bytes", f"index_{indexed.CHECKSUM}")


def check_index(ds: indexed.IndexedDataset, exact: bool = False) -> None:
    """Raise UserError naming the first inconsistency of the index in itself or with the `.bin` size.

    `exact` (`bert-prep inspect --verify`) also wants the `.bin` to end where the last sequence ends and every
    document to hold a sequence; training needs neither."""
    bin_path, idx_path, _ = indexed.paths(ds.prefix)
    n, item, size = len(ds), ds.dtype.itemsize, bin_path.stat().st_size
    lengths, pointers, docs = ds.sequence_lengths, ds.sequence_pointers, ds.document_indices
    end = 0
    for i in range(0, n, _CHUNK):
        ln = lengths[i : i + _CHUNK].astype(np.int64)
        if (ln < 0).any():
            j = i + int(np.argmax(ln < 0))
            raise UserError(f"{idx_path}: sequence {j} has negative length {int(lengths[j])}; the index is corrupt")
        expected = end + np.cumsum(ln * item) - ln * item
        bad = np.flatnonzero(pointers[i : i + _CHUNK] != expected)
        if len(bad):
            j = i + int(bad[0])
            raise UserError(
                f"{idx_path}: sequence {j} points to byte {int(pointers[j])}, expected {int(expected[bad[0]])} "
                "(lengths and pointers disagree); the index is corrupt, rebuild the dataset"
            )
        end = int(expected[-1] + ln[-1] * item)
    if end > size or (exact and end != size):
        raise UserError(f"{bin_path} has {size} bytes but the index describes {end}; rebuild it")
    if len(docs) == 0 or docs[0] != 0 or docs[-1] != n or (np.diff(docs) < (1 if exact else 0)).any():
        raise UserError(
            f"{idx_path}: document boundaries must increase from 0 to {n}; the index is corrupt, rebuild it"
        )


def record(ds: indexed.IndexedDataset) -> dict:
    """The `integrity` entry of a dataset written without one (an old manifest, Megatron data): a full read."""
    bin_path, idx_path, _ = indexed.paths(ds.prefix)
    top = -1  # no token at all
    for i in range(0, len(ds.tokens), _CHUNK):
        top = max(top, int(ds.tokens[i : i + _CHUNK].max()))
    return {
        "max_token_id": top,
        "bin_bytes": bin_path.stat().st_size,
        f"bin_{indexed.CHECKSUM}": indexed.checksum(bin_path),
        "index_bytes": idx_path.stat().st_size,
        f"index_{indexed.CHECKSUM}": indexed.checksum(idx_path),
    }


def check(ds: indexed.IndexedDataset, manifest: dict, vocab_size: int, full_scan_bytes: int = FULL_SCAN_BYTES) -> int:
    """Run the start checks of the module docstring; return the largest id a sample may hold."""
    bin_path, idx_path, json_path = indexed.paths(ds.prefix)
    check_index(ds)
    entry = manifest.get("integrity")
    if entry is None:
        warnings.warn(
            f"{json_path} is a format_version {manifest.get('format_version', 1)} manifest without checksums or the "
            f"largest token id; checking the ids against the vocabulary only. Upgrade it with `bert-prep inspect "
            f"{ds.prefix} --verify --write-manifest`",
            stacklevel=2,
        )
        limit = vocab_size - 1
    else:
        limit = _check_recorded(ds, entry, vocab_size, manifest.get("tokenizer", {}).get("path"))
    whole = len(ds.tokens) * ds.dtype.itemsize <= full_scan_bytes
    _scan(ds, limit, vocab_size, whole)
    key = f"bin_{indexed.CHECKSUM}"
    if whole and entry and key in entry and indexed.checksum(bin_path) != entry[key]:
        raise UserError(
            f"{bin_path} does not match the checksum in {json_path}: its tokens changed after the build; "
            "restore the file or rebuild the dataset"
        )
    return limit


def _check_recorded(ds: indexed.IndexedDataset, entry: dict, vocab_size: int, tokenizer: str | None) -> int:
    """Compare the index and the recorded largest id with the manifest; the largest id a sample may hold."""
    bin_path, idx_path, json_path = indexed.paths(ds.prefix)
    missing = [k for k in _INTEGRITY_KEYS if k not in entry]
    if missing:
        raise UserError(f"{json_path} lacks integrity field {missing[0]}; rebuild the dataset or re-write its manifest")
    top = int(entry["max_token_id"])
    if top >= vocab_size:
        raise UserError(
            f"{json_path} records token id {top}, outside the vocabulary of {vocab_size} ids ({tokenizer}); "
            "rebuild the dataset with the tokenizer the model is trained with"
        )
    if bin_path.stat().st_size != int(entry["bin_bytes"]):
        raise UserError(
            f"{bin_path} has {bin_path.stat().st_size} bytes, {json_path} records {entry['bin_bytes']}; "
            "the file changed after the build: restore it or rebuild the dataset"
        )
    key = f"index_{indexed.CHECKSUM}"
    if idx_path.stat().st_size != int(entry["index_bytes"]) or indexed.checksum(idx_path) != entry[key]:
        raise UserError(
            f"{idx_path} does not match the checksum in {json_path}: the index changed after the build; "
            "restore it or rebuild the dataset"
        )
    return min(top, vocab_size - 1)


def blocks(ds: indexed.IndexedDataset, whole: bool) -> list[tuple[int, int]]:
    """`(first token, token count)` of the scanned blocks: all of `.bin`, or the sampled blocks."""
    n = len(ds.tokens)
    if whole:
        return [(i, min(_CHUNK, n - i)) for i in range(0, n, _CHUNK)]
    size = SAMPLE_BLOCK_BYTES // ds.dtype.itemsize
    starts = np.linspace(0, max(n - size, 0), SAMPLE_BLOCKS).astype(np.int64)
    return [(int(s), min(size, n - int(s))) for s in np.unique(starts)]


def _scan(ds: indexed.IndexedDataset, limit: int, vocab_size: int, whole: bool) -> None:
    signed = ds.dtype.kind == "i"
    for first, count in blocks(ds, whole):
        tokens = ds.tokens[first : first + count]
        if count and (int(tokens.max()) > limit or (signed and int(tokens.min()) < 0)):
            at = first + int(np.argmax((tokens > limit) | (tokens < 0)))
            raise UserError(
                f"{bad_token_message(ds, at, limit, vocab_size)}: the file is damaged; restore it or rebuild it"
            )


def locate(ds: indexed.IndexedDataset, token: int) -> tuple[int, int]:
    """`(document, sequence)` holding token number `token` of `.bin`."""
    starts = ds.sequence_pointers // ds.dtype.itemsize
    seq = max(int(np.searchsorted(starts, token, side="right")) - 1, 0)
    doc = max(int(np.searchsorted(ds.document_indices, seq, side="right")) - 1, 0)
    return doc, seq


def bad_token_message(ds: indexed.IndexedDataset, token: int, limit: int, vocab_size: int) -> str:
    """ "PREFIX.bin: document d (sequence s) holds token id x, outside ..." for token number `token`."""
    doc, seq = locate(ds, token)
    value = int(ds.tokens[token])
    where = (
        f"outside the vocabulary of {vocab_size} ids"
        if not 0 <= value < vocab_size
        else f"above the largest id {limit} recorded when the dataset was built"
    )
    return f"{indexed.paths(ds.prefix)[0]}: document {doc} (sequence {seq}) holds token id {value}, {where}"
