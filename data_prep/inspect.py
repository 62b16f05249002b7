"""`bert-prep inspect`: counts, dtype, length histogram and sample sentences of a dataset; `--verify`.

`--verify` checks every index entry against the `.bin` and the manifest in vectorized numpy passes over
the memory maps (chunked, so a dataset larger than RAM is fine) and stops at the first inconsistency with
a one-line error: pointers must be the running sum of the lengths, the last sequence must end exactly at
the end of `.bin`, document boundaries must be increasing from 0 to the sequence count, every id must be
below the vocabulary size, and the counts and dtype must equal the manifest's.

With a format_version 2 manifest, `--verify` also compares the recorded checksums of `.idx` and `.bin` and
the largest token id (data_prep/integrity.py). A format_version 1 manifest (no checksums) is checked as
before, and `--verify --write-manifest` upgrades it to version 2 (a full read of both files).

Data written by Megatron's `preprocess_data.py` has no manifest: `--verify` then checks the index against
the `.bin`, and the ids against `--tokenizer`'s vocabulary when one is given; `--write-manifest` adds the
manifest (`adopted: true`, no sources, the integrity entry of a full read) so `bert-pretrain` can train on it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from common.errors import UserError
from common.files import write_json_atomic
from common.flags import add_command, option
from common.log import get_logger
from data_prep import indexed, integrity, tokenizer

log = get_logger(__name__)

_CHUNK = 1 << 24  # entries per verification pass


def histogram(lengths: np.ndarray, width: int = 40) -> list[str]:
    """Text histogram of sequence lengths in power-of-two buckets."""
    if len(lengths) == 0:
        return []
    edges = [0, 1] + [2**k for k in range(1, max(int(lengths.max()), 1).bit_length() + 1)]
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(int(counts.max()), 1)
    rows = []
    for lo, hi, c in zip(edges[:-1], edges[1:], counts):
        bar = "#" * round(width * int(c) / top)
        rows.append(f"  {lo:>6}-{hi - 1:<6} {int(c):>12,} {bar}")
    return rows


def verify(ds: indexed.IndexedDataset, vocab_size: int | None = None) -> None:
    """Raise UserError naming the first inconsistency between the index, the `.bin` and the manifest.

    Without a manifest, ids are checked against `vocab_size` when it is given.
    """
    json_path = indexed.paths(ds.prefix)[2]
    integrity.check_index(ds, exact=True)
    if ds.manifest:
        _verify_manifest(ds, ds.manifest, json_path)
    elif vocab_size is not None:
        _verify_ids(ds, vocab_size)


def _verify_manifest(ds: indexed.IndexedDataset, manifest: dict, json_path) -> None:
    try:
        counts, tok = manifest["counts"], manifest["tokenizer"]
        vocab_size = int(tok["vocab_size"])
        want = {"documents": ds.num_documents, "sentences": len(ds), "tokens": ds.num_tokens}
        dtype = manifest["dtype"]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{json_path} lacks field {e} of a bert-prep manifest; rebuild the dataset") from e
    for key, value in want.items():
        if int(counts.get(key, -1)) != value:
            raise UserError(f"{json_path} says {counts.get(key)} {key}, the dataset holds {value}; rebuild it")
    if dtype != ds.dtype.name:
        raise UserError(f"{json_path} says dtype {dtype}, the index says {ds.dtype.name}; rebuild the dataset")
    if "integrity" in manifest:  # every checksum, and every id against the recorded largest one
        integrity.check(ds, manifest, vocab_size, full_scan_bytes=len(ds.tokens) * ds.dtype.itemsize)
    else:
        _verify_ids(ds, vocab_size)


def _verify_ids(ds: indexed.IndexedDataset, vocab_size: int) -> None:
    top = -1
    for i in range(0, len(ds.tokens), _CHUNK):
        top = max(top, int(ds.tokens[i : i + _CHUNK].max(initial=0)))
    if top >= vocab_size or (len(ds.tokens) and int(ds.tokens.min()) < 0):
        raise UserError(f"{indexed.paths(ds.prefix)[0]} holds id {top}, outside the vocabulary of {vocab_size}")


def report(ds: indexed.IndexedDataset) -> list[str]:
    """Human-readable summary lines."""
    lengths = ds.sequence_lengths
    lines = [
        f"dataset   {ds.prefix}",
        f"dtype     {ds.dtype.name}",
        f"documents {ds.num_documents:,}",
        f"sentences {len(ds):,}",
        f"tokens    {ds.num_tokens:,}",
    ]
    if len(ds):
        lines.append(
            f"length    min {int(lengths.min())}, mean {float(lengths.mean()):.1f}, "
            f"median {float(np.median(lengths)):.0f}, max {int(lengths.max())}"
        )
        lines += ["sentence length histogram (tokens: sentences):", *histogram(lengths)]
    m = ds.manifest
    if m:
        t = m.get("tokenizer", {})
        kind = t.get("model", "WordPiece")
        lines.append(f"tokenizer {t.get('path')} ({kind}, vocab {t.get('vocab_size')}, lowercase {t.get('lowercase')})")
        lines.append(f"sources   {len(m.get('sources', []))} files; counts {m.get('counts')}")
    else:
        lines.append("manifest  none (not written by bert-prep build)")
    return lines


def samples(ds: indexed.IndexedDataset, n: int, tok) -> list[str]:
    """`n` sentences spread evenly over the dataset, decoded with `tok`."""
    picks = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).astype(np.int64)) if len(ds) else []
    return [f"[{int(i)}] {tok.decode(ds[int(i)].tolist())}" for i in picks]


@dataclass
class InspectConfig:
    """Show counts, length histogram and sample sentences of a dataset; --verify checks it.

    Summarize PREFIX.bin/.idx/.json. --verify checks every index entry against the .bin size and the manifest
    and exits non-zero on the first inconsistency.

    Each field is a command-line flag of `bert-prep inspect` (common.flags).
    """

    prefix: str = option(positional=True, metavar="PREFIX")
    """Dataset prefix (PREFIX.bin, PREFIX.idx, PREFIX.json)."""
    verify: bool = False
    """Check index, .bin and manifest for consistency."""
    show: int = option(0, metavar="N")
    """Decode N sample sentences."""
    tokenizer: str | None = option(None, metavar="DIR_OR_FILE")
    """Tokenizer for --show and --verify (default: the manifest's; needed for data written by Megatron)."""
    special_tokens: list[str] = option(default_factory=list, metavar="ROLE=TOKEN")
    """Special tokens of --tokenizer by role, as for `bert-prep build` (default: the manifest's, else its config)."""
    write_manifest: bool = False
    """After --verify passes, write PREFIX.json for data without one (needs --tokenizer), so bert-pretrain can
    train on it, or upgrade a format_version 1 manifest to version 2 (checksums, largest token id)."""

    def validate(self) -> None:
        """Raise UserError naming the flag to change."""
        if self.show < 0:
            raise UserError(f"--show must be 0 or more, got {self.show}")
        if self.write_manifest and not self.verify:
            raise UserError(
                "--write-manifest needs --verify, and for data without a manifest --tokenizer (the vocabulary the "
                "ids come from)"
            )
        tokenizer.parse_special_tokens(self.special_tokens)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bert-prep inspect`."""
    return add_command(subparsers, "inspect", InspectConfig, run)


def _tokenizer(ds: indexed.IndexedDataset, cfg: InspectConfig):
    """The tokenizer named by --tokenizer, else the manifest's, with the manifest's special tokens unless
    --special-tokens names them."""
    entry = ds.manifest.get("tokenizer", {})
    name = cfg.tokenizer or entry.get("path")
    if not name:
        raise UserError(f"{ds.prefix} has no manifest naming its tokenizer; pass --tokenizer")
    roles = tokenizer.parse_special_tokens(cfg.special_tokens)
    if not roles and name == entry.get("path"):
        roles = entry.get("special_token_strings")
    return tokenizer.load(name, roles), name


def adopted_manifest(ds: indexed.IndexedDataset, tok, name: str) -> dict:
    """The manifest of a dataset written by another tool (Megatron), for `--write-manifest`."""
    from data_prep import build

    manifest = {
        "format": build.FORMAT_NAME,
        "format_version": build.FORMAT_VERSION,
        "tool_version": build.TOOL_VERSION,
        "dtype": ds.dtype.name,
        "tokenizer": tokenizer.describe(tok, name).to_json(),
        "counts": {
            "documents": ds.num_documents,
            "sentences": len(ds),
            "tokens": ds.num_tokens,
            "single_sentence_documents": int((np.diff(ds.document_indices) == 1).sum()),
        },
        "sources": [],
        "adopted": True,
    }
    return upgraded_manifest(ds, manifest)


def upgraded_manifest(ds: indexed.IndexedDataset, manifest: dict) -> dict:
    """`manifest` at the current format_version: with the integrity entry of a full read of the files."""
    from data_prep import build

    return {**manifest, "format_version": build.FORMAT_VERSION, "integrity": integrity.record(ds)}


def run(cfg: InspectConfig) -> int:
    cfg.validate()
    shard = f"{cfg.prefix}_00000"
    if not indexed.exists(cfg.prefix) and indexed.exists(shard):
        raise UserError(f"{cfg.prefix} was written with --shards; inspect each shard, e.g. {shard}")
    ds = indexed.IndexedDataset(cfg.prefix)
    if cfg.write_manifest and "integrity" in ds.manifest:
        raise UserError(
            f"{indexed.paths(cfg.prefix)[2]} already exists; --write-manifest is for data without one or with a "
            "format_version 1 manifest"
        )
    if cfg.write_manifest and not ds.manifest and not cfg.tokenizer:
        raise UserError(
            "--write-manifest needs --verify, and for data without a manifest --tokenizer (the vocabulary the ids "
            "come from)"
        )
    log.info("\n".join(report(ds)))
    tok = name = None
    if cfg.show or (cfg.tokenizer and cfg.verify):
        tok, name = _tokenizer(ds, cfg)
    if cfg.show:
        log.info("samples:\n" + "\n".join(samples(ds, cfg.show, tok)))
    if cfg.verify:
        verify(ds, len(tok) if tok is not None else None)
        checked = "the manifest" if ds.manifest else f"the vocabulary of {name}" if tok else "nothing else"
        log.info(f"verify    ok: {len(ds):,} index entries consistent with the .bin and {checked}")
        if not ds.manifest and tok is None:
            log.info("          no manifest: counts and ids unchecked (pass --tokenizer to check the ids)")
    if cfg.write_manifest:
        manifest = upgraded_manifest(ds, ds.manifest) if ds.manifest else adopted_manifest(ds, tok, name)
        write_json_atomic(indexed.paths(cfg.prefix)[2], manifest)
        log.info(f"wrote     {indexed.paths(cfg.prefix)[2]}")
    return 0
