"""Where `bert-prep build` writes: the output prefixes (one, or K shards), the files of an earlier or killed run,
`Router` (document j of the corpus to shard j % K) and `Journal` (`PREFIX.journal.tmp`: the chunks written and
each writer's state, so a killed build resumes; docs/DESIGN.md, "Build journal").
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.files import write_json_atomic
from data_prep import indexed, indexed_writer


def output_prefixes(output: str, shards: int) -> list[str]:
    return [output] if shards == 0 else [f"{output}_{k:05d}" for k in range(shards)]


def existing_outputs(output: str) -> list[str]:
    names = [str(p) for p in indexed.paths(output) if p.exists()]
    for ext in ("bin", "idx", "json"):
        names += glob.glob(f"{glob.escape(output)}_[0-9][0-9][0-9][0-9][0-9].{ext}")
    return sorted(names)


def is_output(path: Path, out: Path) -> bool:
    """Whether `path` is one of the files `--output out` writes (dataset, shard or temporary file)."""
    if path.parent != out.parent or not path.name.startswith(out.name):
        return False
    rest = path.name[len(out.name) :]
    rest = rest[6:] if len(rest) > 6 and rest[0] == "_" and rest[1:6].isdigit() else rest
    return rest.split(".tmp")[0] in (".bin", ".idx", ".json", ".idx.lengths", ".idx.docs", ".journal")


def remove_stale(output: str) -> None:
    """Delete the `*.tmp` leftovers of a killed run."""
    escaped = glob.escape(output)
    for pattern in (f"{escaped}.*.tmp", f"{escaped}_[0-9][0-9][0-9][0-9][0-9].*.tmp"):
        for name in glob.glob(pattern):
            os.unlink(name)


class Journal:
    """`PREFIX.journal.tmp`: how many chunks the writers hold, and their state, for a restart."""

    def __init__(self, output: str, fingerprint: str):
        self.output, self.fingerprint = output, fingerprint
        self.path = Path(f"{output}.journal.tmp")
        self.chunks = 0  # chunks written to the writers (by this run and the interrupted one)

    def open_writers(self, prefixes: list[str], dtype: np.dtype) -> list[indexed_writer.IndexedDatasetWriter]:
        """Writers resumed from an interrupted run of the same build, else fresh ones (stale files removed)."""
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("fingerprint") == self.fingerprint and len(saved.get("writers", [])) == len(prefixes):
            writers: list[indexed_writer.IndexedDatasetWriter] = []
            try:
                for p, state in zip(prefixes, saved["writers"]):
                    writers.append(indexed_writer.IndexedDatasetWriter(p, dtype, resume=state))
                self.chunks = int(saved["chunks"])
                return writers
            except (indexed.ResumeError, KeyError, TypeError, ValueError):
                for w in writers:
                    w.detach()
        remove_stale(self.output)
        return [indexed_writer.IndexedDatasetWriter(p, dtype) for p in prefixes]

    def write(self, writers: list[indexed_writer.IndexedDatasetWriter]) -> None:
        states = [w.state(sync=True) for w in writers]  # data on disk before the journal that points to it
        write_json_atomic(self.path, {"fingerprint": self.fingerprint, "chunks": self.chunks, "writers": states})

    def exists(self) -> bool:
        return self.path.is_file()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        Path(f"{self.path}.tmp").unlink(missing_ok=True)  # a kill while the journal was being written leaves it


@dataclass
class Router:
    """Sends each chunk's documents to the writers; with K shards, document j of the corpus goes to shard j % K."""

    writers: list[indexed_writer.IndexedDatasetWriter]
    next_document: int = 0  # global index of the next chunk's first document (counting its open part)

    @property
    def prefixes(self) -> list[str]:
        return [w.prefix for w in self.writers]

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
