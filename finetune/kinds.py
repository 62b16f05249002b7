"""The kinds of task `bert-finetune` trains, as the training loop sees them.

A task reads its files when it is made (before any model loads, so bad input fails at once), encodes them with
the model's tokenizer, names its head and its metrics (the first is the default --metric; all are "higher is
better"), and turns the model's logits on its eval set into a report. Here `classify` (CSV/JSONL, one label per
text or text pair) and `tag` (CoNLL BIO); finetune/qa.py adds extractive QA and finetune/glue.py the GLUE tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from common.errors import UserError
from finetune import data, metrics
from finetune.config import FinetuneConfig
from finetune.model import TaskModel

Predict = Callable[[data.Encoded], list[Tensor]]
"""The model's logits for every example of an encoded set, each cut to its example's length."""


class Task:
    """What the training loop asks of a task; subclasses fill in the reading, encoding and evaluation."""

    head = "sequence"
    metrics: tuple[str, ...] = ()
    regression = False

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.labels: list[str] = []
        self.train: data.Encoded | None = None
        self.truncated: dict[str, int] = {}

    def encode(self, tok) -> None:
        """Set `self.train` (and whatever `evaluate` needs) from the files read in __init__."""
        raise NotImplementedError

    def evaluate(self, predict: Predict) -> dict:
        """The eval report: every name in `metrics` and any detail worth keeping."""
        raise NotImplementedError

    def on_best(self, predict: Predict, output: Path, write: bool) -> None:
        """Called on every rank when the last evaluation was the best so far; rank 0 has `write` and writes
        prediction files next to the model."""

    def describe(self, report: dict) -> str:
        """The report as printed at the end."""
        return "\n".join(f"{k:>22} {v:.4f}" for k, v in report.items() if isinstance(v, float))

    def build(self, config) -> TaskModel:
        return TaskModel(config, self.head, self.labels, self.regression)


def require_labels(labels: list[str], path: str) -> list[str]:
    if len(labels) < 2:
        raise UserError(f"--train file {path} has only the label {labels}; a classifier needs at least two")
    return labels


def argmax_labels(logits: list[Tensor], labels: list[str]) -> list[str]:
    return [labels[int(row.argmax())] for row in logits]


class Classify(Task):
    """One label per text (or text pair) of a CSV/TSV/JSONL file."""

    metrics = ("accuracy", "macro_f1")

    def __init__(self, cfg: FinetuneConfig):
        super().__init__(cfg)
        cols = (cfg.text_column, cfg.label_column, cfg.pair_column)
        self.train_examples = data.read_classify(cfg.train, *cols, what="--train")
        self.eval_examples = data.read_classify(cfg.eval, *cols, what="--eval")
        self.labels = require_labels(data.discover_labels(self.train_examples), cfg.train)
        data.check_labels(self.eval_examples, self.labels, cfg.eval)

    def encode(self, tok) -> None:
        cfg = self.cfg
        self.train = data.encode_classify(tok, self.train_examples, self.labels, cfg.seq_len, cfg.strict, cfg.train)
        self.eval = data.encode_classify(tok, self.eval_examples, self.labels, cfg.seq_len, cfg.strict, cfg.eval)
        self.truncated = {"train": self.train.truncated, "eval": self.eval.truncated}

    def evaluate(self, predict: Predict) -> dict:
        predicted = argmax_labels(predict(self.eval), self.labels)
        return metrics.classification_report([ex.label for ex in self.eval_examples], predicted)

    def describe(self, report: dict) -> str:
        return metrics.format_report(report)


class Tag(Task):
    """A BIO tag per word of a CoNLL file; trained and predicted on each word's first piece."""

    head = "token"
    metrics = ("f1",)

    def __init__(self, cfg: FinetuneConfig):
        super().__init__(cfg)
        self.train_examples = data.read_conll(cfg.train, "--train")
        self.eval_examples = data.read_conll(cfg.eval, "--eval")
        self.labels = require_labels(data.discover_labels(self.train_examples), cfg.train)
        data.check_labels(self.eval_examples, self.labels, cfg.eval)

    def encode(self, tok) -> None:
        cfg = self.cfg
        self.train = data.encode_tag(tok, self.train_examples, self.labels, cfg.seq_len, cfg.strict, cfg.train)
        self.eval = data.encode_tag(tok, self.eval_examples, self.labels, cfg.seq_len, cfg.strict, cfg.eval)
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
