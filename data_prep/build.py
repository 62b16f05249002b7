"""`bert-prep build`: raw text -> sentences -> WordPiece ids -> `PREFIX.bin/.idx/.json`.

Pipeline: the main process streams documents out of the inputs (text.py) and groups them into chunks of
about `--chunk-mb` of text; workers split each chunk into sentences (blingfire) and tokenize it in one
batch; the main process writes results in chunk order. Design choices:

- Deterministic: results are consumed in submission order, so the output is byte-identical for any
  `--workers` (and `--workers 1` runs in-process, with no pickling at all).
- Bounded memory: at most `2 * workers` chunks are in flight, a document longer than a chunk travels in
  parts (stored as one document), and the tokenizer works through a chunk in batches of 1024 sentences,
  so memory depends on `--chunk-mb` and `--workers`, never on the corpus or document size (a single
  line must fit in memory):
  about (2 * workers + 2) chunks of text as Python strings (~2-3x their size) on top of the baseline of each
  process; the index side data is spilled to disk by the writer. docs/PERFORMANCE.md has measured peaks.
- Crash safety: everything is written under `*.tmp` names and renamed at the end, `.idx` last (with the
  manifest just before it), so a killed run never leaves a valid-looking dataset.
- Restartable: every `JOURNAL_SECONDS` the writers are fsynced and `PREFIX.journal.tmp` records how many
  chunks they hold. Re-running the same command after a kill, Ctrl-C or crash (same inputs, sizes and
  mtimes, tokenizer and options; any `--workers`) cuts the temporary files back to the journal, re-reads
  the inputs up to that chunk without tokenizing them, and continues: the result is byte-identical to an
  uninterrupted run. Anything else (no journal, another command, bad input) starts over.
- Sharding: `--shards K` deals documents round-robin to `PREFIX_00000` ... `PREFIX_{K-1}`, each a complete
  dataset with its own manifest.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep import indexed, text, tokenizer
from data_prep.errors import UserError

FORMAT_NAME = "mmidx-bert"
FORMAT_VERSION = 1
TOOL_VERSION = "0.1.0"
JOURNAL_SECONDS = 30.0  # how often a build records its position for a restart (an fsync and a small JSON)


@dataclass
class BuildConfig:
    """Everything `bert-prep build` needs; field names match the command-line flags."""

    input: list[str]  # files, directories or globs (plain, .gz, .xz, .bz2, .zst)
    tokenizer: str  # directory written by `bert-prep vocab` (or any BERT tokenizer directory)
    output: str  # dataset prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json
    workers: int = 1  # tokenizer processes (cores)
    format: str = "txt"  # txt: paragraph per line, blank line between documents; jsonl: document per line
    jsonl_key: str = "text"  # field holding the text in --format jsonl
    split_sentences: bool = True  # False: each paragraph (line) is one sequence
    ascii_fast_path: bool = True  # ASCII sentences skip the full normalizer (same ids; see tokenizer.Encoder)
    overwrite: bool = False  # replace an existing dataset at --output
    strict: bool = False  # invalid UTF-8 is an error instead of being replaced and counted
    shards: int = 0  # 0: one dataset; K: K datasets PREFIX_00000 ... with documents dealt round-robin
    chunk_mb: float = 1.0  # text per work item; memory is bounded by about (2 * workers + 2) chunks
    progress: bool = True  # show the progress bar

    def validate(self) -> None:
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.format not in text.FORMATS:
            raise UserError(f"--format must be one of {text.FORMATS}, got {self.format!r}")
        if self.shards < 0:
            raise UserError(f"--shards must be 0 (no sharding) or positive, got {self.shards}")
        if self.chunk_mb <= 0:
            raise UserError(f"--chunk-mb must be positive, got {self.chunk_mb}")
        if Path(self.output).is_dir() or self.output.endswith(os.sep):
            raise UserError(f"--output {self.output} is a directory; pass a file prefix such as {self.output}/train")


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


def output_prefixes(output: str, shards: int) -> list[str]:
    return [output] if shards == 0 else [f"{output}_{k:05d}" for k in range(shards)]


def _existing_outputs(output: str) -> list[str]:
    names = [str(p) for p in indexed.paths(output) if p.exists()]
    for ext in ("bin", "idx", "json"):
        names += glob.glob(f"{glob.escape(output)}_[0-9][0-9][0-9][0-9][0-9].{ext}")
    return sorted(names)


def _is_output(path: Path, out: Path) -> bool:
    """Whether `path` is one of the files `--output out` writes (dataset, shard or temporary file)."""
    if path.parent != out.parent or not path.name.startswith(out.name):
        return False
    rest = path.name[len(out.name) :]
    rest = rest[6:] if len(rest) > 6 and rest[0] == "_" and rest[1:6].isdigit() else rest
    return rest.split(".tmp")[0] in (".bin", ".idx", ".json", ".idx.lengths", ".idx.docs", ".journal")


def _remove_stale(output: str) -> None:
    """Delete the `*.tmp` leftovers of a killed run."""
    escaped = glob.escape(output)
    for pattern in (f"{escaped}.*.tmp", f"{escaped}_[0-9][0-9][0-9][0-9][0-9].*.tmp"):
        for name in glob.glob(pattern):
            os.unlink(name)


def build(cfg: BuildConfig) -> BuildResult:
    """Run the whole build; raises UserError on bad input, leaving nothing under the final names."""
    cfg.validate()
    existing = _existing_outputs(cfg.output)
    if existing and not cfg.overwrite:
        raise UserError(f"output {existing[0]} already exists; pass --overwrite or choose another --output")
    out = Path(cfg.output).resolve()
    # an --input directory that also holds the output (or the leftovers of a killed run) must not read it
    files = [f for f in text.resolve_inputs(cfg.input) if not _is_output(f, out)]
    if not files:
        raise UserError(f"the only --input files are outputs of --output {cfg.output}; pass the text files")
    tok = tokenizer.load(cfg.tokenizer)
    info = tokenizer.describe(tok, cfg.tokenizer)
    dtype = indexed.token_dtype(info.vocab_size)
    backend_json = tok.backend_tokenizer.to_str()
    journal = _Journal(cfg.output, _fingerprint(cfg, files, backend_json, dtype))
    reader = text.TextReader(files, cfg.format, cfg.jsonl_key, cfg.strict)
    work = _ChunkWork(backend_json, dtype, cfg.split_sentences, cfg.ascii_fast_path)
    prefixes = output_prefixes(cfg.output, cfg.shards)
    router = _Router(journal.open_writers(prefixes, dtype))
    writers = router.writers
    resumed_tokens = sum(w.num_tokens for w in writers)
    start = time.perf_counter()
    try:
        _tokenize_into(router, reader, work, cfg, journal)
        counts = router.counts()
        if not any(c[0] for c in counts):
            raise UserError(f"the inputs hold no text that tokenizes to anything ({files[0]} ...); check --input")
        if not all(c[0] for c in counts):
            raise UserError(f"only {int(sum(c[0] for c in counts))} documents, fewer than --shards; lower --shards")
        manifests = [_manifest(info, dtype, c, reader.stats, cfg) for c in counts]
        for name in existing:  # --overwrite: the old dataset goes only once the new one is complete
            os.unlink(name)
        for w, m in zip(writers, manifests):
            w.close(manifest=m)
        journal.remove()
    except BaseException as e:
        if isinstance(e, UserError) or not journal.exists():
            for w in writers:
                w.abort()
            journal.remove()
        else:  # interrupted or crashed after a journal: keep the temporary files for a restart
            for w in writers:
                w.detach()
            print(f"build interrupted; re-run the same command to continue from {journal.path}", file=sys.stderr)
        raise
    totals = {k: int(sum(c[i] for c in counts)) for i, k in enumerate(("documents", "sentences", "tokens"))}
    totals["invalid_utf8_replaced"] = reader.stats.invalid_utf8_replaced
    seconds = time.perf_counter() - start
    return BuildResult(prefixes, manifests, seconds, reader.stats.text_bytes, totals, resumed_tokens)


def _tokenize_into(
    router: _Router, reader: text.TextReader, work: _ChunkWork, cfg: BuildConfig, journal: _Journal
) -> None:
    """Stream every chunk through the workers into the writers, with a progress bar and the journal."""
    total = sum(f.stat().st_size for f in reader.files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="build", disable=not cfg.progress, smoothing=0.1)
    chunk_bytes = int(cfg.chunk_mb * 1e6)
    chunks = text.chunked(reader.parts(chunk_bytes), chunk_bytes)
    for chunk in itertools.islice(chunks, journal.chunks):  # written by the interrupted run: only re-read
        router.next_document += sum(ends for _, ends in chunk)
    if journal.chunks:
        print(f"resuming {cfg.output} after {journal.chunks} chunks ({reader.stats.bytes_read / 1e6:,.1f} MB of "
              "input) written by an interrupted run", file=sys.stderr)  # fmt: skip
    before = np.sum(router.counts(), axis=0)
    start = last_journal = time.perf_counter()
    results = _ordered_map(work, chunks, cfg.workers)
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


def _fingerprint(cfg: BuildConfig, files: list[Path], backend_json: str, dtype: np.dtype) -> str:
    """What fixes the output bytes: inputs (path, size, mtime), tokenizer and options; not --workers."""
    spec = {
        "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "tokenizer": hashlib.sha256(backend_json.encode()).hexdigest(),
        "options": [cfg.format, cfg.jsonl_key, cfg.split_sentences, cfg.strict, cfg.shards, cfg.chunk_mb],
        "dtype": np.dtype(dtype).name,
        "versions": [FORMAT_VERSION, TOOL_VERSION],
    }
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


class _Journal:
    """`PREFIX.journal.tmp`: how many chunks the writers hold, and their state, for a restart."""

    def __init__(self, output: str, fingerprint: str):
        self.output, self.fingerprint = output, fingerprint
        self.path = Path(f"{output}.journal.tmp")
        self.chunks = 0  # chunks written to the writers (by this run and the interrupted one)

    def open_writers(self, prefixes: list[str], dtype: np.dtype) -> list[indexed.IndexedDatasetWriter]:
        """Writers resumed from an interrupted run of the same build, else fresh ones (stale files removed)."""
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("fingerprint") == self.fingerprint and len(saved.get("writers", [])) == len(prefixes):
            writers: list[indexed.IndexedDatasetWriter] = []
            try:
                for p, state in zip(prefixes, saved["writers"]):
                    writers.append(indexed.IndexedDatasetWriter(p, dtype, resume=state))
                self.chunks = int(saved["chunks"])
                return writers
            except (indexed.ResumeError, KeyError, TypeError, ValueError):
                for w in writers:
                    w.detach()
        _remove_stale(self.output)
        return [indexed.IndexedDatasetWriter(p, dtype) for p in prefixes]

    def write(self, writers: list[indexed.IndexedDatasetWriter]) -> None:
        states = [w.state(sync=True) for w in writers]  # data on disk before the journal that points to it
        indexed.write_json_atomic(
            self.path, {"fingerprint": self.fingerprint, "chunks": self.chunks, "writers": states}
        )

    def exists(self) -> bool:
        return self.path.is_file()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class _Router:
    """Sends each chunk's documents to the writers; with K shards, document j of the corpus goes to shard j % K."""

    writers: list[indexed.IndexedDatasetWriter]
    next_document: int = 0  # global index of the next chunk's first document (counting its open part)

    def write(self, ids: np.ndarray, lengths: np.ndarray, per_part: np.ndarray, ends: np.ndarray) -> None:
        if len(per_part) == 0:
            return
        part_doc = self.next_document + np.cumsum(ends) - ends  # global document index of each part
        docs, inverse = np.unique(part_doc, return_inverse=True)
        doc_lengths = np.bincount(inverse, weights=per_part, minlength=len(docs)).astype(np.int64)
        open_last = not ends[-1]  # the last document continues in the next chunk
        self.next_document += int(ends.sum())
        k = len(self.writers)
        if k == 1:
            self.writers[0].add_documents(ids, lengths, doc_lengths, open_last)
            return
        doc_shard = docs % k
        sent_shard = np.repeat(doc_shard[inverse], per_part)
        tok_shard = np.repeat(sent_shard, lengths)
        for s, w in enumerate(self.writers):
            mine = doc_shard == s
            if mine.any():
                keep = tok_shard == s
                w.add_documents(ids[keep], lengths[sent_shard == s], doc_lengths[mine], open_last and mine[-1])

    def counts(self) -> list[tuple[int, int, int]]:
        """(documents, sentences, tokens) of each writer."""
        return [(w.num_documents, w.num_sequences, w.num_tokens) for w in self.writers]


def _manifest(info: tokenizer.TokenizerInfo, dtype: np.dtype, counts, stats: text.ReadStats, cfg) -> dict:
    """The `PREFIX.json` of docs/DESIGN.md."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool_version": TOOL_VERSION,
        "dtype": np.dtype(dtype).name,
        "tokenizer": info.to_json(),
        "counts": {
            "documents": int(counts[0]),
            "sentences": int(counts[1]),
            "tokens": int(counts[2]),
            "invalid_utf8_replaced": stats.invalid_utf8_replaced,
        },
        "sources": list(stats.sources),
        "split_sentences": cfg.split_sentences,
        "input_format": cfg.format,
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


_WORK: list[Callable] = []  # the pool worker's own copy of the chunk function, set once by _init_worker


def _init_worker(work: Callable) -> None:
    _WORK.append(work)


def _run_worker(chunk):
    return _WORK[0](chunk)


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(fn, items)` over `workers` processes, in order, with at most `2 * workers` items in flight.

    (`Pool.imap` would read the whole input ahead of the workers, which defeats bounded memory.)
    """
    if workers == 1:
        yield from map(fn, items)
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(fn,)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(_run_worker, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bert-prep build`."""
    p = subparsers.add_parser(
        "build",
        help="tokenize raw text into a memory-mapped indexed dataset (PREFIX.bin/.idx/.json)",
        description=(
            "Split documents into sentences, tokenize them with a BERT WordPiece tokenizer and write a "
            "Megatron-compatible MMIDIDX dataset: one sequence per sentence, grouped into documents, plus a "
            "JSON manifest. txt input: one paragraph per line, a blank line between documents. jsonl input: "
            "one document per line. Inputs may be files, directories or globs, plain or .gz/.xz/.bz2/.zst. "
            "Re-running the same command after a kill or Ctrl-C resumes the build from its journal."
        ),
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="input files, directories or globs")
    p.add_argument("--tokenizer", required=True, metavar="DIR_OR_NAME", help="BERT tokenizer (from `bert-prep vocab`)")
    p.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes, one core each (default 1)")
    p.add_argument("--format", choices=text.FORMATS, default="txt", help="input format (default txt)")
    p.add_argument("--jsonl-key", default="text", help="field holding the document text in jsonl (default text)")
    p.add_argument("--no-split-sentences", action="store_true", help="store each paragraph as one sequence")
    p.add_argument(
        "--no-ascii-fast-path",
        action="store_true",
        help="tokenize ASCII sentences through the full normalizer too (slower; the ids are the same)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at PREFIX")
    p.add_argument("--strict", action="store_true", help="fail on invalid UTF-8 instead of replacing and counting")
    p.add_argument("--shards", type=int, default=0, help="write K datasets PREFIX_00000.. (documents round-robin)")
    p.add_argument("--chunk-mb", type=float, default=1.0, help="MB of text per work item; bounds memory (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    cfg = BuildConfig(
        input=args.input,
        tokenizer=args.tokenizer,
        output=args.output,
        workers=args.workers,
        format=args.format,
        jsonl_key=args.jsonl_key,
        split_sentences=not args.no_split_sentences,
        ascii_fast_path=not args.no_ascii_fast_path,
        overwrite=args.overwrite,
        strict=args.strict,
        shards=args.shards,
        chunk_mb=args.chunk_mb,
        progress=not args.no_progress,
    )
    print(build(cfg).summary())
    return 0
