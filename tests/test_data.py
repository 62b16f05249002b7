"""Pretraining samples and loaders (pretrain/data.py) on tiny corpora whose ids map back to their source."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import SPECIALS, Corpus, make_corpus

from common import flags
from common.errors import UserError
from pretrain.data import PretrainingData, eval_batches
from pretrain.data_config import DataConfig
from pretrain.samples import pair_lengths as _pair_lengths
from pretrain.samples import permute

CLS, SEP, PAD, MASK = SPECIALS["cls"], SPECIALS["sep"], SPECIALS["pad"], SPECIALS["mask"]
SEQ = 48


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return make_corpus(tmp_path_factory.mktemp("data"), num_docs=60)


def _data(corpus: Corpus, **kw) -> PretrainingData:
    kw.setdefault("seq_len", SEQ)
    kw.setdefault("eval_fraction", 0.1)
    kw.setdefault("num_workers", 0)
    return PretrainingData(DataConfig(prefixes=[corpus.prefix], **kw))


def _segments(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of `[CLS] A [SEP] B [SEP]`, checking the frame and the token types."""
    ids, types = sample["input_ids"], sample["token_type_ids"]
    assert ids[0] == CLS and ids[-1] == SEP and len(ids) <= SEQ
    seps = np.flatnonzero(ids == SEP)
    assert len(seps) == 2, ids
    a, b = ids[1 : seps[0]], ids[seps[0] + 1 : -1]
    assert len(a) >= 1 and len(b) >= 1
    np.testing.assert_array_equal(types, np.r_[np.zeros(len(a) + 2), np.ones(len(b) + 1)])
    return a, b


def _one_run(corpus: Corpus, x: np.ndarray) -> int:
    """x is a contiguous run of corpus tokens inside one document; returns that document."""
    np.testing.assert_array_equal(np.diff(corpus.pos[x]), 1)
    docs = np.unique(corpus.doc[x])
    assert len(docs) == 1 and docs[0] >= 0
    return int(docs[0])


def _all_samples(data: PretrainingData, split: str, epochs: int = 1):
    for epoch in range(epochs):
        for i in range(data.num_samples(split)):
            yield data.sample(split, epoch, i)


def test_pair_truncation_matches_bert_reference():
    def truncate_seq_pair(tokens_a, tokens_b, max_num_tokens):  # google-research/bert create_pretraining_data.py
        while True:
            total_length = len(tokens_a) + len(tokens_b)
            if total_length <= max_num_tokens:
                break
            trunc_tokens = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
            if random.random() < 0.5:
                del trunc_tokens[0]
            else:
                trunc_tokens.pop()

    rng = np.random.default_rng(0)
    for _ in range(2000):
        la, lb, m = (int(v) for v in rng.integers(1, 120, 3))
        m = max(m, 2)
        a, b = list(range(la)), list(range(lb))
        truncate_seq_pair(a, b, m)
        assert _pair_lengths(la, lb, m) == [len(a), len(b)], (la, lb, m)


def test_permute_is_a_bijection():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        assert sorted(permute(i, n, (5, n)) for i in range(n)) == list(range(n))
    p1, p2 = (np.array([permute(i, 1000, (key,)) for i in range(1000)]) for key in (1, 2))
    assert (p1 != p2).mean() > 0.9 and (p1 != np.arange(1000)).mean() > 0.9


def test_nsp_pairs_are_true_continuations_or_other_documents(corpus):
    data = _data(corpus)
    assert data.vocab_size == corpus.vocab_size and data.special_tokens == SPECIALS
    labels, lengths, untruncated = [], [], 0
    for s in _all_samples(data, "train", epochs=3):
        a, b = _segments(s)
        doc_a, doc_b = _one_run(corpus, a), _one_run(corpus, b)
        label = int(s["nsp_label"])
        whole = len(a) + len(b) < SEQ - 3  # truncation always leaves exactly SEQ - 3 tokens
        if label == 1:
            assert doc_a == doc_b and corpus.sent[a].max() < corpus.sent[b].min()
            assert not whole or corpus.pos[b[0]] == corpus.pos[a[-1]] + 1  # B starts right after A
        else:
            assert label == 0 and doc_a != doc_b
            assert not whole or corpus.sent[b[0] - 1] != corpus.sent[b[0]]  # B starts a sentence
        untruncated += whole
        labels.append(label)
        lengths.append(len(s["input_ids"]))
    assert 0.4 < np.mean(labels) < 0.6, np.mean(labels)
    assert untruncated > 20
    assert max(lengths) == SEQ and np.mean(lengths) > 0.6 * SEQ


def test_sop_swaps_segments_of_one_document(corpus):
    data = _data(corpus, pair_task="sop")
    labels = []
    for s in _all_samples(data, "train", epochs=2):
        a, b = _segments(s)
        assert _one_run(corpus, a) == _one_run(corpus, b)
        in_order = corpus.sent[a].max() < corpus.sent[b].min()
        assert in_order == (int(s["nsp_label"]) == 1)
        labels.append(int(s["nsp_label"]))
    assert 0.4 < np.mean(labels) < 0.6


def test_mlm_only_packs_one_segment(corpus):
    data = _data(corpus, pair_task="none")
    for s in _all_samples(data, "train"):
        ids = s["input_ids"]
        assert ids[0] == CLS and ids[-1] == SEP and len(ids) <= SEQ and (ids[1:-1] != SEP).all()
        _one_run(corpus, ids[1:-1])
        assert (s["token_type_ids"] == 0).all() and int(s["nsp_label"]) == -100
    batch = data.batch("train", 0, 4)
    assert (batch["nsp_labels"] == -100).all()


def test_short_seq_prob_shortens_samples(corpus):
    full = np.mean([len(s["input_ids"]) for s in _all_samples(_data(corpus, short_seq_prob=0.0), "train")])
    short = np.mean([len(s["input_ids"]) for s in _all_samples(_data(corpus, short_seq_prob=1.0), "train")])
    assert short < 0.8 * full


def test_samples_are_pure_functions_of_seed_split_epoch_index(corpus):
    d1, d2 = _data(corpus), _data(corpus)
    for key in [("train", 0, 3), ("train", 5, 17), ("eval", 1, 2)]:
        np.testing.assert_array_equal(d1.sample(*key)["input_ids"], d2.sample(*key)["input_ids"])
    epoch0 = [d1.sample("train", 0, i)["input_ids"].tolist() for i in range(20)]
    epoch1 = [d1.sample("train", 1, i)["input_ids"].tolist() for i in range(20)]
    assert epoch0 != epoch1  # pairs and truncation are redrawn every epoch
    other_seed = _data(corpus, seed=7)
    assert [other_seed.sample("train", 0, i)["input_ids"].tolist() for i in range(20)] != epoch0


def test_heldout_documents_never_reach_training(corpus):
    data = _data(corpus, eval_fraction=0.2)
    docs = {}
    for split in ("train", "eval"):
        seen = set()
        for s in _all_samples(data, split, epochs=3):
            ids = s["input_ids"]
            seen |= set(corpus.doc[ids[ids > MASK]].tolist())
        docs[split] = seen
    assert docs["eval"] and docs["train"] and not docs["eval"] & docs["train"]
    assert 6 <= len(docs["eval"]) <= 14  # about 20% of 60 documents (one-sentence ones yield no pair)


def test_mixing_weights(tmp_path, corpus):
    big = make_corpus(tmp_path, "big", num_docs=60, seed=1, tokenizer_dir=Path(corpus.prefix).parent / "tokenizer")
    small = make_corpus(tmp_path, "small", num_docs=20, seed=2, first_id=4000, tokenizer_dir=Path(big.prefix).parent)

    def share_of_small(weights):
        data = PretrainingData(
            DataConfig([big.prefix, small.prefix], weights, seq_len=SEQ, eval_fraction=0.0, num_workers=0)
        )
        firsts = [int(s["input_ids"][1]) for s in _all_samples(data, "train", epochs=2)]
        return np.mean(np.array(firsts) >= 4000), data

    by_size, data = share_of_small(None)
    n_big, n_small = (len(s.maps["train"]) for s in data.sources)
    assert by_size == pytest.approx(n_small / (n_big + n_small), abs=1e-9)
    assert share_of_small([1.0, 3.0])[0] == pytest.approx(0.75, abs=0.01)
    assert share_of_small([1.0, 0.0])[0] == 0.0


def _rows(batch: dict) -> list[tuple]:
    """Each row of a batch without its padding: (ids, types, labelled positions, labels, nsp)."""
    out = []
    s = batch["input_ids"].shape[1]
    for r in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][r].sum())
        mine = (batch["masked_positions"] // s) == r
        out.append(
            (
                batch["input_ids"][r, :n].tolist(),
                batch["token_type_ids"][r, :n].tolist(),
                (batch["masked_positions"][mine] % s).tolist(),
                batch["mlm_labels"][mine].tolist(),
                int(batch["nsp_labels"][r]),
            )
        )
    return out


def test_batch_format_padding_and_labels(corpus):
    data = _data(corpus)
    batch = data.batch("train", 10, 8)
    b, s = batch["input_ids"].shape
    assert all(t.dtype == torch.long for t in batch.values()) and b == 8
    assert batch["attention_mask"].sum(1).max() == s  # padded only to the longest row
    assert (batch["input_ids"][batch["attention_mask"] == 0] == PAD).all()
    flat_ids = batch["input_ids"].flatten()
    for r, (ids, _, pos, labels, nsp) in enumerate(_rows(batch)):
        original = data.sample("train", *data.global_index("train", 10 + r))
        assert int(original["nsp_label"]) == nsp
        np.testing.assert_array_equal(np.asarray(original["input_ids"])[pos], labels)
        unlabelled = np.setdiff1d(np.arange(len(ids)), pos)
        np.testing.assert_array_equal(np.asarray(ids)[unlabelled], original["input_ids"][unlabelled])
        assert len(pos) >= 1 and not set(labels) & {CLS, SEP, PAD}
    assert (flat_ids[batch["masked_positions"]] == MASK).float().mean() > 0.5


def _take(it, n):
    return [_rows(next(it)) for _ in range(n)]


@pytest.mark.slow
def test_loader_is_independent_of_world_size_workers_and_resume(corpus):
    data = _data(corpus)
    single = _take(data.loader("train", 4, 0, 1, num_workers=0), 12)
    expected = [row for batch in single for row in batch]  # global samples 0..47 in order
    assert expected == [r for g in range(48) for r in _rows(data.batch("train", g, 1))]
    r0 = _take(data.loader("train", 2, 0, 2, num_workers=2), 12)
    r1 = _take(data.loader("train", 2, 1, 2, num_workers=1), 12)
    assert [row for i in range(12) for row in r0[i] + r1[i]] == expected
    resumed = _take(data.loader("train", 4, 0, 1, consumed_samples=20, num_workers=2), 7)
    assert [row for batch in resumed for row in batch] == expected[20:48]
    n = data.num_samples("train")  # the stream runs on into the next, reshuffled epoch
    wrap = _take(data.loader("train", 4, 0, 1, consumed_samples=n - 2, num_workers=0), 1)[0]
    assert wrap == [r for g in range(n - 2, n + 2) for r in _rows(data.batch("train", g, 1))]


def test_eval_batches_are_fixed_and_held_out(corpus):
    data = _data(corpus, eval_fraction=0.2)
    first = eval_batches(data, 2, 1, 2, max_samples=12)
    again = eval_batches(data, 2, 1, 2, max_samples=12)
    assert len(first) == 3
    for x, y in zip(first, again):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    rank0 = eval_batches(data, 2, 0, 2, max_samples=12)
    assert _rows(first[0]) != _rows(rank0[0])
    assert _rows(rank0[1]) == _rows(data.batch("eval", 4, 2))


def test_eval_masks_at_its_own_rate_whatever_training_masks(corpus):
    """Held-out MLM accuracy is measured at --eval-mask-prob (15%) for a run trained at 30%: the eval batches equal
    those of a run trained at 15%, and the training stream masks about twice as many tokens."""
    at30, at15 = _data(corpus, pair_task="none", mask_prob=0.3), _data(corpus, pair_task="none", mask_prob=0.15)
    for x, y in zip(eval_batches(at30, 4, 0, 1, 16), eval_batches(at15, 4, 0, 1, 16)):
        assert all(torch.equal(x[k], y[k]) for k in x)

    def share(batch):  # labelled tokens / maskable tokens ([MASK] or an id above the specials, as 0-4 are)
        return batch["mlm_labels"].numel() / (batch["input_ids"] >= MASK).sum().item()

    assert 0.25 < share(at30.batch("train", 0, 16)) < 0.35
    assert 0.12 < share(at30.batch("eval", 0, 16)) < 0.18
    with pytest.raises(UserError, match="--eval-mask-prob"):
        _data(corpus, eval_mask_prob=1.0)


def test_errors_are_one_line_user_errors(tmp_path, corpus):
    with pytest.raises(UserError, match="missing.bin/.idx does not exist"):
        PretrainingData(DataConfig([str(tmp_path / "missing")]))
    with pytest.raises(UserError, match="--pair-task"):
        PretrainingData(DataConfig([corpus.prefix], pair_task="mlm"))
    with pytest.raises(UserError, match="--data-weights"):
        PretrainingData(DataConfig([corpus.prefix], weights=[1.0, 2.0]))
    no_eval = _data(corpus, eval_fraction=0.0)
    with pytest.raises(UserError, match="--eval-fraction"):
        eval_batches(no_eval, 2, 0, 1, max_samples=10)
    with pytest.raises(UserError, match="--eval-fraction"):
        no_eval.loader("eval", 2, 0, 1)
    other = make_corpus(tmp_path, "other", num_docs=10)
    manifest = json.loads(Path(other.prefix + ".json").read_text())
    manifest["tokenizer"]["sha256"] = "another-vocab"
    Path(other.prefix + ".json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="different tokenizers"):
        PretrainingData(DataConfig([corpus.prefix, other.prefix]))
    Path(other.prefix + ".json").unlink()
    with pytest.raises(UserError, match="no tokenizer entry"):
        PretrainingData(DataConfig([other.prefix]))


def test_command_line_flags_build_the_config(corpus):
    parser = argparse.ArgumentParser()
    flags.add_arguments(parser, DataConfig)
    args = parser.parse_args(
        ["--data", "a", "b", "--data-weights", "1", "3", "--pair-task", "sop", "--whole-word-mask", "--seq-len", "64"]
    )
    cfg = flags.from_args(DataConfig, args)
    assert cfg == DataConfig(["a", "b"], [1.0, 3.0], seq_len=64, pair_task="sop", whole_word_mask=True)
    assert flags.from_args(DataConfig, parser.parse_args(["--data", "a"])) == DataConfig(["a"])
    packed = parser.parse_args(["--data", "a", "--pair-task", "none", "--packing", "--mask-prob", "0.3"])
    assert flags.from_args(DataConfig, packed) == DataConfig(["a"], pair_task="none", packing=True, mask_prob=0.3)
    with pytest.raises(UserError, match="--mask-prob"):
        flags.from_args(DataConfig, parser.parse_args(["--data", "a", "--mask-prob", "1.5"])).validate()
