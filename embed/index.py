"""`bert-embed index` and `bert-embed search`: a FAISS index of a corpus's embeddings, built once, searched often.

    bert-embed index  --model EMB --corpus BEIR_DIR_OR_CORPUS_JSONL --output IDX [--kind hnsw|ivf|flat]
    bert-embed search --index IDX --query "how do I ..." [--k 10]       (or --queries queries.jsonl --output run.jsonl)
    bert-embed eval   --model EMB --data BEIR_DIR --index IDX --output report.json   (the index's run, measured)

Layout of IDX/:

    index.faiss     faiss.write_index of the index (inner product over unit vectors: cosine)
    ids.json        the corpus ids, in the index's row order
    index.json      {"format": "bert-embed-index", "version": 1, "kind", "dim", "count", "params", "model",
                     "model_xxh3", "corpus"}: written last, so an index without it is incomplete

Design choices:
- FAISS (`faiss-cpu`, in the `embed` extra) is imported only by these commands; the rest of bert-embed, exact
  search included, runs without it. Vectors are the model's normalized embeddings (embed.model.encode), so
  inner product is cosine similarity and `flat` returns exactly what `bert-embed eval`'s matrix product does.
- Kinds: `flat` (exact, IndexFlatIP: the reference), `hnsw` (IndexHNSWFlat: a graph, no training, the default:
  high recall at a small cost per query beyond ~100k passages), `ivf` (IndexIVFFlat: k-means cells, of which
  --nprobe are searched; trained on the corpus itself). Their knobs are flags and are saved in index.json.
- The index records the model it was built with (its directory and the XXH3-128 of its model.safetensors):
  a search encodes queries with that model, and `eval --index` with another model is a one-line error, since
  queries and passages from different models are not comparable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from common.errors import UserError
from common.files import write_json_atomic, write_text_atomic, xxh3_file
from common.log import get_logger
from embed import data
from embed.model import encode, load_for_encoding

log = get_logger(__name__)
FORMAT = "bert-embed-index"


@dataclass(kw_only=True)
class IndexConfig:
    """Build a FAISS index of a corpus's embeddings.

    Encodes every passage of --corpus with --model and writes the index, the ids and index.json to --output."""

    model: str
    """A `bert-embed train` output directory."""
    corpus: str
    """A BEIR directory (its corpus.jsonl) or a corpus.jsonl file ({"_id", "title", "text"} a line)."""
    output: str
    """Directory for index.faiss, ids.json and index.json."""
    kind: Literal["hnsw", "ivf", "flat"] = "hnsw"
    """hnsw: a graph (no training); ivf: k-means cells (trained on the corpus); flat: exact search."""
    hnsw_m: int = 32
    """HNSW: neighbours per node (more: higher recall, more memory)."""
    ef_construction: int = 200
    """HNSW: candidates kept while inserting (more: a better graph, slower build)."""
    ef_search: int = 128
    """HNSW: candidates kept while searching (saved; more: higher recall, slower queries)."""
    nlist: int = 0
    """IVF: k-means cells (0: 4 x sqrt(passages), at most passages / 39, FAISS's minimum per cell)."""
    nprobe: int = 16
    """IVF: cells searched per query (saved)."""
    batch: int = 64
    """Texts per encoding batch."""
    threads: int = 0
    """FAISS threads (0: its default, every core)."""


@dataclass(kw_only=True)
class SearchConfig:
    """Search a FAISS index built by `bert-embed index`.

    One --query is printed as a ranked list; --queries (queries.jsonl or a BEIR directory) writes a run
    ({"query_id", "hits": [[doc id, score], ...]} a line) to --output."""

    index: str
    """A `bert-embed index` output directory."""
    query: str | None = None
    """One query text (its top --k are printed)."""
    queries: str | None = None
    """A queries.jsonl ({"_id", "text"} a line) or a BEIR directory: every query is searched."""
    output: str | None = None
    """JSON-lines run for --queries."""
    k: int = 10
    """Passages returned per query."""
    batch: int = 64
    """Texts per encoding batch."""


def model_fingerprint(model_dir: str) -> str:
    path = Path(model_dir) / "model.safetensors"
    if not path.is_file():
        raise UserError(f"--model {model_dir} holds no model.safetensors; pass the --output of `bert-embed train`")
    return xxh3_file(path)


def build_index(vectors: np.ndarray, kind: str, params: dict):
    """A FAISS inner-product index of `vectors` ((N, H) float32 unit rows), searched as `params` say."""
    import faiss

    n, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    index.add(vectors)
    set_search_params(index, kind, params)
    return index


def set_search_params(index, kind: str, params: dict) -> None:
    if kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]
    elif kind == "ivf":
        index.nprobe = params["nprobe"]


def ivf_cells(cfg: IndexConfig, n: int) -> int:
    if cfg.nlist:
        if cfg.nlist > n:
            raise UserError(f"--nlist {cfg.nlist} exceeds the corpus's {n} passages; lower it (0 picks one)")
        return cfg.nlist
    return max(1, min(int(4 * n**0.5), n // 39))


def build(cfg: IndexConfig) -> dict:
    """Encode cfg.corpus with cfg.model, write the index to cfg.output; returns index.json's record."""
    for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe", "batch"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    corpus = data.read_in(cfg.corpus, "corpus.jsonl")  # bad input stops before the model loads
    faiss = _faiss(cfg.threads)
    model, texts, _ = load_for_encoding(cfg.model)
    ids = list(corpus)
    vectors = np.ascontiguousarray(encode(model, [corpus[d] for d in ids], texts, "passage", cfg.batch).numpy())
    params = {"hnsw_m": cfg.hnsw_m, "ef_construction": cfg.ef_construction, "ef_search": cfg.ef_search,
              "nlist": ivf_cells(cfg, len(ids)) if cfg.kind == "ivf" else 0, "nprobe": cfg.nprobe}  # fmt: skip
    index = build_index(vectors, cfg.kind, params)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)  # written last: its absence marks an index being built
    faiss.write_index(index, str(out / "index.faiss"))
    write_json_atomic(out / "ids.json", {"ids": ids})
    record = {"format": FORMAT, "version": 1, "kind": cfg.kind, "dim": int(vectors.shape[1]), "count": len(ids),
              "params": params, "model": str(Path(cfg.model).resolve()), "model_xxh3": model_fingerprint(cfg.model),
              "corpus": str(cfg.corpus)}  # fmt: skip
    write_json_atomic(out / "index.json", record)
    log.info(f"{cfg.kind} index of {len(ids)} passages ({vectors.shape[1]} dims) in {out}")
    return record


class Index:
    """A built index: its record, ids and FAISS index; `search` returns the top k of (N, H) query vectors."""

    def __init__(self, directory: str, threads: int = 0):
        d = Path(directory)
        if not (d / "index.json").is_file():
            raise UserError(f"--index {directory} holds no index.json; build it with `bert-embed index`")
        self.record = json.loads((d / "index.json").read_text())
        if self.record.get("format") != FORMAT:
            raise UserError(f"{d / 'index.json'} is not a bert-embed index (format {self.record.get('format')!r})")
        faiss = _faiss(threads)
        self.faiss = faiss.read_index(str(d / "index.faiss"))
        set_search_params(self.faiss, self.record["kind"], self.record["params"])
        self.ids = json.loads((d / "ids.json").read_text())["ids"]
        if len(self.ids) != self.faiss.ntotal:
            raise UserError(f"{d} holds {self.faiss.ntotal} vectors but {len(self.ids)} ids; rebuild it")

    def search(self, queries: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """[(doc id, cosine) best first] for each query row; fewer than k where the index finds fewer."""
        scores, rows = self.faiss.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), min(k, len(self.ids)))
        return [[(self.ids[i], float(s)) for s, i in zip(ss, ii) if i >= 0] for ss, ii in zip(scores, rows)]

    def check_model(self, model_dir: str) -> None:
        """Refuse queries from another model than the index's passages (one line naming both)."""
        if model_fingerprint(model_dir) != self.record["model_xxh3"]:
            raise UserError(
                f"the index was built with the model {self.record['model']}, not --model {model_dir} (their "
                "model.safetensors differ); rebuild the index with `bert-embed index --model` or pass its model"
            )


def run_of(index: Index, queries: torch.Tensor, qids: list[str], depth: int) -> dict[str, dict[str, float]]:
    """{query id: {doc id: cosine}} of the index's top `depth` (embed.evaluate.dense_run's shape)."""
    return {q: dict(hits) for q, hits in zip(qids, index.search(queries, depth))}


def search(cfg: SearchConfig) -> list[list[tuple[str, float]]]:
    """The hits of cfg.query (printed) or of every query of cfg.queries (written to cfg.output)."""
    if (cfg.query is None) == (cfg.queries is None):
        raise UserError("pass one of --query TEXT and --queries FILE")
    if cfg.queries is not None and not cfg.output:
        raise UserError("--queries writes a run: pass --output RUN.jsonl")
    if cfg.k < 1 or cfg.batch < 1:
        raise UserError("--k and --batch must be at least 1")
    if cfg.queries is not None:
        texts = data.read_in(cfg.queries, "queries.jsonl")
    else:
        texts = {"query": cfg.query}
    index = Index(cfg.index)
    model, encoder, _ = load_for_encoding(index.record["model"])
    index.check_model(index.record["model"])
    qids = list(texts)
    hits = index.search(encode(model, [texts[q] for q in qids], encoder, "query", cfg.batch), cfg.k)
    if cfg.query is not None:
        for rank, (doc, score) in enumerate(hits[0], 1):
            print(f"{rank:>3}  {score:.4f}  {doc}")
        return hits
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"query_id": qid, "hits": [[d, s] for d, s in row]}) + "\n" for qid, row in zip(qids, hits))
    write_text_atomic(cfg.output, "".join(lines))  # a crash leaves no half-written results file
    log.info(f"top {cfg.k} of {len(qids)} queries in {cfg.output}")
    return hits


def _faiss(threads: int):
    try:
        import faiss
    except ImportError:
        raise UserError('bert-embed index and search need FAISS: pip install -e ".[embed]" (faiss-cpu)') from None
    if threads:
        faiss.omp_set_num_threads(threads)
    return faiss
