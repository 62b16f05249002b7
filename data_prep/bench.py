"""Benchmark `bert-prep build` against the tokenizer itself, and the reader's open and random access.

    python -m data_prep.bench --workdir /tmp/prep_bench            # builds an English corpus if --input is absent

Measured in one run on the same text and vocabulary:
- raw: HF `tokenizers` batch encoding of the input paragraphs in one thread (`encode_batch` and
  `encode_batch_fast`), the ceiling for one worker that the ratios are taken against; and the same
  paragraphs through `tokenizer.Encoder` with its ASCII fast path (same ids, cheaper normalizer);
- build: the whole `bert-prep build` pipeline (read, split sentences, tokenize, write, index) for each
  `--workers` value, as tokens/s and MB/s of text, its ratio to the raw rate per worker, and its scaling;
- CPU efficiency: tokens per CPU-second of all processes (main and workers), which other jobs on a shared
  machine disturb far less than wall-clock rates;
- memory: peak RSS of a default build (main process and largest worker) for each `--workers` value;
- restart: a one-worker build SIGKILLed once its journal holds 3/4 of the chunks, then resumed (the
  resume re-reads that text without tokenizing it), against the same build uninterrupted;
- read: opening a dataset of `--read-sentences` sentences and random access to single sentences;
- Parquet: the same documents written as one Parquet file (one row per document, pyarrow's defaults),
  built like the txt input; `--formats-only` measures just that pair, `--repeats` times, alternating txt
  and Parquet so that a shared machine's load hits both alike, and reports each pair's ratio.
Prints a Markdown table for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread: the raw rate is a per-core rate

import numpy as np  # noqa: E402

from common.errors import UserError, run_cli  # noqa: E402
from common.flags import add_arguments, from_args, option  # noqa: E402
from common.log import get_logger  # noqa: E402
from data_prep import text, tokenizer  # noqa: E402
from data_prep.bench_probes import peak_rss_mb, read_rates, resume_seconds  # noqa: E402
from data_prep.build import BuildConfig, build  # noqa: E402
from data_prep.inputs import resolve_inputs  # noqa: E402

log = get_logger(__name__)


def corpus(workdir: Path, megabytes: float) -> list[str]:
    """The built-in English corpus (`data_prep.corpus`, documentation installed on this machine)."""
    path = workdir / f"corpus_{megabytes:g}mb.txt"
    if not path.exists():
        from data_prep import corpus as corpus_mod

        corpus_mod.build_corpus(str(path), None, megabytes, 2)
    return [str(path)]


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the build's worker pool)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Rate:
    """One measured row: best wall time of two runs, and the CPU seconds of that run."""

    tokens: int
    megabytes: float
    seconds: float
    cpu: float

    def row(self, name: str, ceiling: Rate | None, workers: int, one: Rate | None) -> str:
        per_worker = self.tokens / self.seconds / workers / (ceiling.tokens / ceiling.seconds) if ceiling else 1.0
        per_cpu = self.tokens / self.cpu / (ceiling.tokens / ceiling.cpu) if ceiling else 1.0
        scaling = f"{one.seconds / self.seconds:.2f}x" if one and workers > 1 else ""
        return (
            f"| {name} | {self.tokens / self.seconds:,.0f} | {self.megabytes / self.seconds:.2f} | "
            f"{per_worker:.2f}x | {self.tokens / self.cpu:,.0f} | {per_cpu:.2f}x | {scaling} |"
        )


def _best(runs: list[Rate]) -> Rate:
    return min(runs, key=lambda r: r.seconds)


def raw_rates(files: list[str], tok_dir: str, batch: int = 1000) -> dict[str, Rate]:
    """Single-thread `tokenizers` batch encoding of the paragraphs, and `tokenizer.Encoder`'s; best of 2."""
    backend = tokenizer.load(tok_dir).backend_tokenizer
    paras = list(text.TextReader(resolve_inputs(files)).paragraphs())
    mb = sum(len(p.encode()) for p in paras) / 1e6
    out = {}
    for name in ("encode_batch", "encode_batch_fast"):
        encode = getattr(backend, name)
        runs = []
        for _ in range(2):
            wall, cpu = time.perf_counter(), cpu_seconds()
            batches = (encode(paras[i : i + batch], add_special_tokens=False) for i in range(0, len(paras), batch))
            tokens = sum(len(e.ids) for encodings in batches for e in encodings)
            runs.append(Rate(tokens, mb, time.perf_counter() - wall, cpu_seconds() - cpu))
        out[name] = _best(runs)
    encoder = tokenizer.Encoder(backend.to_str(), np.int32, fast_path=True)
    runs = []
    for _ in range(2):
        wall, cpu = time.perf_counter(), cpu_seconds()
        tokens = len(encoder.encode(paras, batch)[0])
        runs.append(Rate(tokens, mb, time.perf_counter() - wall, cpu_seconds() - cpu))
    out["Encoder"] = _best(runs)
    return out


def build_rate(files: list[str], tok_dir: str, out: Path, workers: int, split: bool = True, fast: bool = True) -> Rate:
    """The whole `bert-prep build` (read, split, tokenize, write, index), best of 2."""
    runs = []
    for _ in range(2):
        cfg = BuildConfig(input=files, tokenizer=tok_dir, output=str(out), workers=workers, overwrite=True,
                          split_sentences=split, ascii_fast_path=fast, progress=False)  # fmt: skip
        cpu = cpu_seconds()
        r = build(cfg)
        runs.append(Rate(r.counts["tokens"], r.text_bytes / 1e6, r.seconds, cpu_seconds() - cpu))
    return _best(runs)


def feed_rate(files: list[str], chunk_bytes: int = 10**6) -> float:
    """MB of text per CPU-second that the main process reads, chunks and pickles for the workers.

    With `--workers N` the main process must feed N tokenizers; this rate over the per-worker rate is how
    many workers it can keep busy.
    """
    cpu = time.process_time()
    reader = text.TextReader(resolve_inputs(files))
    for chunk in text.chunked(reader.parts(chunk_bytes), chunk_bytes):
        pickle.dumps(chunk)
    return reader.stats.text_bytes / 1e6 / (time.process_time() - cpu)


def parquet_copy(files: list[str], workdir: Path) -> str:
    """The documents of `files` as one Parquet file: one row per document, its paragraphs joined by newlines
    (what `bert-prep build` reads back as the same documents)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = workdir / "corpus.parquet"
    if not path.exists() or path.stat().st_mtime < max(Path(f).stat().st_mtime for f in files):
        rows = ["\n".join(doc) for doc in text.TextReader(resolve_inputs(files)).documents()]
        pq.write_table(pa.table({"text": rows}), path)
    return str(path)


def format_pairs(files: list[str], parquet: str, tok_dir: str, out: Path, repeats: int) -> list[tuple[Rate, Rate]]:
    """`repeats` one-worker builds of the txt input, each followed at once by one of its Parquet copy."""
    pairs = []
    for _ in range(repeats):
        pair = []
        for inputs in (files, [parquet]):
            cfg = BuildConfig(input=inputs, tokenizer=tok_dir, output=str(out), overwrite=True, progress=False)
            cpu = cpu_seconds()
            r = build(cfg)
            pair.append(Rate(r.counts["tokens"], r.text_bytes / 1e6, r.seconds, cpu_seconds() - cpu))
        if pair[0].tokens != pair[1].tokens:  # the comparison means something only on the same documents
            raise RuntimeError(f"txt and Parquet builds differ: {pair[0].tokens} vs {pair[1].tokens} tokens")
        pairs.append((pair[0], pair[1]))
    return pairs


def format_report(pairs: list[tuple[Rate, Rate]]) -> list[str]:
    """Each pair's rates and Parquet/txt ratios (wall clock and per CPU-second), then their medians and ranges."""
    lines = [
        "| run | txt tokens/s | Parquet tokens/s | Parquet / txt | txt tokens per CPU-s | Parquet tokens per CPU-s "
        "| Parquet / txt per CPU-s |",
        "|---|---|---|---|---|---|---|",
    ]
    wall, cpu = [], []
    for i, (a, b) in enumerate(pairs, 1):
        wall.append((b.tokens / b.seconds) / (a.tokens / a.seconds))
        cpu.append((b.tokens / b.cpu) / (a.tokens / a.cpu))
        lines.append(
            f"| {i} | {a.tokens / a.seconds:,.0f} | {b.tokens / b.seconds:,.0f} | {wall[-1]:.3f} | "
            f"{a.tokens / a.cpu:,.0f} | {b.tokens / b.cpu:,.0f} | {cpu[-1]:.3f} |"
        )
    for name, ratios in (("throughput", wall), ("tokens per CPU-s", cpu)):
        lines.append(
            f"Parquet / txt {name} over {len(ratios)} pairs: median {statistics.median(ratios):.3f}, "
            f"range {min(ratios):.3f}-{max(ratios):.3f}"
        )
    return lines


@dataclass
class PrepBenchConfig:
    """What `python -m data_prep.bench` measures; each field is a command-line flag (common.flags)."""

    input: list[str] | None = option(None, metavar="FILE")
    """Text files (txt convention); default: the built-in English corpus."""
    corpus_mb: float = option(8.0, metavar="MB")
    """Size of the built-in corpus when --input is absent."""
    workdir: str = option("/tmp/bert_prep_bench", metavar="DIR")
    """Scratch directory (corpus, vocabulary, outputs)."""
    vocab_size: int = option(30522, metavar="N")
    """WordPiece vocabulary trained on the input."""
    workers: list[int] = option(default_factory=lambda: [1, 2], metavar="N")
    """Worker counts to measure."""
    read_sentences: int = option(10_000_000, metavar="N")
    """Sentences in the read benchmark."""
    formats_only: bool = False
    """Only compare one-worker builds of the same text as txt and as Parquet."""
    repeats: int = option(3, metavar="N")
    """txt/Parquet build pairs of --formats-only."""


def _setup(cfg: PrepBenchConfig) -> tuple[list[str], str, Path]:
    """(input files, tokenizer directory, workdir): the corpus and vocabulary, made on first use."""
    if min(cfg.workers) < 1 or cfg.repeats < 1:
        raise UserError("--workers values and --repeats must be at least 1")
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    files = cfg.input or corpus(workdir, cfg.corpus_mb)
    tok_dir = workdir / f"vocab_{cfg.vocab_size}"
    if not (tok_dir / "vocab.txt").exists():
        from data_prep.vocab import VocabConfig, train_vocab

        train_vocab(VocabConfig(input=files, vocab_size=cfg.vocab_size, output=str(tok_dir), progress=False))
    mb = sum(Path(f).stat().st_size for f in files) / 1e6
    log.info(
        f"input {mb:.1f} MB in {len(files)} files; vocabulary {len(tokenizer.load(str(tok_dir)))} tokens; "
        f"load average {os.getloadavg()[0]:.2f} on {len(os.sched_getaffinity(0))} cores"
    )
    return files, str(tok_dir), workdir


def throughput_table(cfg: PrepBenchConfig, files: list[str], tok_dir: str, workdir: Path) -> tuple[list[str], Rate]:
    """The Markdown table (raw tokenizer rates, then every build variant) and the raw ceiling rate."""
    raw = raw_rates(files, tok_dir)
    ceiling = raw["encode_batch_fast"]
    names = {k: f"raw `tokenizers` `{k}`, 1 thread" for k in ("encode_batch", "encode_batch_fast")}
    names["Encoder"] = "`data_prep.tokenizer.Encoder` (ASCII fast path), 1 thread"
    rows = [r.row(names[k], ceiling, 1, None) for k, r in raw.items()]
    one = None
    for w in cfg.workers:
        rate = build_rate(files, tok_dir, workdir / "out", w)
        one = one or (rate if w == 1 else None)
        rows.append(rate.row(f"`bert-prep build --workers {w}`", ceiling, w, one))
    # the same pipeline without blingfire: what reading, batching and writing cost on top of the tokenizer
    no_split = build_rate(files, tok_dir, workdir / "out", 1, split=False)
    rows.append(no_split.row("`bert-prep build --workers 1 --no-split-sentences`", ceiling, 1, None))
    # the same pipeline with every sentence through the full normalizer: its overhead over the raw tokenizer
    no_fast = build_rate(files, tok_dir, workdir / "out", 1, fast=False)
    rows.append(no_fast.row("`bert-prep build --workers 1 --no-ascii-fast-path`", ceiling, 1, None))
    parquet = build_rate([parquet_copy(files, workdir)], tok_dir, workdir / "out", 1)
    rows.append(parquet.row("`bert-prep build --workers 1`, the same documents as Parquet", ceiling, 1, None))
    header = (
        "| pipeline | tokens/s | MB/s of text | per worker vs raw | tokens per CPU-s | per CPU-s vs raw "
        "| scaling vs 1 worker |\n|---|---|---|---|---|---|---|"
    )
    return ["", header, *rows], ceiling


def other_measurements(cfg: PrepBenchConfig, files: list[str], tok_dir: str, workdir: Path, ceiling: Rate) -> list[str]:
    """Feeding rate, peak memory, restart cost and reader speed, one line each."""
    feed = feed_rate(files)
    lines = [
        f"main process feeding rate (read, chunk, pickle): {feed:.1f} MB of text per CPU-s, enough for "
        f"{feed / (ceiling.megabytes / ceiling.cpu):.0f} workers at the raw per-CPU rate"
    ]
    for w in cfg.workers:
        main_mb, worker_mb = peak_rss_mb(files, tok_dir, workdir / "peak", w)
        workers_note = f", largest worker {worker_mb:.0f} MB" if w > 1 else ""
        lines.append(f"peak RSS, --workers {w} --chunk-mb 1 (default): main process {main_mb:.0f} MB{workers_note}")
    full, resumed, done, total = resume_seconds(files, tok_dir, workdir / "resume")
    lines.append(
        f"restart: uninterrupted --workers 1 build {full:.2f} s; SIGKILLed after {done} of {total} chunks, "
        f"the re-run took {resumed:.2f} s ({resumed / full:.0%} of a full build)"
    )
    n, open_s, access_s = read_rates(workdir, cfg.read_sentences)
    lines.append(
        f"\nread: opening {n:,} sentences took {open_s * 1e3:.1f} ms (fresh process, warm page cache); "
        f"random access {access_s * 1e6:.2f} us per sentence (`ds[i]`, 200k random i)"
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.bench", description=__doc__.split("\n\n")[0])
    add_arguments(p, PrepBenchConfig)
    cfg = from_args(PrepBenchConfig, p.parse_args(argv))
    build_log = logging.getLogger("bert.data_prep.build")
    level = build_log.level
    build_log.setLevel(logging.WARNING)  # not every build's tokenizer and summary lines; restored below
    try:
        _run(cfg)
    finally:
        build_log.setLevel(level)
    return 0


def _run(cfg: PrepBenchConfig) -> None:
    files, tok_dir, workdir = _setup(cfg)
    if cfg.formats_only:
        parquet = parquet_copy(files, workdir)
        pairs = format_pairs(files, parquet, tok_dir, workdir / "out", cfg.repeats)
        log.info("\n".join(format_report(pairs)))
        for name, inputs in (("txt", files), ("Parquet", [parquet])):
            log.info(
                f"main process feeding rate, {name} (read, chunk, pickle): {feed_rate(inputs):.1f} MB of text per CPU-s"
            )
        return
    table, ceiling = throughput_table(cfg, files, tok_dir, workdir)
    log.info("\n".join(table))
    log.info("\n".join(other_measurements(cfg, files, tok_dir, workdir, ceiling)))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
