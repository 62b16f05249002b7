"""The measurements of `python -m data_prep.bench` that need a process of their own (started with this
checkout on its path): reading speed, the cost of resuming a killed build, and a build's peak memory.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common.errors import UserError
from data_prep import indexed, indexed_writer, text
from data_prep.build import BuildConfig, build
from data_prep.inputs import resolve_inputs

ROOT = Path(__file__).resolve().parents[1]  # so the probe subprocesses import this checkout

READ_PROBE = """
import sys, time, numpy as np
from data_prep.indexed import IndexedDataset
t0 = time.perf_counter()
ds = IndexedDataset(sys.argv[1])
t1 = time.perf_counter()
idx = np.random.default_rng(0).integers(0, len(ds), 200_000)
t2 = time.perf_counter()
s = 0
for i in idx.tolist():
    s += len(ds[i])
t3 = time.perf_counter()
print(len(ds), t1 - t0, (t3 - t2) / len(idx), s)
"""


def read_rates(workdir: Path, n: int) -> tuple[int, float, float]:
    """Write `n` random sentences (1-32 tokens), then in a fresh process: open time, random access time."""
    prefix = workdir / f"read_{n}"
    if not indexed.paths(prefix)[1].exists():
        rng = np.random.default_rng(0)
        with indexed_writer.IndexedDatasetWriter(prefix, np.uint16) as w:
            for start in range(0, n, 1_000_000):
                lengths = rng.integers(1, 33, min(1_000_000, n - start)).astype(np.int32)
                docs = np.full(max(len(lengths) // 10, 1), 10)
                docs[-1] += len(lengths) - docs.sum()
                w.add_documents(rng.integers(5, 30000, int(lengths.sum())).astype(np.uint16), lengths, docs)
    r = subprocess.run(
        [sys.executable, "-c", READ_PROBE, str(prefix)], capture_output=True, text=True, check=True, cwd=ROOT
    )
    count, open_s, access_s, _ = r.stdout.split()
    return int(count), float(open_s), float(access_s)


KILLABLE_BUILD = """
import os, signal, sys
from data_prep import build
from data_prep.cli import main
build.JOURNAL_SECONDS = 0.0  # a journal after every chunk
kill_at, calls, real = int(sys.argv[1]), [], build._ChunkWork.__call__
def work(self, parts):  # SIGKILL as chunk kill_at + 1 starts
    calls.append(1)
    if len(calls) > kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, parts)
build._ChunkWork.__call__ = work
sys.exit(main(sys.argv[2:]))
"""


def resume_seconds(files: list[str], tok_dir: str, out: Path, fraction: float = 0.75) -> tuple[float, float, int, int]:
    """Wall seconds of a one-worker build uninterrupted and of its re-run after a SIGKILL once `fraction` of
    its chunks (at least 8 of them) were written, and (chunks done, chunks in all)."""
    mb = sum(Path(f).stat().st_size for f in files) / 1e6
    chunk_mb = min(1.0, mb / 8)
    cfg = BuildConfig(input=files, tokenizer=tok_dir, output=str(out), overwrite=True, progress=False,
                      chunk_mb=chunk_mb)  # fmt: skip
    reader = text.TextReader(resolve_inputs(files))
    total = sum(1 for _ in text.chunked(reader.parts(int(chunk_mb * 1e6)), int(chunk_mb * 1e6)))
    full = min(_timed_build(cfg) for _ in range(2))
    kill_at = int(fraction * total)
    argv = ["build", "--input", *files, "--tokenizer", tok_dir, "--output", str(out), "--overwrite"]
    argv += ["--no-progress", "--chunk-mb", str(chunk_mb)]
    subprocess.run([sys.executable, "-c", KILLABLE_BUILD, str(kill_at), *argv], cwd=ROOT, capture_output=True)
    if not Path(f"{out}.journal.tmp").exists():
        raise UserError(f"the killed build left no journal in {out}.journal.tmp; the restart was not measured")
    return full, _timed_build(cfg), kill_at, total


def _timed_build(cfg: BuildConfig) -> float:
    wall = time.perf_counter()
    build(cfg)
    return time.perf_counter() - wall


# The probe's own peak is its VmHWM: getrusage's ru_maxrss survives exec, so it would report this (large)
# benchmark process instead; the workers are the probe's own children, so their ru_maxrss is theirs.
PEAK_PROBE = """
import resource, sys
from data_prep.cli import main
assert main(sys.argv[1:]) == 0
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mb(files: list[str], tok_dir: str, out: Path, workers: int) -> tuple[float, float]:
    """Peak RSS (MB) of the main process and of the largest worker for a default `bert-prep build`."""
    argv = ["build", "--input", *files, "--tokenizer", tok_dir, "--output", str(out), "--overwrite", "--no-progress"]
    argv += ["--workers", str(workers)]
    r = subprocess.run([sys.executable, "-c", PEAK_PROBE, *argv], capture_output=True, text=True, check=True, cwd=ROOT)
    main_kb, child_kb = r.stdout.split()[-2:]
    return int(main_kb) / 1024, int(child_kb) / 1024
