"""`bert-prep build`: text -> sentences -> token ids -> `PREFIX.bin/.idx/.json`.

Pipeline: the main process streams documents out of the inputs (text.py: txt, jsonl, Parquet, Arrow) and
groups them into chunks of about `--chunk-mb` of text; workers split each chunk into sentences (blingfire)
and tokenize it in one batch; the main process writes results in chunk order. Design choices:

- Deterministic: results are consumed in submission order, so the output is byte-identical for any
  `--workers` (and `--workers 1` runs in-process, with no pickling at all).
- Bounded memory: at most `2 * workers` chunks are in flight, a document longer than a chunk travels in
  parts (stored as one document), a line longer than `text.MAX_PIECE_CHARS` (1 MiB) is cut into pieces at
  whitespace, and the tokenizer works through a chunk in batches of 1024 sentences, so memory depends on
  `--chunk-mb` and `--workers`, never on the corpus, document or line size:
  about (2 * workers + 2) chunks of text as Python strings (~2-3x their size) on top of the baseline of each
  process; the index side data is spilled to disk by the writer. docs/PERFORMANCE.md has measured peaks.
- Crash safety: everything is written under `*.tmp` names and renamed at the end, `.idx` last (with the
  manifest just before it), so a killed run never leaves a valid-looking dataset.
- Restartable: every `JOURNAL_SECONDS` the writers are fsynced and `PREFIX.journal.tmp` records how many
  chunks they hold. Re-running the same command after a kill, Ctrl-C or crash (same inputs, formats, sizes
  and mtimes, tokenizer, special tokens and options; any `--workers`) cuts the temporary files back to the
  journal, re-reads the inputs up to that chunk without tokenizing them, and continues: the result is
  byte-identical to an uninterrupted run. Anything else (no journal, another command, bad input) starts over.
- Sharding: `--shards K` deals documents round-robin to `PREFIX_00000` ... `PREFIX_{K-1}`, each a complete
  dataset with its own manifest (`bert-pretrain --data PREFIX` reads them all).
- The manifest (format_version 2) records the largest token id and checksums of `.bin` and `.idx`, which
  `bert-pretrain` checks before step 1 (data_prep/integrity.py).
- A build whose documents are mostly one sentence long warns: NSP/SOP pretraining skips such documents
  (a pair needs two sentences of one document), which usually means `--doc-boundary` cut them too finely.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.errors import UserError
from common.flags import add_command, option
from common.log import get_logger
from data_prep import indexed, indexed_writer, text, tokenizer
from data_prep.build_output import Journal, Router, existing_outputs, is_output, output_prefixes
from data_prep.inputs import DocBoundary, Input, InputFormat, ReadStats, resolve_inputs
from data_prep.pool import ordered_map

log = get_logger(__name__)

FORMAT_NAME = "mmidx-bert"
FORMAT_VERSION = 2  # 2: the manifest's `integrity` entry (docs/DATA_CHECKS.md)
TOOL_VERSION = "0.1.0"
JOURNAL_SECONDS = 30.0  # how often a build records its position for a restart (an fsync and a small JSON)
SINGLE_SENTENCE_WARNING = 0.5  # share of one-sentence documents above which a build warns


@dataclass
class BuildConfig:
    """Tokenize text into a memory-mapped indexed dataset (PREFIX.bin/.idx/.json).

    Split documents into sentences, tokenize them with a Hugging Face tokenizer (BERT WordPiece from `bert-prep
    vocab`, or any tokenizer.json: BPE, Unigram, WordPiece) and write a Megatron-compatible MMIDIDX dataset: one
    sequence per sentence, grouped into documents, plus a JSON manifest. Inputs: txt (one paragraph per line, a
    blank line between documents), jsonl, Parquet or Arrow (one document per row), as files, directories or
    globs, txt/jsonl plain or .gz/.xz/.bz2/.zst; each input's format follows its extension. Re-running the same
    command after a kill or Ctrl-C resumes the build.

    Each field is a command-line flag of `bert-prep build` (common.flags).
    """

    input: list[str] = option(metavar="PATH")
    """Input files, directories or globs: txt or jsonl (plain, .gz, .xz, .bz2, .zst), Parquet, Arrow or a
    datasets.save_to_disk directory; FORMAT:PATH reads one input in FORMAT."""
    tokenizer: str = option(metavar="DIR_OR_FILE")
    """Tokenizer: a `bert-prep vocab` directory, any directory holding a tokenizer.json (BPE, Unigram,
    WordPiece), a tokenizer.json file, or a locally cached BERT name."""
    output: str = option(metavar="PREFIX")
    """Dataset prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json."""
    workers: int = option(1, metavar="N")
    """Tokenizer processes, one core each."""
    format: InputFormat | None = None
    """Read every input in this format (default: each input's extension, txt for an unknown one)."""
    text_key: str = option("text", aliases=("--jsonl-key",), metavar="KEY")
    """Field (jsonl) or string column (parquet, arrow) holding the text."""
    doc_boundary: DocBoundary | None = None
    """What ends a document: blank (a blank line or empty row; default for txt), row (each row, or txt line;
    default for jsonl, parquet, arrow) or file (one document per file, e.g. one book per file)."""
    special_tokens: list[str] = option(default_factory=list, metavar="ROLE=TOKEN")
    """The tokenizer's special tokens by role (pad, unk, cls, sep, mask), e.g. cls=<s> sep=</s>; default: its
    config (cls from bos, sep from eos) or its [CLS]/<s>-style special tokens."""
    split_sentences: bool = True
    """Split paragraphs into sentences (--no-split-sentences: each paragraph is one sequence)."""
    ascii_fast_path: bool = True
    """ASCII sentences skip BERT's full normalizer, with the same ids (--no-ascii-fast-path: every sentence
    goes through it; slower). Only tokenizers with a BertNormalizer have the fast path."""
    overwrite: bool = False
    """Replace an existing dataset at --output."""
    strict: bool = False
    """Fail on invalid UTF-8 instead of replacing and counting it."""
    shards: int = option(0, metavar="K")
    """Write K datasets PREFIX_00000 ... with documents dealt round-robin (0: one dataset)."""
    chunk_mb: float = option(1.0, metavar="MB")
    """MB of text per work item; memory is bounded by about (2 * workers + 2) chunks."""
    progress: bool = True
    """Show the progress bar (--no-progress: none)."""

    def validate(self) -> None:
        """Raise UserError naming the flag to change."""
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.shards < 0:
            raise UserError(f"--shards must be 0 (no sharding) or positive, got {self.shards}")
        if self.chunk_mb <= 0:
            raise UserError(f"--chunk-mb must be positive, got {self.chunk_mb}")
        if Path(self.output).is_dir() or self.output.endswith(os.sep):
            raise UserError(f"--output {self.output} is a directory; pass a file prefix such as {self.output}/train")
        tokenizer.parse_special_tokens(self.special_tokens)


@dataclass
class BuildResult:
    """Counts for the summary line; `manifests` holds one manifest per written dataset."""

    prefixes: list[str]
    manifests: list[dict]
    seconds: float
    text_bytes: int
    counts: dict = field(default_factory=dict)
    resumed_tokens: int = 0  # tokens an interrupted run had written (not counted in the rates)

    def summary(self) -> str:
        c, s = self.counts, max(self.seconds, 1e-9)
        where = self.prefixes[0] if len(self.prefixes) == 1 else f"{len(self.prefixes)} shards {self.prefixes[0]}..."
        resumed = f"; resumed after {self.resumed_tokens:,} tokens of an interrupted run" if self.resumed_tokens else ""
        return (
            f"wrote {where}: {c['documents']:,} documents, {c['sentences']:,} sentences, {c['tokens']:,} tokens "
            f"from {self.text_bytes / 1e6:.1f} MB of text in {s:.1f}s "
            f"({(c['tokens'] - self.resumed_tokens) / s:,.0f} tokens/s, {self.text_bytes / 1e6 / s:.2f} MB/s); "
            f"{c['invalid_utf8_replaced']} invalid UTF-8 sequences replaced{resumed}"
        )


def build(cfg: BuildConfig) -> BuildResult:
    """Run the whole build; raises UserError on bad input, leaving nothing under the final names."""
    cfg.validate()
    existing = existing_outputs(cfg.output)
    if existing and not cfg.overwrite:
        raise UserError(f"output {existing[0]} already exists; pass --overwrite or choose another --output")
    inputs = _inputs(cfg)
    tok = tokenizer.load(cfg.tokenizer, tokenizer.parse_special_tokens(cfg.special_tokens))
    info = tokenizer.describe(tok, cfg.tokenizer)
    dtype = indexed.token_dtype(info.vocab_size)
    backend_json = tok.backend_tokenizer.to_str()
    log.info(_tokenizer_line(info, dtype))
    journal = Journal(cfg.output, _fingerprint(cfg, inputs, backend_json, info, dtype))
    reader = text.TextReader(inputs, cfg.text_key, cfg.strict, cfg.doc_boundary)
    work = _ChunkWork(backend_json, dtype, cfg.split_sentences, cfg.ascii_fast_path)
    router = Router(journal.open_writers(output_prefixes(cfg.output, cfg.shards), dtype))
    resumed_tokens = sum(w.num_tokens for w in router.writers)
    start = time.perf_counter()
    try:
        _tokenize_into(router, reader, work, cfg, journal)
        manifest = functools.partial(_manifest, info, dtype, reader.stats, cfg)
        manifests = _finish(router, journal, manifest, existing, inputs[0].path)
    except BaseException as e:
        _abandon(router.writers, journal, keep=not isinstance(e, UserError))
        raise
    counts = router.counts()
    totals = {k: int(sum(c[i] for c in counts)) for i, k in enumerate(("documents", "sentences", "tokens"))}
    totals["invalid_utf8_replaced"] = reader.stats.invalid_utf8_replaced
    _warn_single_sentence_documents(router.writers, cfg.output)
    seconds = time.perf_counter() - start
    return BuildResult(router.prefixes, manifests, seconds, reader.stats.text_bytes, totals, resumed_tokens)


def _inputs(cfg: BuildConfig) -> list[Input]:
    """The --input files with their formats, less the files `--output` writes (an --input directory that
    also holds the output, or the leftovers of a killed run, must not read it)."""
    out = Path(cfg.output).resolve()
    inputs = [i for i in resolve_inputs(cfg.input, cfg.format) if not is_output(i.path, out)]
    if not inputs:
        raise UserError(f"the only --input files are outputs of --output {cfg.output}; pass the text files")
    return inputs


def _tokenizer_line(info: tokenizer.TokenizerInfo, dtype: np.dtype) -> str:
    """One line that says which tokenizer and which special tokens the dataset gets (said once, at start)."""
    roles = ", ".join(f"{r}={t} ({info.special_tokens[r]})" for r, t in info.special_token_strings.items())
    return f"tokenizer {info.path}: {info.model}, {info.vocab_size:,} tokens ({np.dtype(dtype).name} ids); {roles}"


def _finish(router: Router, journal: Journal, manifest: Callable, existing: list[str], first: Path) -> list[dict]:
    """Check the counts, write every dataset (manifest, `.idx` last), drop the journal; the manifests."""
    counts = router.counts()
    if not any(c[0] for c in counts):
        raise UserError(f"the inputs hold no text that tokenizes to anything ({first} ...); check --input")
    if not all(c[0] for c in counts):
        raise UserError(f"only {int(sum(c[0] for c in counts))} documents, fewer than --shards; lower --shards")
    manifests = [manifest(w) for w in router.writers]
    for name in existing:  # --overwrite: the old dataset goes only once the new one is complete
        os.unlink(name)
    for w, m in zip(router.writers, manifests):
        w.close(manifest=m)
    journal.remove()
    return manifests


def _abandon(writers: list[indexed_writer.IndexedDatasetWriter], journal: Journal, keep: bool) -> None:
    """After a failure: keep the temporary files for a restart when a journal records them (interrupted or
    crashed), else (bad input, or nothing recorded yet) delete everything."""
    if keep and journal.exists():
        for w in writers:
            w.detach()
        print(f"build interrupted; re-run the same command to continue from {journal.path}", file=sys.stderr)
        return
    for w in writers:
        w.abort()
    journal.remove()


def _warn_single_sentence_documents(writers: list[indexed_writer.IndexedDatasetWriter], output: str) -> None:
    single = sum(w.single_sequence_documents for w in writers)
    documents = sum(w.num_documents for w in writers)
    if documents and single > SINGLE_SENTENCE_WARNING * documents:
        warnings.warn(
            f"{single:,} of the {documents:,} documents of {output} ({single / documents:.0%}) are a single "
            "sentence; NSP/SOP pretraining skips them (a pair needs two sentences of one document). If the "
            "data cut documents too finely (one sentence or paragraph per row or blank-line block), rebuild "
            "with --doc-boundary file (or blank), or pretrain with --pair-task none",
            stacklevel=2,
        )


def _tokenize_into(
    router: Router, reader: text.TextReader, work: _ChunkWork, cfg: BuildConfig, journal: Journal
) -> None:
    """Stream every chunk through the workers into the writers, with a progress bar and the journal."""
    total = sum(f.stat().st_size for f in reader.files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="build", disable=not cfg.progress, smoothing=0.1)
    chunk_bytes = int(cfg.chunk_mb * 1e6)
    chunks = text.chunked(reader.parts(chunk_bytes), chunk_bytes)
    for chunk in itertools.islice(chunks, journal.chunks):  # written by the interrupted run: only re-read
        router.next_document += sum(ends for _, ends in chunk)
    if journal.chunks:
        log.info(
            f"resuming {cfg.output} after {journal.chunks} chunks ({reader.stats.bytes_read / 1e6:,.1f} MB of "
            "input) written by an interrupted run"
        )
    before = np.sum(router.counts(), axis=0)
    start = last_journal = time.perf_counter()
    results = ordered_map(work, chunks, cfg.workers)
    try:
        for result in results:
            router.write(*result)
            journal.chunks += 1
            if time.perf_counter() - last_journal >= JOURNAL_SECONDS:
                journal.write(router.writers)
                last_journal = time.perf_counter()
            done = np.sum(router.counts(), axis=0)
            rate = (done[2] - before[2]) / max(time.perf_counter() - start, 1e-9)
            bar.update(reader.stats.bytes_read - bar.n)
            bar.set_postfix(docs=f"{done[0]:,}", tokens=f"{done[2]:,}", tok_s=f"{rate:,.0f}", refresh=False)
        bar.update(total - bar.n)
    finally:
        results.close()  # on an error, stops the worker pool at once
        bar.close()


def _fingerprint(
    cfg: BuildConfig, inputs: list[Input], backend_json: str, info: tokenizer.TokenizerInfo, dtype: np.dtype
) -> str:
    """What fixes the output bytes: inputs (path, format, size, mtime), tokenizer, special tokens and options;
    not --workers."""
    stats = [i.path.stat() for i in inputs]
    spec = {
        "files": [[str(i.path), i.format, st.st_size, st.st_mtime_ns] for i, st in zip(inputs, stats)],
        "tokenizer": hashlib.sha256(backend_json.encode()).hexdigest(),
        "special_tokens": info.special_tokens,
        "options": [cfg.text_key, cfg.doc_boundary, cfg.split_sentences, cfg.strict, cfg.shards, cfg.chunk_mb],
        "dtype": np.dtype(dtype).name,
        "versions": [FORMAT_VERSION, TOOL_VERSION],
    }
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def _manifest(info: tokenizer.TokenizerInfo, dtype: np.dtype, stats: ReadStats, cfg: BuildConfig, w) -> dict:
    """The `PREFIX.json` of docs/DESIGN.md for the dataset of writer `w`."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool_version": TOOL_VERSION,
        "dtype": np.dtype(dtype).name,
        "tokenizer": info.to_json(),
        "counts": {
            "documents": w.num_documents,
            "sentences": w.num_sequences,
            "tokens": w.num_tokens,
            "single_sentence_documents": w.single_sequence_documents,
            "invalid_utf8_replaced": stats.invalid_utf8_replaced,
        },
        "sources": list(stats.sources),
        "text_key": cfg.text_key,
        "split_sentences": cfg.split_sentences,
        "shards": cfg.shards,
    }


class _ChunkWork:
    """Chunk of document parts -> (ids, sentence lengths, sentences per part, part ends a document).

    Sentences that tokenize to nothing (e.g. only control characters) are dropped.
    """

    def __init__(self, backend_json: str, dtype: np.dtype, split: bool, fast_path: bool = True):
        self.backend_json, self.dtype, self.split, self.fast_path = backend_json, np.dtype(dtype), split, fast_path
        self._encoder: tokenizer.Encoder | None = None
        self._splitter: text.SentenceSplitter | None = None

    def __getstate__(self) -> dict:  # workers rebuild the encoder themselves
        return {**self.__dict__, "_encoder": None, "_splitter": None}

    def __call__(self, parts: list[tuple[list[str], bool]]) -> tuple[np.ndarray, ...]:
        if self._encoder is None:
            self._encoder = tokenizer.Encoder(self.backend_json, self.dtype, self.fast_path)
            self._splitter = text.SentenceSplitter(self.split)
        sents, per_part = [], []
        for paras, _ in parts:
            before = len(sents)
            for para in paras:
                sents.extend(self._splitter(para))
            per_part.append(len(sents) - before)
        ids, lengths = self._encoder.encode(sents)
        per_part = np.asarray(per_part, np.int64)
        keep = lengths > 0
        if not keep.all():
            part_of_sentence = np.repeat(np.arange(len(per_part)), per_part)
            per_part = np.bincount(part_of_sentence[keep], minlength=len(per_part)).astype(np.int64)
            lengths = lengths[keep]
        return ids, lengths, per_part, np.array([ends for _, ends in parts], bool)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bert-prep build`."""
    return add_command(subparsers, "build", BuildConfig, run)


def run(cfg: BuildConfig) -> int:
    log.info(build(cfg).summary())
    return 0
