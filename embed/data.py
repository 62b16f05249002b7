"""Retrieval data on disk: training pairs (JSON lines) and BEIR-format directories.

- Pairs: one JSON object a line, `{"query": str, "positive": str}` and optionally `"negatives": [str, ...]`
  (hard negatives). Every line of a file carries the same number of negatives (the loss stacks them), so a
  line with another count is an error naming it.
- BEIR: `corpus.jsonl` (`{"_id", "title", "text"}`), `queries.jsonl` (`{"_id", "text"}`) and
  `qrels/{split}.tsv` (`query-id<TAB>corpus-id<TAB>score`, a header line). A passage's text is its title and
  text joined by a space (sentence-transformers' and BEIR's own convention for dense retrievers).
- Every error is one line naming the file and line: a malformed line, a missing field, a qrels id that is
  not in the corpus or the queries, an empty file.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError
from common.files import json_lines

PAIRS_HINT = 'each line must be {"query": ..., "positive": ...} with optional "negatives": [...]'
CORPUS_HINT = 'each line must be {"_id": ..., "title": ..., "text": ...}'
QUERIES_HINT = 'each line must be {"_id": ..., "text": ...}'


@dataclass
class Pair:
    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)


@dataclass
class Beir:
    """A BEIR directory read for one split: ids -> texts, and qrels {query id: {doc id: relevance}}."""

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def _text(path: Path, n: int, row: object, key: str, hint: str) -> str:
    if not isinstance(row, dict) or not isinstance(row.get(key), str):
        raise UserError(f"{path} line {n} has no string {key!r}; {hint}")
    return row[key]


def read_pairs(path: str | Path) -> list[Pair]:
    """The pairs of a JSON-lines file (see the module docstring)."""
    path, pairs = Path(path), []
    if not path.is_file():
        raise UserError(f"--train {path} is neither a JSON-lines file nor a BEIR directory")
    for n, row in json_lines(path, PAIRS_HINT):
        query, positive = _text(path, n, row, "query", PAIRS_HINT), _text(path, n, row, "positive", PAIRS_HINT)
        negatives = row.get("negatives", [])
        if not isinstance(negatives, list) or not all(isinstance(x, str) for x in negatives):
            raise UserError(f"{path} line {n}: 'negatives' must be a list of strings")
        if pairs and len(negatives) != len(pairs[0].negatives):
            raise UserError(
                f"{path} line {n} has {len(negatives)} negatives, the first line {len(pairs[0].negatives)}; "
                "give every line the same number"
            )
        pairs.append(Pair(query, positive, negatives))
    if not pairs:
        raise UserError(f"{path} holds no pairs; {PAIRS_HINT}")
    return pairs


def read_jsonl_texts(path: Path, hint: str, title: bool) -> dict[str, str]:
    """{_id: text} of a BEIR corpus or queries file."""
    if not path.is_file():
        raise UserError(f"{path} is missing; a BEIR directory holds corpus.jsonl, queries.jsonl and qrels/")
    out = {}
    for n, row in json_lines(path, hint):
        key = row.get("_id") if isinstance(row, dict) else None
        if not isinstance(key, str | int):
            raise UserError(f"{path} line {n} has no '_id'; {hint}")
        text = _text(path, n, row, "text", hint)
        if title and row.get("title"):
            text = f"{row['title']} {text}"
        out[str(key)] = text
    if not out:
        raise UserError(f"{path} is empty; {hint}")
    return out


def read_in(spec: str | Path, name: str) -> dict[str, str]:
    """{_id: text} of `name` (corpus.jsonl or queries.jsonl) in a BEIR directory `spec`, or of the file `spec`."""
    path = Path(spec) / name if Path(spec).is_dir() else Path(spec)
    return read_jsonl_texts(path, CORPUS_HINT if name == "corpus.jsonl" else QUERIES_HINT, name == "corpus.jsonl")


def read_qrels(path: Path, corpus: dict[str, str], queries: dict[str, str]) -> dict[str, dict[str, int]]:
    """{query id: {doc id: relevance}} of a qrels TSV, every id checked against the corpus and the queries."""
    if not path.is_file():
        raise UserError(f"{path} is missing; pass a BEIR directory with qrels/<split>.tsv")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (n == 1 and row[0] == "query-id"):
                continue
            if len(row) != 3 or not row[2].lstrip("-").isdigit():
                raise UserError(f"{path} line {n} is not 'query-id<TAB>corpus-id<TAB>score'")
            qid, did, score = row[0], row[1], int(row[2])
            if qid not in queries:
                raise UserError(f"{path} line {n}: query-id {qid!r} is not in queries.jsonl")
            if did not in corpus:
                raise UserError(f"{path} line {n}: corpus-id {did!r} is not in corpus.jsonl")
            qrels.setdefault(qid, {})[did] = score
    if not qrels:
        raise UserError(f"{path} holds no judgements")
    return qrels


def read_beir(directory: str | Path, split: str = "test") -> Beir:
    """A BEIR directory's corpus, the queries judged in `split`, and that split's qrels."""
    d = Path(directory)
    corpus = read_jsonl_texts(d / "corpus.jsonl", CORPUS_HINT, True)
    queries = read_jsonl_texts(d / "queries.jsonl", QUERIES_HINT, False)
    qrels = read_qrels(d / "qrels" / f"{split}.tsv", corpus, queries)
    return Beir(corpus, {q: queries[q] for q in qrels}, qrels)


def beir_pairs(directory: str | Path, split: str = "train") -> list[Pair]:
    """Training pairs of a BEIR directory: each judged-relevant (score > 0) query and passage."""
    beir = read_beir(directory, split)
    return [
        Pair(beir.queries[q], beir.corpus[d])
        for q, docs in beir.qrels.items()
        for d, score in docs.items()
        if score > 0
    ]


def training_pairs(spec: str) -> list[Pair]:
    """--train: a JSON-lines file of pairs or a BEIR directory (its qrels/train.tsv)."""
    return beir_pairs(spec) if Path(spec).is_dir() else read_pairs(spec)
