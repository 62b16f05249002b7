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


scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("seed", range(4))
def test_glue_metrics_match_sklearn_and_scipy(seed):
    rng = random.Random(seed)
    gold = rng.choices(["0", "1"], weights=[1, 2], k=150)
    pred = noisy_copy(gold, ["0", "1"], 0.35, rng)
    assert metrics.matthews(gold, pred) == pytest.approx(sklearn_metrics.matthews_corrcoef(gold, pred))
    assert metrics.binary_f1(gold, pred, "1") == pytest.approx(sklearn_metrics.f1_score(gold, pred, pos_label="1"))
    three = rng.choices(["contradiction", "entailment", "neutral"], k=150)
    noisy = noisy_copy(three, ["contradiction", "entailment", "neutral"], 0.4, rng)
    assert metrics.matthews(three, noisy) == pytest.approx(sklearn_metrics.matthews_corrcoef(three, noisy))
    scores = [round(rng.uniform(0, 5), 1) for _ in range(150)]  # rounded: many ties, as STS-B's gold has
    guess = [s + rng.gauss(0, 1.5) for s in scores]
    assert metrics.pearson(scores, guess) == pytest.approx(scipy_stats.pearsonr(scores, guess)[0])
    assert metrics.spearman(scores, guess) == pytest.approx(scipy_stats.spearmanr(scores, guess)[0])
    coarse = [round(g) for g in guess]  # ties on both sides
    assert metrics.spearman(scores, coarse) == pytest.approx(scipy_stats.spearmanr(scores, coarse)[0])


def test_degenerate_glue_metrics_are_zero():
    """A constant prediction (an untrained model): sklearn gives MCC 0; scipy gives NaN correlations, we 0."""
    assert metrics.matthews(["0", "1", "1"], ["1", "1", "1"]) == sklearn_metrics.matthews_corrcoef([0, 1, 1], [1, 1, 1])
    assert metrics.pearson([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == 0.0 == metrics.spearman([1.0, 2.0], [5.0, 5.0])


# SQuAD: cases worked out by hand with the official evaluation scripts' rules (v1.1 and v2.0 agree on them).
SQUAD_CASES = [  # gold answers, prediction, exact, F1
    (["Denver Broncos"], "the Denver Broncos!", 1, 1.0),  # articles, punctuation, case
    (["Denver Broncos"], "Broncos", 0, 2 / 3),  # P 1, R 1/2
    (["Santa Clara, California", "Levi's Stadium"], "Levi's Stadium in Santa Clara", 0, 4 / 7),  # best gold: P 2/5, R 1
    (["1,000 feet"], "1000 feet", 1, 1.0),  # punctuation inside a token goes
    (["the cat the cat"], "cat", 0, 2 / 3),  # repeated tokens count with multiplicity
    (["an apple"], "Apple.", 1, 1.0),
]


def test_squad_em_f1_by_hand():
    gold = {f"q{i}": g for i, (g, _, _, _) in enumerate(SQUAD_CASES)}
    preds = {f"q{i}": p for i, (_, p, _, _) in enumerate(SQUAD_CASES)}
    report = metrics.squad_report(gold, preds)
    assert report["exact"] == pytest.approx(100 * 3 / 6)
    assert report["f1"] == pytest.approx(100 * (1 + 2 / 3 + 4 / 7 + 1 + 2 / 3 + 1) / 6)
    assert report["total"] == report["HasAns_total"] == 6 and "NoAns_total" not in report
    for g, p, exact, f1 in SQUAD_CASES:
        assert max(metrics.squad_exact(a, p) for a in g) == exact
        assert max(metrics.squad_f1(a, p) for a in g) == pytest.approx(f1)
    assert metrics.normalize_answer("  The  Eiffel-Tower, an icon ") == "eiffeltower icon"


def test_squad_v2_no_answer_threshold_by_hand():
    """Two answerable and two unanswerable questions; na_prob is how much likelier "no answer" is.

    Official find_best_thresh, questions by na_prob: q1 (-2) +1 answered right; q4 (-1.5) EM +0, F1 +2/3;
    q3 (-1) answers an unanswerable one: -1; q2 (1) likewise. From "all unanswered" (2 right): exact peaks at
    3 of 4 after q1 (threshold -2), F1 at 2 + 1 + 2/3 after q4 (threshold -1.5)."""
    gold = {"q1": ["Denver Broncos"], "q2": [], "q3": [], "q4": ["Denver Broncos"]}
    preds = {"q1": "Denver Broncos", "q2": "Carolina", "q3": "Paris", "q4": "Broncos"}
    odds = {"q1": -2.0, "q2": 1.0, "q3": -1.0, "q4": -1.5}
    tuned = metrics.squad_report(gold, preds, odds)
    assert (tuned["best_exact"], tuned["best_exact_thresh"]) == (75.0, -2.0)
    assert tuned["best_f1"] == pytest.approx(100 * (3 + 2 / 3) / 4) and tuned["best_f1_thresh"] == -1.5
    assert tuned["threshold"] == -1.5 and tuned["predictions"] == {
        "q1": "Denver Broncos",
        "q2": "",
        "q3": "",
        "q4": "Broncos",
    }
    assert tuned["exact"] == 75.0 and tuned["f1"] == pytest.approx(tuned["best_f1"])
    assert (tuned["HasAns_exact"], tuned["HasAns_f1"]) == (50.0, pytest.approx(100 * (1 + 2 / 3) / 2))
    assert (tuned["NoAns_exact"], tuned["NoAns_f1"], tuned["NoAns_total"]) == (100.0, 100.0, 2)
    fixed = metrics.squad_report(gold, preds, odds, threshold=0.0)  # q2 unanswered, q1, q3, q4 answered
    assert fixed["predictions"] == {"q1": "Denver Broncos", "q2": "", "q3": "Paris", "q4": "Broncos"}
    assert fixed["exact"] == 50.0 and fixed["f1"] == pytest.approx(100 * (1 + 1 + 0 + 2 / 3) / 4)
    assert (fixed["NoAns_exact"], fixed["HasAns_exact"]) == (50.0, 50.0)
