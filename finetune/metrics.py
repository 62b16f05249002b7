"""Evaluation reports: classification, entity-level tagging, GLUE's metrics and SQuAD's EM/F1.

Written from scratch (no scikit-learn/seqeval/scipy at run time) and tested against those libraries:
- `classification_report` matches `sklearn.metrics.classification_report`: per-class precision, recall, F1
  and support over the labels that occur in the gold or predicted labels, accuracy, and macro-F1.
- `entity_report` matches `seqeval.metrics.classification_report` in its default (conlleval) mode for BIO
  tags: an `I-X` after `O` or after another type starts a new entity, exactly as conlleval counts it.
- `matthews`, `binary_f1` match scikit-learn's `matthews_corrcoef`, `f1_score`; `pearson`, `spearman` match
  scipy's `pearsonr`, `spearmanr` (average ranks for ties).
- `squad_report` follows the official SQuAD v2.0 evaluation script (which gives v1.1's numbers on v1.1 data):
  answers normalized (lowercase, punctuation and articles removed, whitespace collapsed), the best score over
  the gold answers, an unanswerable question's gold answer the empty string, HasAns/NoAns splits, and the
  no-answer threshold that maximizes EM and F1. Scores are percentages, as the script prints them.
A division by zero gives 0, as the libraries do (with a warning we leave out); so does a correlation with a
constant input (scipy: NaN).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence


def _prf(tp: int, n_pred: int, n_true: int) -> dict[str, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": n_true}


def _averages(per_class: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Macro and support-weighted averages of the per-class rows."""
    total = sum(row["support"] for row in per_class.values())
    keys = ("precision", "recall", "f1")
    macro = {k: sum(r[k] for r in per_class.values()) / max(len(per_class), 1) for k in keys}
    weighted = {k: sum(r[k] * r["support"] for r in per_class.values()) / total if total else 0.0 for k in keys}
    return {"macro avg": {**macro, "support": total}, "weighted avg": {**weighted, "support": total}}


def classification_report(y_true: Sequence[str], y_pred: Sequence[str]) -> dict:
    """{"accuracy", "macro_f1", "per_class": {label: {precision, recall, f1, support}}, "macro avg", "weighted avg"}."""
    labels = sorted(set(y_true) | set(y_pred))
    hits = Counter(t for t, p in zip(y_true, y_pred) if t == p)
    n_true, n_pred = Counter(y_true), Counter(y_pred)
    per_class = {c: _prf(hits[c], n_pred[c], n_true[c]) for c in labels}
    averages = _averages(per_class)
    accuracy = sum(hits.values()) / len(y_true) if len(y_true) else 0.0
    return {"accuracy": accuracy, "macro_f1": averages["macro avg"]["f1"], "per_class": per_class, **averages}


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """BIO tags of one sentence -> {(type, first, last)}; an I- that cannot continue an entity starts one."""
    found, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, t = tag.partition("-")
        continues = prefix == "I" and kind == t
        if start is not None and not continues:
            found.add((kind, start, i - 1))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, t
    return found


def entity_report(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict:
    """Entity-level {"per_type": {type: {precision, recall, f1, support}}, "micro avg", "macro avg", "weighted avg"}."""
    gold, pred = set(), set()
    for n, (t, p) in enumerate(zip(true_tags, pred_tags)):
        gold |= {(n, *e) for e in entities(t)}
        pred |= {(n, *e) for e in entities(p)}
    types = sorted({e[1] for e in gold | pred})
    hit = gold & pred
    per_type = {
        k: _prf(sum(e[1] == k for e in hit), sum(e[1] == k for e in pred), sum(e[1] == k for e in gold)) for k in types
    }
    report = {"per_type": per_type, "micro avg": _prf(len(hit), len(pred), len(gold)), **_averages(per_type)}
    report["f1"] = report["micro avg"]["f1"]
    return report


def format_report(report: dict) -> str:
    """The report as the familiar text table (one row per class/type, then the averages)."""
    rows = report.get("per_class") or report.get("per_type") or {}
    avgs = {k: report[k] for k in ("micro avg", "macro avg", "weighted avg") if k in report}
    width = max([len(k) for k in [*rows, *avgs]] + [12])
    lines = [f"{'':>{width}}  precision    recall  f1-score   support", ""]
    for name, r in [*rows.items(), ("", None), *avgs.items()]:
        if r is None:
            lines.append("")
            continue
        lines.append(f"{name:>{width}}  {r['precision']:9.4f} {r['recall']:9.4f} {r['f1']:9.4f} {r['support']:9d}")
    if "accuracy" in report:
        lines.append(f"\naccuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}")
    return "\n".join(lines)


def matthews(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """Matthews correlation coefficient (multi-class form, as scikit-learn computes it); CoLA's metric."""
    n = len(y_true)
    t_sum, p_sum = Counter(y_true), Counter(y_pred)
    correct = sum(t == p for t, p in zip(y_true, y_pred))
    labels = set(t_sum) | set(p_sum)
    cov_tp = correct * n - sum(t_sum[c] * p_sum[c] for c in labels)
    cov_pp = n * n - sum(p_sum[c] ** 2 for c in labels)
    cov_tt = n * n - sum(t_sum[c] ** 2 for c in labels)
    return cov_tp / math.sqrt(cov_tt * cov_pp) if cov_tt * cov_pp else 0.0


def binary_f1(y_true: Sequence[str], y_pred: Sequence[str], positive: str) -> float:
    """F1 of the positive class (MRPC, QQP: "1")."""
    tp = sum(t == p == positive for t, p in zip(y_true, y_pred))
    return _prf(tp, sum(p == positive for p in y_pred), sum(t == positive for t in y_true))["f1"]


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    var = sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y)
    return cov / math.sqrt(var) if var > 0 else 0.0


def _ranks(x: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and x[order[stop + 1]] == x[order[start]]:
            stop += 1
        for i in order[start : stop + 1]:
            ranks[i] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(_ranks(x), _ranks(y))


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def squad_f1(gold: str, pred: str) -> float:
    """Token-overlap F1 of the normalized answers; 1 when both are empty, 0 when only one is."""
    gold_toks, pred_toks = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def _best_threshold(scores: dict, na_probs: Mapping[str, float], has_ans: dict, preds: dict) -> tuple[float, float]:
    """(best score in %, threshold) over "no answer when na_prob > threshold" (the official find_best_thresh)."""
    current = best = sum(not h for h in has_ans.values())
    threshold = 0.0
    for qid in sorted(na_probs, key=lambda q: na_probs[q]):
        current += scores[qid] if has_ans[qid] else (-1 if preds[qid] else 0)
        if current > best:
            best, threshold = current, na_probs[qid]
    return 100.0 * best / len(scores), threshold


def squad_report(
    gold: Mapping[str, Sequence[str]],
    preds: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    threshold: float | None = None,
) -> dict:
    """EM/F1 (%) of `preds` {qid: text} against `gold` {qid: answer texts, [] if unanswerable}.

    With `na_probs` (v2.0: how much likelier no answer is than the predicted span), a question is answered ""
    when its na_prob > `threshold`; `threshold` None takes `best_f1_thresh`, the one tuned on these questions.
    The report adds `threshold` (the one applied) and `predictions` (the answers scored)."""
    has_ans = {q: any(normalize_answer(a) for a in gold[q]) for q in gold}
    answers = {q: [a for a in gold[q] if normalize_answer(a)] or [""] for q in gold}
    exact = {q: max(squad_exact(a, preds[q]) for a in answers[q]) for q in gold}
    f1 = {q: max(squad_f1(a, preds[q]) for a in answers[q]) for q in gold}
    report = {}
    if na_probs is not None:
        best_exact, exact_thresh = _best_threshold(exact, na_probs, has_ans, preds)
        best_f1, f1_thresh = _best_threshold(f1, na_probs, has_ans, preds)
        report = {"best_exact": best_exact, "best_exact_thresh": exact_thresh}
        report |= {"best_f1": best_f1, "best_f1_thresh": f1_thresh}
        threshold = f1_thresh if threshold is None else threshold
        preds = {q: "" if na_probs[q] > threshold else preds[q] for q in gold}
        exact = {q: float(not has_ans[q]) if na_probs[q] > threshold else exact[q] for q in gold}
        f1 = {q: float(not has_ans[q]) if na_probs[q] > threshold else f1[q] for q in gold}
    report = {**_squad_totals(exact, f1, list(gold)), **report}
    for name, keep in (("HasAns", True), ("NoAns", False)):
        ids = [q for q in gold if has_ans[q] == keep]
        if ids:
            report |= {f"{name}_{k}": v for k, v in _squad_totals(exact, f1, ids).items()}
    return {**report, "threshold": threshold, "predictions": dict(preds)}


def _squad_totals(exact: dict, f1: dict, ids) -> dict:
    n = len(ids)
    return {"exact": 100.0 * sum(exact[q] for q in ids) / n, "f1": 100.0 * sum(f1[q] for q in ids) / n, "total": n}
