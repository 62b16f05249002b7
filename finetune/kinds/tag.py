"""`--task tag`: a BIO tag per word of a CoNLL file, trained and predicted on each word's first piece; entity F1."""

from __future__ import annotations

from finetune import data, metrics
from finetune.kinds import Inputs, LabelledFiles, Predict, argmax_labels


class Tag(LabelledFiles):
    """A BIO tag per word of a CoNLL file; trained and predicted on each word's first piece."""

    head = "token"
    metrics = ("f1",)

    def __init__(self, inputs: Inputs):
        super().__init__(inputs, data.read_conll, data.encode_tag)

    def evaluate(self, predict: Predict) -> dict:
        rows = predict(self.eval)
        predicted = []
        for ex, row, firsts in zip(self.eval_examples, rows, self.eval.word_index):
            tags = argmax_labels([row[pos] for pos in firsts], self.labels)
            predicted.append(tags + [data.OUTSIDE] * (len(ex.tags) - len(tags)))  # words cut off: O
        return metrics.entity_report([ex.tags for ex in self.eval_examples], predicted)

    def describe(self, report: dict) -> str:
        return metrics.format_report(report)
