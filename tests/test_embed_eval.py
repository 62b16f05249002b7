"""`bert-embed eval`, `mine` and `task`: the report's keys and values against a hand count, BM25 on queries made
of their passage's words, one-line errors naming file and line, mined negatives, the module split of the task."""

import json
import math
from pathlib import Path

import pytest
import torch
from fixtures_embed import pairs, write_beir, write_pairs
from fixtures_finetune import build_tokenizer, tiny_checkpoint

from common.errors import UserError
from data_prep.tokenizer import load as load_tokenizer
from embed import cli
from embed.evaluate import EvalConfig, dense_run, evaluate, measure
from embed.mine import MineConfig, mine
from embed.model import EmbeddingModel, Prefixes, save_sentence_transformers
from embed.tasks import TaskConfig, build_task
from pretrain.runtime.weights import load_weights

pytest.importorskip("ir_measures")
pytest.importorskip("bm25s")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_eval")
    tok_dir = build_tokenizer(root / "tok")
    config, state = load_weights(tiny_checkpoint(root / "ckpt", tok_dir))
    model = EmbeddingModel(config)
    model.load_pretrained(state)
    save_sentence_transformers(model, model.state_dict(), str(root / "model"), load_tokenizer(str(tok_dir)),
                               Prefixes(), 48)  # fmt: skip
    rows = pairs(60, seed=5)
    return {"root": root, "model": root / "model", "beir": write_beir(root / "beir", rows), "rows": rows}


def test_report_keys_values_and_table(setup, capsys):
    out = setup["root"] / "report.json"
    report = evaluate(EvalConfig(model=str(setup["model"]), data=str(setup["beir"]), output=str(out)))
    keys = {"ndcg_at_10", "recall_at_100", "mrr_at_10", "bm25_ndcg_at_10", "bm25_recall_at_100", "bm25_mrr_at_10"}
    assert keys <= set(json.loads(out.read_text())) and all(0 <= report[k] <= 1 for k in keys)
    assert report["bm25_mrr_at_10"] > 0.7  # every query is its passage's rarer words (some passages share them)
    assert report["recall_at_100"] == 1.0  # 60 passages: all of them are in the top 100
    table = capsys.readouterr().out
    assert "nDCG@10" in table and "BM25" in table


def test_metrics_against_a_hand_count():
    qrels = {"a": {"x": 1}, "b": {"y": 1}, "c": {"z": 1}}
    run = {"a": {"x": 3.0, "y": 2.0}, "b": {"x": 3.0, "z": 2.5, "y": 2.0}, "c": {"x": 1.0}}  # ranks 1, 3, none
    got = measure(qrels, run)
    assert math.isclose(got["mrr_at_10"], (1 + 1 / 3 + 0) / 3)
    assert math.isclose(got["ndcg_at_10"], (1 + 1 / math.log2(4) + 0) / 3)
    assert math.isclose(got["recall_at_100"], 2 / 3)


def test_dense_run_is_exact_search():
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(5, 4, generator=g), torch.randn(300, 4, generator=g)
    run = dense_run(q, c, [f"q{i}" for i in range(5)], [f"d{i}" for i in range(300)], 100)
    scores = q @ c.T
    for i in range(5):
        top = scores[i].topk(100).indices.tolist()
        assert list(run[f"q{i}"]) == [f"d{j}" for j in top]


def copy_beir(src: Path, dst: Path) -> Path:
    (dst / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (dst / name).write_text((src / name).read_text())
    return dst


@pytest.mark.parametrize(
    "file,edit,message",
    [
        ("qrels/test.tsv", lambda t: t + "q1\td999\t1\n", "qrels/test.tsv line 62: corpus-id 'd999' is not in corpus"),
        ("queries.jsonl", lambda t: "", "queries.jsonl is empty"),
        ("corpus.jsonl", lambda t: t.replace("\n", "\n{oops\n", 1), "corpus.jsonl line 2 is not JSON"),
        ("qrels/test.tsv", lambda t: t + "q1 d1 1\n", "qrels/test.tsv line 62 is not 'query-id<TAB>corpus-id<TAB>"),
    ],
)
def test_bad_input_is_one_line_naming_file_and_line(setup, tmp_path, capsys, file, edit, message):
    beir = copy_beir(setup["beir"], tmp_path / "beir")
    (beir / file).write_text(edit((beir / file).read_text()))
    rc = cli.main(["eval", "--model", str(setup["model"]), "--data", str(beir), "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err


def test_malformed_pairs_line_is_one_line(setup, tmp_path, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"query": "a", "positive": "b"}\n{"query": "a"}\n')
    rc = cli.main(["train", "--init-from", str(setup["model"]), "--train", str(bad), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"error: {bad} line 2 has no string 'positive'; " + err.split("; ", 1)[1]


def test_mine_finds_negatives_that_are_not_the_positive(setup, tmp_path):
    src = write_pairs(tmp_path / "pairs.jsonl", setup["rows"])
    out = tmp_path / "mined.jsonl"
    assert mine(MineConfig(model=str(setup["model"]), train=str(src), output=str(out), negatives=2, skip=1)) == 60
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(len(m["negatives"]) == 2 and m["positive"] not in m["negatives"] for m in mined)
    assert {m["query"] for m in mined} == {r["query"] for r in setup["rows"]}


def test_mine_that_finds_too_few_negatives_writes_nothing(setup, tmp_path):
    """Asking for more negatives than the passages hold is one error, and no empty or partial file is left where
    a training set was expected (an older mined file stays as it was)."""
    src = write_pairs(tmp_path / "pairs.jsonl", setup["rows"])
    out = tmp_path / "mined.jsonl"
    out.write_text("the earlier file\n")
    with pytest.raises(UserError, match="no pair got 1000 negatives"):
        mine(MineConfig(model=str(setup["model"]), train=str(src), output=str(out), negatives=1000))
    assert out.read_text() == "the earlier file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mined.jsonl", "pairs.jsonl"]  # no temporary file left


def test_task_splits_by_module(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for m in range(6):
        body = "".join(
            f'def f{i}():\n    """Return the value number {i} of module {m}.\n\n'
            f'    This function computes value {i} that the caller of module {m} will use later on.\n    """\n'
            for i in range(4)
        )
        (root / f"mod{m}.py").write_text(body)
    counts = build_task(TaskConfig(output=str(tmp_path / "task"), root=str(root), test_fraction=0.3))
    assert counts["train"] + counts["test"] == 24 and counts["test"] % 4 == 0 and counts["test"] > 0
    modules = {
        split: {json.loads(line)["module"] for line in (tmp_path / "task" / split / "corpus.jsonl").open()}
        for split in ("train", "test")
    }
    assert not modules["train"] & modules["test"]
    pair = json.loads((tmp_path / "task" / "train" / "pairs.jsonl").open().readline())
    assert pair["query"].startswith("Return the value number") and "caller" in pair["positive"]
