"""finetune.metrics against the references users compare with: scikit-learn and seqeval."""

import random

import pytest

from finetune import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")
seqeval_metrics = pytest.importorskip("seqeval.metrics")


def noisy_copy(seq, choices, rate, rng):
    return [rng.choice(choices) if rng.random() < rate else x for x in seq]


@pytest.mark.parametrize("seed", range(5))
def test_classification_report_matches_sklearn(seed):
    rng = random.Random(seed)
    labels = ["neg", "neu", "pos", "rare"]
    y_true = rng.choices(labels[:3], k=200)  # "rare" only ever predicted: a class with zero support
    y_pred = noisy_copy(y_true, labels, 0.3, rng)
    ours = metrics.classification_report(y_true, y_pred)
    ref = sklearn_metrics.classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    assert ours["accuracy"] == pytest.approx(ref["accuracy"])
    assert ours["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert set(ours["per_class"]) == set(labels)
    for name, row in [
        *ours["per_class"].items(),
        ("macro avg", ours["macro avg"]),
        ("weighted avg", ours["weighted avg"]),
    ]:
        for key, ref_key in (
            ("precision", "precision"),
            ("recall", "recall"),
            ("f1", "f1-score"),
            ("support", "support"),
        ):
            assert row[key] == pytest.approx(ref[name][ref_key]), (name, key)


def random_bio(rng, n):
    """Well-formed and ill-formed BIO: I- after O, I- of another type, runs of B-."""
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    return [rng.choices(tags, weights=[6, 2, 2, 2, 2, 1, 1], k=n) for n in [rng.randint(1, 15) for _ in range(n)]]


@pytest.mark.parametrize("seed", range(5))
def test_entity_report_matches_seqeval(seed):
    rng = random.Random(seed)
    y_true = random_bio(rng, 60)
    y_pred = [noisy_copy(s, ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC"], 0.2, rng) for s in y_true]
    ours = metrics.entity_report(y_true, y_pred)
    ref = seqeval_metrics.classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    rows = {**ours["per_type"], **{k: ours[k] for k in ("micro avg", "macro avg", "weighted avg")}}
    assert set(rows) == set(ref)
    for name, row in rows.items():
        for key, ref_key in (
            ("precision", "precision"),
            ("recall", "recall"),
            ("f1", "f1-score"),
            ("support", "support"),
        ):
            assert row[key] == pytest.approx(ref[name][ref_key]), (name, key)
    assert ours["f1"] == pytest.approx(seqeval_metrics.f1_score(y_true, y_pred))


def test_entities_by_hand():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-PER", "B-ORG"]
    assert metrics.entities(tags) == {("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5), ("PER", 6, 6), ("ORG", 7, 7)}


def test_format_report_lists_every_row():
    text = metrics.format_report(metrics.classification_report(["a", "b", "b"], ["a", "b", "a"]))
    assert all(s in text for s in ("a ", "b ", "macro avg", "weighted avg", "accuracy 0.6667"))
