"""Evaluation reports: per-class classification metrics and entity-level (seqeval-style) tagging metrics.

Both are written from scratch (no scikit-learn/seqeval at run time) and tested against those libraries:
- `classification_report` matches `sklearn.metrics.classification_report`: per-class precision, recall, F1
  and support over the labels that occur in the gold or predicted labels, accuracy, and macro-F1.
- `entity_report` matches `seqeval.metrics.classification_report` in its default (conlleval) mode for BIO
  tags: an `I-X` after `O` or after another type starts a new entity, exactly as conlleval counts it.
A division by zero gives 0, as both libraries do (with a warning we leave out).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


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
