"""Dynamic MLM masking (pretrain/masking.py): rates, special tokens, whole words."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import SPECIALS, make_corpus
from transformers import BertTokenizer

from common.errors import UserError
from pretrain.data import PretrainingData
from pretrain.data_config import DataConfig
from pretrain.masking import Masker

CLS, SEP, PAD, MASK = SPECIALS["cls"], SPECIALS["sep"], SPECIALS["pad"], SPECIALS["mask"]
VOCAB = 1000


def _sequence(rng: np.random.Generator, n_a: int, n_b: int, n_pad: int) -> np.ndarray:
    words = rng.integers(len(SPECIALS), VOCAB, n_a + n_b)
    return np.r_[CLS, words[:n_a], SEP, words[n_a:], SEP, np.full(n_pad, PAD)].astype(np.int64)


def test_rates_80_10_10_and_never_special_tokens():
    masker = Masker(VOCAB, MASK, SPECIALS.values(), mask_prob=0.15)
    rng = np.random.default_rng(0)
    kinds = np.zeros(3)  # [MASK], random, kept
    first_half = second_half = 0
    for _ in range(3000):
        ids = _sequence(rng, int(rng.integers(5, 60)), int(rng.integers(5, 60)), int(rng.integers(0, 10)))
        masked, pos, labels = masker.mask(ids, rng)
        maskable = int((ids > MASK).sum())
        assert len(pos) == max(1, round(0.15 * maskable))
        assert (np.diff(pos) > 0).all() and (ids[pos] > MASK).all()
        np.testing.assert_array_equal(labels, ids[pos])
        unlabelled = np.setdiff1d(np.arange(len(ids)), pos)
        np.testing.assert_array_equal(masked[unlabelled], ids[unlabelled])
        new = masked[pos]
        kinds += [(new == MASK).sum(), ((new != MASK) & (new != labels)).sum(), (new == labels).sum()]
        assert (new[new != MASK] > MASK).all()  # a random replacement is never a special id
        first_half += (pos < len(ids) / 2).sum()
        second_half += (pos >= len(ids) / 2).sum()
    share = kinds / kinds.sum()
    np.testing.assert_allclose(share, [0.8, 0.1, 0.1], atol=0.012)
    assert 0.35 < first_half / (first_half + second_half) < 0.65


def test_at_least_one_token_and_determinism():
    masker = Masker(VOCAB, MASK, SPECIALS.values(), mask_prob=0.15)
    ids = np.array([CLS, 50, SEP, 60, SEP])
    for seed in range(20):
        _, pos, labels = masker.mask(ids, np.random.default_rng(seed))
        assert len(pos) == 1 and labels[0] in (50, 60)
    a = masker.mask(_sequence(np.random.default_rng(1), 40, 40, 0), np.random.default_rng(5))
    b = masker.mask(_sequence(np.random.default_rng(1), 40, 40, 0), np.random.default_rng(5))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def _words(tokens: list[str]) -> list[list[int]]:
    """Positions of each whole word, from the WordPiece strings (specials end words)."""
    words: list[list[int]] = []
    for i, t in enumerate(tokens):
        if t.startswith("[") and t.endswith("]"):
            continue
        if t.startswith("##") and words and words[-1][-1] == i - 1:
            words[-1].append(i)
        else:
            words.append([i])
    return words


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("wwm"), num_docs=40)


def test_whole_word_masking_masks_whole_words(corpus):
    data = PretrainingData(
        DataConfig([corpus.prefix], seq_len=64, whole_word_mask=True, eval_fraction=0.0, num_workers=0)
    )
    hf = BertTokenizer.from_pretrained(str(corpus.prefix.rsplit("/", 1)[0] + "/tokenizer"))
    assert len(hf) == data.vocab_size
    hf_continuation = np.array([t.startswith("##") for t in hf.convert_ids_to_tokens(list(range(len(hf))))])
    np.testing.assert_array_equal(data.maskers["train"].continuation, hf_continuation)
    labelled = maskable = multi_piece = 0
    for g in range(300):
        original = data.sample("train", *data.global_index("train", g))["input_ids"]
        s = data.masked_sample("train", g)
        pos = set(s["masked_positions"].tolist())
        words = _words(hf.convert_ids_to_tokens(original.tolist()))
        covered = 0
        for w in words:
            inside = [p in pos for p in w]
            assert all(inside) or not any(inside), (w, sorted(pos))
            covered += len(w) * all(inside)
            multi_piece += all(inside) and len(w) > 1
        assert covered == len(pos)
        labelled += len(pos)
        maskable += sum(len(w) for w in words)
    assert 0.12 < labelled / maskable < 0.16
    assert multi_piece > 50


def test_masking_is_a_function_of_seed_split_and_global_index(corpus):
    data = PretrainingData(DataConfig([corpus.prefix], seq_len=64, eval_fraction=0.0, num_workers=0))
    again = PretrainingData(DataConfig([corpus.prefix], seq_len=64, eval_fraction=0.0, num_workers=0))
    n = data.num_samples("train")
    for g in (0, 7, n + 3):
        x, y = data.masked_sample("train", g), again.masked_sample("train", g)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    # The same underlying sample is masked anew in every epoch (dynamic masking).
    g0 = 5
    epoch, index = data.global_index("train", g0)
    g1 = next(g for g in range(n, 2 * n) if data.global_index("train", g)[1] == index)
    assert data.global_index("train", g1)[0] == epoch + 1
    masks = [data.masked_sample("train", g)["masked_positions"].tolist() for g in (g0, g1)]
    assert masks[0] != masks[1]


def test_continuations_from_a_tokenizer_directory_without_vocab_txt(tmp_path):
    corpus = make_corpus(tmp_path, num_docs=8)
    BertTokenizer.from_pretrained(str(tmp_path / "tokenizer")).save_pretrained(str(tmp_path / "fast"))
    assert not (tmp_path / "fast" / "vocab.txt").exists()
    manifest_path = Path(corpus.prefix + ".json")
    manifest = json.loads(manifest_path.read_text())
    manifest["tokenizer"]["path"] = str(tmp_path / "fast")
    manifest_path.write_text(json.dumps(manifest))
    cfg = DataConfig([corpus.prefix], whole_word_mask=True, eval_fraction=0.0, num_workers=0)
    np.testing.assert_array_equal(PretrainingData(cfg).maskers["train"].continuation, corpus.continuation)
    manifest["tokenizer"]["path"] = "no-such-org/no-such-tokenizer"  # a hub name, and we are offline
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="--whole-word-mask"):
        PretrainingData(cfg)
