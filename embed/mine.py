"""`bert-embed mine`: hard negatives for training pairs, found by the current model.

Each query's candidates are the pairs' positives (or a BEIR corpus with --corpus), ranked by the model;
the negatives are the best-ranked passages from rank --skip on that are neither the query's positive nor a
positive of the same query text (a false negative the loss would also mask). Skipping the very top keeps
unjudged true answers out (the top hits of a decent model are often relevant but unlabelled).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.files import write_text_atomic
from common.log import get_logger
from embed import data
from embed.model import encode, load_for_encoding

log = get_logger(__name__)


@dataclass(kw_only=True)
class MineConfig:
    """Hard negatives for training pairs, mined with an embedding model.

    Writes the pairs again with "negatives": the model's best-ranked passages that are not the positive."""

    model: str
    """A `bert-embed train` output directory (the model that ranks)."""
    train: str
    """JSON-lines pairs or a BEIR directory (its qrels/train.tsv)."""
    output: str
    """JSON-lines file for the pairs with their negatives."""
    negatives: int = 3
    """Hard negatives per pair."""
    skip: int = 2
    """Ranks left out at the top of each query's list (likely unlabelled positives)."""
    corpus: str | None = None
    """A BEIR corpus.jsonl to draw negatives from (default: the pairs' positives)."""
    batch: int = 64
    """Texts per encoding batch."""


def mine(cfg: MineConfig) -> int:
    """Write cfg.output; returns the number of pairs written."""
    if cfg.negatives < 1 or cfg.skip < 0:
        raise UserError("--negatives must be at least 1 and --skip at least 0")
    pairs = data.training_pairs(cfg.train)
    if cfg.corpus:
        passages = list(dict.fromkeys(data.read_jsonl_texts(Path(cfg.corpus), data.CORPUS_HINT, True).values()))
    else:
        passages = list(dict.fromkeys(p.positive for p in pairs))
    model, texts, _ = load_for_encoding(cfg.model)
    corpus = encode(model, passages, texts, "passage", cfg.batch)
    queries = encode(model, [p.query for p in pairs], texts, "query", cfg.batch)
    correct: dict[str, set[str]] = {}
    for p in pairs:
        correct.setdefault(p.query, set()).add(p.positive)
    depth = min(len(passages), cfg.skip + cfg.negatives + max(len(s) for s in correct.values()))
    ranked = (queries @ corpus.T).topk(depth, dim=1).indices.tolist()
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for pair, row in zip(pairs, ranked):
        found = [passages[i] for i in row[cfg.skip :] if passages[i] not in correct[pair.query]]
        if len(found) < cfg.negatives:
            continue  # every line must carry the same number of negatives
        record = {"query": pair.query, "positive": pair.positive, "negatives": found[: cfg.negatives]}
        lines.append(json.dumps(record) + "\n")
    written = len(lines)
    if not written:  # nothing is written: no empty file where a training set was expected
        raise UserError(f"no pair got {cfg.negatives} negatives; lower --negatives or --skip, or pass --corpus")
    write_text_atomic(cfg.output, "".join(lines))  # a crash leaves no half-written file
    log.info(f"{written} of {len(pairs)} pairs with {cfg.negatives} hard negatives each in {cfg.output}")
    return written
