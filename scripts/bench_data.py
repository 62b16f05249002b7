"""Time the pretraining data pipeline on a synthetic corpus: sample-map build, samples/s, loader batches/s.

    python scripts/bench_data.py --documents 200000 --workers 0 2

Writes a throwaway dataset (random ids, Zipf-like sentence lengths) under --dir and prints one line per
measurement. Numbers in docs/PERFORMANCE.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from data_prep.indexed_writer import IndexedDatasetWriter
from pretrain.data import PretrainingData
from pretrain.data_config import DataConfig

SPECIALS = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}


def write_corpus(prefix: str, documents: int, seed: int = 0) -> int:
    """Random documents of 1-40 sentences of 4-60 tokens; returns the sentence count."""
    rng = np.random.default_rng(seed)
    sentences = 0
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for start in range(0, documents, 10000):
            n_docs = min(10000, documents - start)
            per_doc = rng.integers(1, 41, n_docs)
            lengths = rng.integers(4, 61, int(per_doc.sum()))
            ids = rng.integers(1000, 30522, int(lengths.sum()))
            bounds = np.cumsum(per_doc)
            first = 0
            for end in bounds:
                seg = lengths[first:end]
                offset = int(lengths[:first].sum())
                w.add_sequences(ids[offset : offset + int(seg.sum())], seg)
                w.end_document()
                first = end
            sentences += int(per_doc.sum())
    tokenizer = {"path": "bert-base-uncased", "vocab_size": 30522, "special_tokens": SPECIALS}
    Path(prefix + ".json").write_text(json.dumps({"format": "mmidx-bert", "tokenizer": tokenizer}))
    return sentences


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--documents", type=int, default=200000, help="synthetic documents to write")
    p.add_argument("--seq-len", type=int, default=128, help="sample length")
    p.add_argument("--micro-batch", type=int, default=32, help="loader micro-batch size")
    p.add_argument("--batches", type=int, default=100, help="loader batches to time per setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts to time")
    p.add_argument("--dir", default=None, help="where to write the corpus (default: a temporary directory)")
    args = p.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_data_"))
    prefix = str(root / "synthetic")
    t = time.perf_counter()
    sentences = write_corpus(prefix, args.documents)
    print(f"wrote {args.documents} documents, {sentences} sentences in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    data = PretrainingData(DataConfig([prefix], seq_len=args.seq_len, num_workers=0))
    n = data.num_samples("train")
    print(f"PretrainingData init (sample maps): {time.perf_counter() - t:.2f}s, {n} train samples per epoch")
    t = time.perf_counter()
    for g in range(2000):
        data.masked_sample("train", g)
    print(f"masked_sample: {2000 / (time.perf_counter() - t):.0f} samples/s in one process")
    for workers in args.workers:
        it = data.loader("train", args.micro_batch, 0, 1, num_workers=workers)
        next(it)  # start the workers
        t = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        rate = args.batches * args.micro_batch / (time.perf_counter() - t)
        print(f"loader workers={workers} micro-batch={args.micro_batch}: {rate:.0f} samples/s")
        del it


if __name__ == "__main__":
    main()
