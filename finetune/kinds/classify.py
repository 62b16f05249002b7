"""`--task classify`: one label per text, or per text pair, of a CSV/TSV/JSONL file; accuracy and macro F1."""

from __future__ import annotations

from dataclasses import dataclass

from finetune import data, metrics
from finetune.kinds import Inputs, LabelledFiles, Predict, argmax_labels


@dataclass(kw_only=True)
class ClassifyColumns:
    """classify: which columns of the files hold what."""

    text_column: str = "text"
    """classify: column holding the text."""
    pair_column: str | None = None
    """classify: column holding the second text of a sentence pair."""
    label_column: str = "label"
    """classify: column holding the label."""


class Classify(LabelledFiles):
    """One label per text (or text pair) of a CSV/TSV/JSONL file."""

    metrics = ("accuracy", "macro_f1")

    def __init__(self, inputs: Inputs, columns: ClassifyColumns):
        cols = (columns.text_column, columns.label_column, columns.pair_column)
        super().__init__(inputs, lambda path, flag: data.read_classify(path, *cols, what=flag), data.encode_classify)

    def evaluate(self, predict: Predict) -> dict:
        predicted = argmax_labels(predict(self.eval), self.labels)
        return metrics.classification_report([ex.label for ex in self.eval_examples], predicted)

    def describe(self, report: dict) -> str:
        return metrics.format_report(report)
