"""`bert-embed eval`: retrieval on a BEIR-format directory, measured as the field measures it, next to BM25.

    bert-embed eval --model DIR --data BEIR_DIR --output REPORT.json

Design choices:
- Exact search: unit-vector embeddings, the corpus scored by one matrix product per block of queries (the
  scores are the model's, and a demo-scale corpus fits in memory many times over). `--index` searches a FAISS
  index of the same corpus and model instead (embed.index), to measure what an approximate index costs.
- The metrics come from a kept library, `ir-measures` (nDCG@10, R@100, RR@10 = MRR@10, through
  pytrec_eval), on the top 100 passages of each query; the same library scores the BM25 run (`bm25s`, its
  English stopwords, no stemmer), so the two columns differ only in the retriever.
- A passage that is its query's own text does not count for it: BEIR's evaluation drops a hit whose id equals
  the query id (its `ignore_identical_ids`); we follow it only when ids overlap, which the demo's do not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import UserError
from common.files import write_json_atomic
from common.log import get_logger
from embed import data
from embed.model import encode, load_for_encoding

log = get_logger(__name__)
DEPTH = 100
KEYS = ("ndcg_at_10", "recall_at_100", "mrr_at_10")


@dataclass(kw_only=True)
class EvalConfig:
    """Retrieval quality of an embedding model on a BEIR directory, next to BM25.

    Reads corpus.jsonl, queries.jsonl and qrels/<split>.tsv; writes nDCG@10, Recall@100 and MRR@10 of the model
    and of BM25 to --output (JSON) and prints them as a table."""

    model: str
    """A `bert-embed train` output directory."""
    data: str
    """BEIR-format directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""
    output: str
    """Report JSON to write."""
    split: str = "test"
    """Which qrels file to evaluate (qrels/<split>.tsv)."""
    batch: int = 64
    """Texts per encoding batch."""
    no_bm25: bool = False
    """Skip the BM25 baseline."""
    index: str | None = None
    """A `bert-embed index` directory of --data's corpus built with --model: search it instead of exactly."""


Run = dict[str, dict[str, float]]


def dense_run(queries: torch.Tensor, corpus: torch.Tensor, qids: list[str], dids: list[str], depth: int) -> Run:
    """{query id: {doc id: cosine}} of the top `depth` passages of each query, by exact search."""
    run, k = {}, min(depth, len(dids))
    for start in range(0, len(qids), 256):
        scores, idx = (queries[start : start + 256] @ corpus.T).topk(k, dim=1)  # (b, k)
        for qid, row_s, row_i in zip(qids[start : start + 256], scores.tolist(), idx.tolist()):
            run[qid] = {dids[i]: s for i, s in zip(row_i, row_s)}
    return run


def index_run(cfg: EvalConfig, queries: torch.Tensor, qids: list[str], dids: list[str]) -> tuple[Run, str]:
    """(the run of a FAISS index of --data's corpus (embed.index), its kind), refused when built from another model
    or corpus."""
    from embed.index import Index, run_of

    index = Index(cfg.index)
    index.check_model(cfg.model)
    if sorted(index.ids) != sorted(dids):
        raise UserError(f"--index {cfg.index} holds {len(index.ids)} passages that are not --data's corpus.jsonl "
                        f"({len(dids)}); build it with `bert-embed index --corpus {cfg.data}`")  # fmt: skip
    return run_of(index, queries, qids, DEPTH), index.record["kind"]


def bm25_run(beir: data.Beir, depth: int) -> Run:
    import bm25s

    dids, qids = list(beir.corpus), list(beir.queries)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([beir.corpus[d] for d in dids], stopwords="en", show_progress=False),
                    show_progress=False)  # fmt: skip
    query_tokens = bm25s.tokenize([beir.queries[q] for q in qids], stopwords="en", show_progress=False)
    idx, scores = retriever.retrieve(query_tokens, k=min(depth, len(dids)), show_progress=False, n_threads=1)
    return {q: {dids[i]: float(s) for i, s in zip(row_i, row_s)} for q, row_i, row_s in zip(qids, idx, scores)}


def measure(qrels: dict[str, dict[str, int]], run: Run) -> dict[str, float]:
    """nDCG@10, Recall@100, MRR@10 (means over the judged queries; a query with no hit scores 0)."""
    import ir_measures
    from ir_measures import RR, R, nDCG

    found = ir_measures.calc_aggregate([nDCG @ 10, R @ 100, RR @ 10], qrels, run)
    by_name = {str(k): float(v) for k, v in found.items()}
    return {"ndcg_at_10": by_name["nDCG@10"], "recall_at_100": by_name["R@100"], "mrr_at_10": by_name["RR@10"]}


def table(report: dict) -> str:
    rows = [("model", "")] + ([("BM25", "bm25_")] if "bm25_ndcg_at_10" in report else [])
    lines = [f"{'':<8} {'nDCG@10':>8} {'R@100':>8} {'MRR@10':>8}"]
    for name, prefix in rows:
        lines.append(f"{name:<8} " + " ".join(f"{report[prefix + k]:>8.4f}" for k in KEYS))
    return "\n".join(lines)


def evaluate(cfg: EvalConfig) -> dict:
    """The report of cfg.model on cfg.data (also written to cfg.output and printed)."""
    beir = data.read_beir(cfg.data, cfg.split)  # bad input stops before the model loads
    if cfg.batch < 1:
        raise UserError("--batch must be at least 1")
    model, texts, _ = load_for_encoding(cfg.model)
    qids, dids = list(beir.queries), list(beir.corpus)
    queries = encode(model, [beir.queries[q] for q in qids], texts, "query", cfg.batch)
    if cfg.index:
        run, kind = index_run(cfg, queries, qids, dids)
        report, search = measure(beir.qrels, run), f"faiss {kind}"
    else:
        corpus = encode(model, [beir.corpus[d] for d in dids], texts, "passage", cfg.batch)
        report, search = measure(beir.qrels, dense_run(queries, corpus, qids, dids, DEPTH)), "exact"
    if not cfg.no_bm25:
        report |= {f"bm25_{k}": v for k, v in measure(beir.qrels, bm25_run(beir, DEPTH)).items()}
    report |= {"queries": len(qids), "corpus": len(dids), "model": cfg.model, "data": cfg.data, "split": cfg.split}
    report["search"] = search
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(cfg.output), report)
    print(table(report))
    log.info(f"report in {cfg.output}: {json.dumps({k: round(report[k], 4) for k in KEYS})}")
    return report
