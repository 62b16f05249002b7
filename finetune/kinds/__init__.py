"""The kinds of task `bert-finetune` trains, as the training loop sees them: one module each, with its own flags.

A task reads its files when it is made (before any model loads, so bad input fails at once), encodes them with
the model's tokenizer, names its head and its metrics (the first is the default --metric; all are "higher is
better"), and turns the model's logits on its eval set into a report.

    classify.py  one label per text or text pair (CSV/TSV/JSONL); its flags: ClassifyColumns
    tag.py       a BIO tag per word (CoNLL)
    qa.py        extractive QA (SQuAD v1.1/v2.0 JSON); its flags: QAOptions
    glue.py      the nine GLUE tasks, read from GLUE's own directory layout

Design choices:
- A kind receives only what it reads: `Inputs` (its files, the longest input in tokens and what to do with
  longer ones) and its own options, never the whole `bert-finetune` config. finetune.config composes the
  command's flags from these pieces (each kind's options are a group of the command's --help), and
  finetune.run makes the task from them; no module here imports either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from common.errors import UserError
from finetune import data
from finetune.model import TaskModel

Predict = Callable[[data.Encoded], list[Tensor]]
"""The model's logits for every example of an encoded set, each cut to its example's length."""


@dataclass(frozen=True)
class Inputs:
    """What every kind reads: its training and eval files, and how long an input may be."""

    train: str | None
    eval: str | None
    seq_len: int
    strict: bool
    """Reject inputs longer than seq_len instead of truncating them."""


class Task:
    """What the training loop asks of a task; subclasses fill in the reading, encoding and evaluation."""

    head = "sequence"
    metrics: tuple[str, ...] = ()
    regression = False

    def __init__(self, inputs: Inputs):
        self.inputs = inputs
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


class LabelledFiles(Task):
    """A kind whose --train and --eval files hold labelled examples: `read(path, flag)` reads one, the labels are the
    training file's, and `encode(tok, examples, labels, seq_len, strict, path)` encodes one (finetune.data's)."""

    def __init__(self, inputs: Inputs, read: Callable, encode: Callable):
        super().__init__(inputs)
        self._encode = encode
        self.train_examples = read(inputs.train, "--train")
        self.eval_examples = read(inputs.eval, "--eval")
        self.labels = require_labels(data.discover_labels(self.train_examples), inputs.train)
        data.check_labels(self.eval_examples, self.labels, inputs.eval)

    def encode(self, tok) -> None:
        i = self.inputs
        self.train = self._encode(tok, self.train_examples, self.labels, i.seq_len, i.strict, i.train)
        self.eval = self._encode(tok, self.eval_examples, self.labels, i.seq_len, i.strict, i.eval)
        self.truncated = {"train": self.train.truncated, "eval": self.eval.truncated}


def require_labels(labels: list[str], path: str) -> list[str]:
    if len(labels) < 2:
        raise UserError(f"--train file {path} has only the label {labels}; a classifier needs at least two")
    return labels


def argmax_labels(logits: list[Tensor], labels: list[str]) -> list[str]:
    return [labels[int(row.argmax())] for row in logits]
