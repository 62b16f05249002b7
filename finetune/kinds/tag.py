"""`--task tag`: a BIO tag per word of a CoNLL file, trained and predicted on each word's first piece; entity F1."""

from __future__ import annotations

from finetune import data, metrics
from finetune.kinds import Inputs, Predict, Task, argmax_labels, require_labels


class Tag(Task):
    """A BIO tag per word of a CoNLL file; trained and predicted on each word's first piece."""

    head = "token"
    metrics = ("f1",)

    def __init__(self, inputs: Inputs):
        super().__init__(inputs)
        self.train_examples = data.read_conll(inputs.train, "--train")
        self.eval_examples = data.read_conll(inputs.eval, "--eval")
        self.labels = require_labels(data.discover_labels(self.train_examples), inputs.train)
        data.check_labels(self.eval_examples, self.labels, inputs.eval)

    def encode(self, tok) -> None:
        i = self.inputs
        self.train = data.encode_tag(tok, self.train_examples, self.labels, i.seq_len, i.strict, i.train)
        self.eval = data.encode_tag(tok, self.eval_examples, self.labels, i.seq_len, i.strict, i.eval)
        self.truncated = {"train": self.train.truncated, "eval": self.eval.truncated}

    def evaluate(self, predict: Predict) -> dict:
        rows = predict(self.eval)
        predicted = []
        for ex, row, firsts in zip(self.eval_examples, rows, self.eval.word_index):
            tags = argmax_labels([row[pos] for pos in firsts], self.labels)
            predicted.append(tags + [data.OUTSIDE] * (len(ex.tags) - len(tags)))  # words cut off: O
        return metrics.entity_report([ex.tags for ex in self.eval_examples], predicted)

    def describe(self, report: dict) -> str:
        return metrics.format_report(report)
