"""`bert-embed index` / `search` / `eval --index`: a flat FAISS index returns exactly the brute-force top k (ids
in order, scores to float32 rounding), HNSW and IVF find the exact neighbours where their knobs allow, and an
index built with another model is refused in one line."""

import json

import numpy as np
import pytest
import torch
from fixtures_embed import pairs, write_beir
from fixtures_finetune import build_tokenizer, tiny_checkpoint

from data_prep.tokenizer import load as load_tokenizer
from embed import cli
from embed.evaluate import DEPTH, EvalConfig, dense_run, evaluate
from embed.index import Index, IndexConfig, SearchConfig, build, build_index, search
from embed.model import EmbeddingModel, Prefixes, TextEncoder, encode, load_embedding_model, save_sentence_transformers
from pretrain.runtime.weights import load_weights

pytest.importorskip("faiss")


def unit_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=-1)


def exact_top(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (queries.double() @ corpus.double().T).topk(k, dim=1)  # float64: the order free of rounding


PARAMS = {"hnsw_m": 16, "ef_construction": 200, "ef_search": 400, "nlist": 8, "nprobe": 8}


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_top_k_equals_brute_force(kind):
    """flat always; HNSW with a search list longer than the corpus needs; IVF probing every cell."""
    corpus, queries = unit_rows(400, 24, seed=0), unit_rows(30, 24, seed=1)
    index = build_index(np.ascontiguousarray(corpus.numpy()), kind, PARAMS)
    scores, rows = index.search(np.ascontiguousarray(queries.numpy()), 10)
    want_scores, want_rows = exact_top(queries, corpus, 10)
    assert rows.tolist() == want_rows.tolist()
    np.testing.assert_allclose(scores, want_scores.numpy(), rtol=0, atol=1e-5)


def test_hnsw_with_a_short_search_list_is_approximate_but_close():
    corpus, queries = unit_rows(3000, 32, seed=2), unit_rows(50, 32, seed=3)
    index = build_index(np.ascontiguousarray(corpus.numpy()), "hnsw", PARAMS | {"ef_search": 16})
    _, rows = index.search(np.ascontiguousarray(queries.numpy()), 10)
    _, want = exact_top(queries, corpus, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), want.tolist())])
    assert 0.6 < recall <= 1.0, recall


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_index")
    tok_dir = build_tokenizer(root / "tok")
    models = {}
    for seed in (0, 1):
        config, state = load_weights(tiny_checkpoint(root / f"ckpt{seed}", tok_dir, seed=seed))
        model = EmbeddingModel(config)
        model.load_pretrained(state)
        models[seed] = root / f"model{seed}"
        save_sentence_transformers(model, model.state_dict(), str(models[seed]), load_tokenizer(str(tok_dir)),
                                   Prefixes(query="query: "), 48)  # fmt: skip
    return {"root": root, "models": models, "beir": write_beir(root / "beir", pairs(80, seed=5))}


def test_search_and_eval_through_a_flat_index_equal_exact_search(setup):
    root, model, beir = setup["root"], str(setup["models"][0]), setup["beir"]
    record = build(IndexConfig(model=model, corpus=str(beir), output=str(root / "idx"), kind="flat"))
    assert record["count"] == 80 and record["kind"] == "flat"
    run_file = root / "run.jsonl"
    search(SearchConfig(index=str(root / "idx"), queries=str(beir), output=str(run_file), k=10))
    got = {r["query_id"]: r["hits"] for r in map(json.loads, run_file.read_text().splitlines())}
    emb, tok, prefixes, saved = load_embedding_model(model)
    texts = TextEncoder(tok, prefixes, 48, 48)
    queries = {json.loads(line)["_id"]: json.loads(line)["text"] for line in (beir / "queries.jsonl").open()}
    corpus = {json.loads(line)["_id"]: json.loads(line)["text"] for line in (beir / "corpus.jsonl").open()}
    q = encode(emb, list(queries.values()), texts, "query")
    c = encode(emb, list(corpus.values()), texts, "passage")
    want = dense_run(q, c, list(queries), list(corpus), 10)
    assert set(got) == set(want)
    for qid, hits in got.items():
        assert [d for d, _ in hits] == list(want[qid]), qid
        np.testing.assert_allclose([s for _, s in hits], list(want[qid].values()), atol=1e-5)
    exact = evaluate(EvalConfig(model=model, data=str(beir), output=str(root / "exact.json"), no_bm25=True))
    indexed = evaluate(EvalConfig(model=model, data=str(beir), output=str(root / "indexed.json"), no_bm25=True,
                                  index=str(root / "idx")))  # fmt: skip
    assert indexed["search"] == "faiss flat" and exact["search"] == "exact"
    for key in ("ndcg_at_10", "recall_at_100", "mrr_at_10"):
        assert indexed[key] == pytest.approx(exact[key], abs=1e-9)
    assert DEPTH >= 10 and Index(str(root / "idx")).record["model_xxh3"]


def test_one_query_prints_its_hits_through_the_cli(setup, capsys):
    root, model = setup["root"], str(setup["models"][0])
    idx = root / "idx_hnsw"
    # cli._main: the command without run_cli's exit-time shutdown of a process group that earlier in-process
    # training tests of this session own
    assert cli._main(["index", "--model", model, "--corpus", str(setup["beir"] / "corpus.jsonl"), "--output",
                      str(idx)]) == 0  # fmt: skip
    capsys.readouterr()
    assert cli._main(["search", "--index", str(idx), "--query", "some words", "--k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and [line.split()[0] for line in lines] == ["1", "2", "3"]


def test_an_index_of_another_model_or_corpus_is_refused_in_one_line(setup, tmp_path, capsys):
    beir, idx = setup["beir"], tmp_path / "idx"
    build(IndexConfig(model=str(setup["models"][1]), corpus=str(beir), output=str(idx), kind="flat"))
    args = ["eval", "--model", str(setup["models"][0]), "--data", str(beir), "--output", str(tmp_path / "r.json")]
    assert cli.main([*args, "--index", str(idx), "--no-bm25"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the index was built with the model" in err
    other = write_beir(tmp_path / "other", pairs(30, seed=6))
    build(IndexConfig(model=str(setup["models"][0]), corpus=str(other), output=str(idx), kind="flat"))
    assert cli.main([*args, "--index", str(idx), "--no-bm25"]) == 2
    assert "not --data's corpus.jsonl" in capsys.readouterr().err
    assert cli.main(["search", "--index", str(tmp_path), "--query", "words"]) == 2
    assert "holds no index.json" in capsys.readouterr().err
