"""`--task classify`: one label per text, or per text pair, of a CSV/TSV/JSONL file; accuracy and macro F1."""

from __future__ import annotations

from dataclasses import dataclass

from finetune import data, metrics
from finetune.kinds import Inputs, Predict, Task, argmax_labels, require_labels


@dataclass(kw_only=True)
class ClassifyColumns:
    """classify: which columns of the files hold what."""

    text_column: str = "text"
    """classify: column holding the text."""
    pair_column: str | None = None
    """classify: column holding the second text of a sentence pair."""
    label_column: str = "label"
    """classify: column holding the label."""


class Classify(Task):
    """One label per text (or text pair) of a CSV/TSV/JSONL file."""

    metrics = ("accuracy", "macro_f1")

    def __init__(self, inputs: Inputs, columns: ClassifyColumns):
        super().__init__(inputs)
        cols = (columns.text_column, columns.label_column, columns.pair_column)
        self.train_examples = data.read_classify(inputs.train, *cols, what="--train")
        self.eval_examples = data.read_classify(inputs.eval, *cols, what="--eval")
        self.labels = require_labels(data.discover_labels(self.train_examples), inputs.train)
        data.check_labels(self.eval_examples, self.labels, inputs.eval)

    def encode(self, tok) -> None:
        i = self.inputs
        self.train = data.encode_classify(tok, self.train_examples, self.labels, i.seq_len, i.strict, i.train)
        self.eval = data.encode_classify(tok, self.eval_examples, self.labels, i.seq_len, i.strict, i.eval)
        self.truncated = {"train": self.train.truncated, "eval": self.eval.truncated}

    def evaluate(self, predict: Predict) -> dict:
        predicted = argmax_labels(predict(self.eval), self.labels)
        return metrics.classification_report([ex.label for ex in self.eval_examples], predicted)

    def describe(self, report: dict) -> str:
        return metrics.format_report(report)
