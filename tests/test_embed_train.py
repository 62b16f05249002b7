"""`bert-embed train` end to end on tiny models of both families: the loss falls, metrics.jsonl records it, and the
output directory loads in sentence-transformers and gives our embeddings (cosine >= 0.9999); GradCache through the
engine gives the whole batch's gradient norm; two ranks with gathered negatives give one rank's."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_embed import ds_config, no_dropout_checkpoint, pairs, write_pairs
from fixtures_finetune import build_bpe_tokenizer, build_tokenizer, tiny_checkpoint, tiny_modernbert
from fixtures_train import free_port, run_env

from embed.model import TextEncoder, encode, load_embedding_model
from embed.train import EmbedTrainConfig, main

sentence_transformers = pytest.importorskip("sentence_transformers")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    tok = build_tokenizer(root / "tok")
    return {
        "root": root,
        "bert": tiny_checkpoint(root / "bert", tok),
        "still": no_dropout_checkpoint(root / "still", tok),
        "modernbert": tiny_modernbert(root / "modernbert", build_bpe_tokenizer(root / "bpe")),
        "pairs": write_pairs(root / "pairs.jsonl", pairs(160, seed=1, negatives=1)),
        "texts": [p["query"] for p in pairs(8, seed=2)] + [p["positive"] for p in pairs(8, seed=3)],
    }


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def sentence_transformers_agrees(out: Path, texts: list[str]) -> None:
    """Our encoding of queries and passages against SentenceTransformer(out) with the saved prompts."""
    model, tok, prefixes, saved = load_embedding_model(str(out))
    enc = TextEncoder(tok, prefixes, saved["max_seq_length"], saved["max_seq_length"])
    st = sentence_transformers.SentenceTransformer(str(out), device="cpu")
    for kind, prompt in (("query", "query"), ("passage", "document")):
        ours = encode(model, texts, enc, kind)
        theirs = torch.from_numpy(st.encode(texts, prompt_name=prompt, batch_size=5))
        cosine = torch.nn.functional.cosine_similarity(ours, theirs.float(), dim=-1)
        assert cosine.min() >= 0.9999, (kind, cosine)


def test_bert_learns_and_sentence_transformers_loads_it(setup):
    out = setup["root"] / "out_bert"
    cfg = EmbedTrainConfig(
        init_from=str(setup["bert"]),
        train=str(setup["pairs"]),
        output=str(out),
        epochs=3,
        batch=16,
        lr=1e-3,
        symmetric=True,
        query_prefix="query: ",
        passage_prefix="passage: ",
        passage_len=48,
    )
    report = main(cfg)
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 31)) and report["steps"] == 30
    first, last = sum(r["loss"] for r in records[:5]) / 5, sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    saved = json.loads((out / "config_sentence_transformers.json").read_text())
    assert saved["prompts"] == {"query": "query: ", "document": "passage: "}
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    sentence_transformers_agrees(out, setup["texts"])


def test_modernbert_cls_pooling_loads_in_sentence_transformers(setup):
    out = setup["root"] / "out_modernbert"
    cfg = EmbedTrainConfig(
        init_from=str(setup["modernbert"]),
        train=str(setup["pairs"]),
        output=str(out),
        max_steps=3,
        batch=8,
        pooling="cls",
        query_prefix="search_query: ",
        passage_len=48,
    )
    main(cfg)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ModernBertModel"]
    sentence_transformers_agrees(out, setup["texts"])


def first_grad_norm(setup, name: str, micro: int, accum: int, procs: int = 1, **flags) -> dict:
    """Step 1's record of a run on the dropout-free model: in this process, or `procs` ranks through the
    deepspeed launcher."""
    out = setup["root"] / name
    ds = ds_config(setup["root"] / f"{name}.json", micro, accum)
    if procs == 1:
        main(EmbedTrainConfig(init_from=str(setup["still"]), train=str(setup["pairs"]), output=str(out), max_steps=1,
                              deepspeed_config=str(ds), passage_len=48, **flags))  # fmt: skip
        return metrics(out)[0]
    args = ["--init-from", str(setup["still"]), "--train", str(setup["pairs"]), "--output", str(out),
            "--max-steps", "1", "--deepspeed_config", str(ds), "--passage-len", "48"]  # fmt: skip
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs), "--master_port",
           str(free_port()), "--module", "embed.cli", "train", *args]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return metrics(out)[0]


def test_grad_cache_through_the_engine_gives_the_whole_batch_gradient(setup):
    whole = first_grad_norm(setup, "whole", micro=8, accum=1)
    cached = first_grad_norm(setup, "cached", 4, 2, grad_cache=True)
    assert cached["samples"] == whole["samples"] == 8
    assert abs(cached["loss"] - whole["loss"]) < 1e-5 and abs(cached["grad_norm"] / whole["grad_norm"] - 1) < 1e-4


@pytest.mark.slow
def test_two_ranks_gather_negatives_as_one_rank_with_their_batch(setup):
    one = first_grad_norm(setup, "one_rank", micro=8, accum=1)
    two = first_grad_norm(setup, "two_ranks", 4, 1, procs=2)
    assert two["samples"] == one["samples"] == 8
    assert abs(two["loss"] - one["loss"]) < 1e-5 and abs(two["grad_norm"] / one["grad_norm"] - 1) < 1e-4


def test_simcse_trains_from_plain_text(setup):
    texts = setup["root"] / "texts.txt"
    texts.write_text("\n".join(p["positive"] for p in pairs(48, seed=7)) + "\n\n")
    out = setup["root"] / "out_simcse"
    cfg = EmbedTrainConfig(init_from=str(setup["bert"]), train=str(texts), output=str(out), simcse=True, batch=16,
                           passage_len=48)  # fmt: skip
    report = main(cfg)
    records = metrics(out)
    assert report["pairs"] == 48 and len(records) == 3
    assert 0 < records[0]["loss"] < math.log(16)  # the other view of itself beats chance, and dropout leaves a loss


def test_best_keeps_the_best_dev_epoch(setup):
    from fixtures_embed import write_beir

    from embed.evaluate import EvalConfig, evaluate

    dev = write_beir(setup["root"] / "dev", pairs(40, seed=9), split="dev")
    out = setup["root"] / "out_best"
    cfg = EmbedTrainConfig(init_from=str(setup["bert"]), train=str(setup["pairs"]), output=str(out), epochs=3,
                           batch=32, lr=1e-3, passage_len=48, dev=str(dev), best=True)  # fmt: skip
    report = main(cfg)
    scores = [d["ndcg_at_10"] for d in report["dev"]]
    assert len(scores) == 3 and report["best"]["ndcg_at_10"] == max(scores)
    assert [r["step"] for r in metrics(out) if r.get("split") == "eval"] == [5, 10, 15]
    again = evaluate(EvalConfig(model=str(out), data=str(dev), output=str(out / "dev.json"), split="dev", no_bm25=True))
    assert abs(again["ndcg_at_10"] - max(scores)) < 1e-6
    assert json.loads((out / "embed_config.json").read_text())["steps"] == report["best"]["step"]
