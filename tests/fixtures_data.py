"""Tiny pretraining datasets for tests, written with IndexedDatasetWriter plus a hand-written manifest.

Every token id occurs once in the corpus, so a test can map any id of a sample back to its document,
sentence and position (`Corpus.doc/sent/pos`) and check pairing, continuation and held-out splits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep import integrity
from data_prep.indexed import IndexedDataset
from data_prep.indexed_writer import IndexedDatasetWriter

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
_SPECIAL_NAMES = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class Corpus:
    prefix: str
    documents: list[list[np.ndarray]]  # documents -> sentences -> ids
    doc: np.ndarray  # id -> document (-1 for ids not in the corpus)
    sent: np.ndarray  # id -> global sentence number
    pos: np.ndarray  # id -> global token position
    continuation: np.ndarray  # id -> is a `##` piece
    vocab_size: int


def write_vocab(directory: Path, vocab_size: int, continuation: np.ndarray) -> Path:
    """vocab.txt with the specials first, then `tN` or `##tN`."""
    directory.mkdir(parents=True, exist_ok=True)
    words = [("##" if continuation[i] else "") + f"t{i}" for i in range(len(_SPECIAL_NAMES), vocab_size)]
    (directory / "vocab.txt").write_text("\n".join(_SPECIAL_NAMES + words) + "\n")
    return directory


def make_corpus(
    root: Path,
    name: str = "corpus",
    num_docs: int = 40,
    max_sentences: int = 12,
    max_sentence_len: int = 12,
    seed: int = 0,
    first_id: int = len(_SPECIAL_NAMES),
    vocab_size: int = 8000,
    tokenizer_dir: Path | None = None,
) -> Corpus:
    """Write `root/name.{bin,idx,json}` with unique ids starting at `first_id` (and a vocab.txt)."""
    rng = np.random.default_rng(seed)
    continuation = np.random.default_rng(99).random(vocab_size) < 0.3
    continuation[: len(_SPECIAL_NAMES)] = False
    tokenizer_dir = tokenizer_dir or write_vocab(root / "tokenizer", vocab_size, continuation)
    doc = np.full(vocab_size, -1)
    sent = np.full(vocab_size, -1)
    pos = np.full(vocab_size, -1)
    documents, next_id, n_sent = [], first_id, 0
    prefix = str(root / name)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in range(num_docs):
            sentences = []
            for _ in range(int(rng.integers(1, max_sentences + 1))):
                ids = np.arange(next_id, next_id + int(rng.integers(1, max_sentence_len + 1)))
                assert ids[-1] < vocab_size, "corpus too large for its vocabulary"
                doc[ids], sent[ids], pos[ids] = d, n_sent, ids - first_id
                next_id, n_sent = next_id + len(ids), n_sent + 1
                sentences.append(ids)
                w.add_sequence(ids)
            w.end_document()
            documents.append(sentences)
    manifest = {
        "format": "mmidx-bert",
        "format_version": 2,
        "dtype": "uint16",
        "tokenizer": {
            "path": str(tokenizer_dir),
            "sha256": "test-vocab",
            "vocab_size": vocab_size,
            "lowercase": True,
            "special_tokens": SPECIALS,
        },
        "counts": {"documents": num_docs, "sentences": n_sent, "tokens": next_id - first_id},
    }
    manifest["integrity"] = integrity.record(IndexedDataset(prefix))
    Path(prefix + ".json").write_text(json.dumps(manifest))
    return Corpus(prefix, documents, doc, sent, pos, continuation, vocab_size)
