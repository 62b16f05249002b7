"""`python -m finetune.demo_tasks word-order`: swap detection built only from the documents pretraining held out."""

import csv
from pathlib import Path

import pytest
from fixtures_data import make_corpus

from common.errors import UserError
from data_prep import tokenizer
from finetune import demo_tasks as tasks
from pretrain.data import PretrainingData
from pretrain.data_config import DataConfig


def read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # 150 documents of up to 12 sentences of 8-20 tokens, every token id once (so every sentence is distinct)
    return make_corpus(tmp_path_factory.mktemp("wo"), num_docs=150, max_sentence_len=20, vocab_size=16000)


def build(corpus, out, **kw):
    cfg = tasks.WordOrderConfig(output=str(out), data=corpus.prefix, data_eval_fraction=0.2, data_seed=7, **kw)
    return tasks.build_word_order(cfg)


def test_word_order_uses_only_held_out_documents_balanced_and_deterministic(corpus, tmp_path):
    counts = build(corpus, tmp_path / "a", eval_examples=60, train_examples=30)
    rows = {name: read(tmp_path / "a" / f"{name}.csv") for name in ("train", "eval")}
    assert {k: len(v) for k, v in rows.items()} == counts and counts["train"] == 30 and counts["eval"] >= 60

    # the pretraining pipeline's own split (the same --eval-fraction and --seed) is the reference
    split = PretrainingData(DataConfig(prefixes=[corpus.prefix], eval_fraction=0.2, seed=7)).sources[0].split_docs
    train_docs, held_out = set(split["train"].tolist()), set(split["eval"].tolist())
    used = {name: {int(r["document"]) for r in part} for name, part in rows.items()}
    assert used["train"] | used["eval"] <= held_out and not (used["train"] | used["eval"]) & train_docs
    assert not used["train"] & used["eval"]  # fine-tuning train and eval sentences come from different documents

    # every sentence is a sentence of its document, as written (original) or with two words exchanged (swapped)
    decode = tokenizer.load(str(Path(corpus.prefix).parent / "tokenizer"))  # the vocabulary make_corpus wrote
    for part in rows.values():
        for r in part:
            doc = [decode.decode(ids.tolist()) for ids in corpus.documents[int(r["document"])]]
            if r["label"] == "original":
                assert r["text"] in doc
            else:
                words = r["text"].split()
                source = [s for s in doc if sorted(s.split()) == sorted(words)]
                assert len(source) == 1 and sum(a != b for a, b in zip(words, source[0].split())) == 2

    for part in rows.values():  # balanced: labels alternate
        labels = [r["label"] for r in part]
        assert abs(labels.count("original") - labels.count("swapped")) <= 1

    build(corpus, tmp_path / "b", eval_examples=60, train_examples=30)
    for name in ("train", "eval"):
        assert (tmp_path / "a" / f"{name}.csv").read_bytes() == (tmp_path / "b" / f"{name}.csv").read_bytes()


def test_word_order_on_a_small_held_out_share_halves_it_or_fails_in_one_line(corpus, tmp_path, capsys):
    counts = build(corpus, tmp_path / "half", eval_examples=100_000)
    assert abs(counts["eval"] - counts["train"]) < 40  # whole documents: about half each
    assert "fewer than --eval-examples 100000" in capsys.readouterr().out
    cfg = tasks.WordOrderConfig(output=str(tmp_path), data=corpus.prefix, data_eval_fraction=0.01, data_seed=7)
    with pytest.raises(UserError, match="hold only .* sentences of 6-40 words, too few"):
        tasks.build_word_order(cfg)
