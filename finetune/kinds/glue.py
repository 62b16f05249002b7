"""The GLUE tasks (`--glue-task NAME --data-dir DIR`): their files as published, their metrics, their submission.

- DIR is the GLUE directory (glue_data/ with CoLA/, SST-2/, ... as the download script writes it) or one task's
  directory. Each task's train.tsv, dev.tsv (MNLI: dev_matched.tsv, dev_mismatched.tsv) and test.tsv (MNLI:
  test_matched.tsv, test_mismatched.tsv) are read by the column names of their header row (CoLA's train and dev
  have none: source, label, original label, sentence) as tab-separated fields with no quote processing: the
  files hold unbalanced quotes, which a CSV reader would merge with the lines after them. A row too short to
  hold the task's columns is skipped and counted (QQP's train.tsv has a few, as HF's reader also skips).
- STS-B is a regression (one output, MSE, HF's problem_type "regression"); the others classify into the task's
  fixed labels, in HF's order.
- Metrics: CoLA Matthews correlation (mcc); MRPC and QQP F1 of "1" and accuracy; STS-B Pearson and Spearman;
  MNLI accuracy on the matched (accuracy) and mismatched (accuracy_mm) dev sets; the others accuracy. `score`
  is their mean (GLUE's number for the task) and the default --metric.
- `--predict` writes the best model's test predictions as OUTPUT/submission/{CoLA,SST-2,...}.tsv, GLUE's
  submission format: a header `index<TAB>prediction`, the test file's index, labels as the task's strings
  (entailment, not_entailment, ...; 0/1 for CoLA, SST-2, MRPC, QQP, WNLI), STS-B scores to 3 decimals; MNLI's
  model also predicts the diagnostic set (DIR/diagnostic/diagnostic.tsv) as AX.tsv when it is there.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from common.errors import UserError
from common.log import get_logger
from finetune import data, metrics
from finetune.kinds import Inputs, Predict, Task, argmax_labels

log = get_logger(__name__)

TaskName = Literal["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
"""The GLUE tasks (TASKS holds what each reads)."""

BINARY = ("0", "1")
NLI = ("entailment", "not_entailment")


@dataclass(frozen=True)
class Spec:
    name: str
    """Directory and submission name (CoLA, SST-2, ...)."""
    labels: tuple[str, ...] | None
    """Class labels in output order; None: a regression (STS-B)."""
    text: str
    pair: str | None
    label: str
    metrics: tuple[str, ...]
    dev: tuple[tuple[str, str], ...] = (("dev.tsv", ""),)
    """(file, suffix of its metric names)."""
    test: tuple[tuple[str, str], ...] = ()
    """(file, submission name); empty: test.tsv, named like the task."""
    columns: tuple[str, ...] | None = None
    """Column names of train/dev files that have no header row."""
    index: str = "index"
    """The test files' id column."""


TASKS = {
    "cola": Spec(
        "CoLA", BINARY, "sentence", None, "label", ("mcc",), columns=("source", "label", "original_label", "sentence")
    ),
    "sst2": Spec("SST-2", BINARY, "sentence", None, "label", ("accuracy",)),
    "mrpc": Spec("MRPC", BINARY, "#1 String", "#2 String", "Quality", ("f1", "accuracy")),
    "qqp": Spec("QQP", BINARY, "question1", "question2", "is_duplicate", ("f1", "accuracy"), index="id"),
    "stsb": Spec("STS-B", None, "sentence1", "sentence2", "score", ("pearson", "spearman")),
    "mnli": Spec(
        "MNLI",
        ("contradiction", "entailment", "neutral"),
        "sentence1",
        "sentence2",
        "gold_label",
        ("accuracy",),
        dev=(("dev_matched.tsv", ""), ("dev_mismatched.tsv", "_mm")),
        test=(("test_matched.tsv", "MNLI-m"), ("test_mismatched.tsv", "MNLI-mm")),
    ),
    "qnli": Spec("QNLI", NLI, "question", "sentence", "label", ("accuracy",)),
    "rte": Spec("RTE", NLI, "sentence1", "sentence2", "label", ("accuracy",)),
    "wnli": Spec("WNLI", BINARY, "sentence1", "sentence2", "label", ("accuracy",)),
}
assert tuple(TASKS) == get_args(TaskName)


def metric_names(spec: Spec) -> tuple[str, ...]:
    """`score` first, then every metric of every dev set."""
    return ("score", *(m + suffix for _, suffix in spec.dev for m in spec.metrics))


def task_dir(data_dir: str, spec: Spec) -> Path:
    """The task's directory: DIR/<name> in a GLUE directory, or DIR itself."""
    root = Path(data_dir)
    for d in (root / spec.name, root):
        if (d / "train.tsv").is_file():
            return d
    raise UserError(
        f"--data-dir {data_dir} has neither {spec.name}/train.tsv nor train.tsv; pass the GLUE directory "
        "(glue_data, as the download script writes it) or the task's own directory"
    )


def read_tsv(path: Path, columns: tuple[str, ...] | None, need: list[str]) -> tuple[list[tuple[int, dict]], int]:
    """((line, {column: field}) of every row that has the `need`ed columns, number of rows skipped)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        names = list(columns) if columns else next(reader, [])
        missing = [c for c in need if c not in names]
        if missing:
            raise UserError(f"{path} has no column {missing[0]!r} (header: {', '.join(names)}); is it the right file?")
        width = max(names.index(c) for c in need) + 1
        rows, skipped = [], 0
        for fields in reader:
            if not fields:
                continue
            if len(fields) < width:
                skipped += 1
                continue
            rows.append((reader.line_num, dict(zip(names, fields))))
    return rows, skipped


class Glue(Task):
    """One GLUE task: train on train.tsv, select on its dev set(s), optionally predict its test set(s)."""

    def __init__(self, name: TaskName, data_dir: str, seq_len: int, strict: bool = False, predict: bool = False):
        super().__init__(Inputs(None, None, seq_len, strict))
        self.predict_test = predict
        self.spec = spec = TASKS[name]
        self.dir = task_dir(data_dir, spec)
        self.regression = spec.labels is None
        self.labels = list(spec.labels or ())
        self.metrics = metric_names(spec)
        self.train_examples = self.read(self.dir / "train.tsv", spec.columns)
        self.dev_sets = [(suffix, self.read(self.dir / name, spec.columns)) for name, suffix in spec.dev]
        self.test_sets = [(sub, path, self.read(path, None, labelled=False)) for sub, path in self.test_files()]

    def test_files(self) -> list[tuple[str, Path]]:
        """(submission name, file) of the test sets --predict writes."""
        if not self.predict_test:
            return []
        named = self.spec.test or (("test.tsv", self.spec.name),)
        found = [(sub, self.dir / name) for name, sub in named]
        missing = [str(path) for _, path in found if not path.is_file()]
        if missing:
            raise UserError(f"--predict: {missing[0]} does not exist; add the GLUE test file or drop --predict")
        if self.spec.name == "MNLI":  # GLUE's diagnostic set is scored with MNLI's model
            for path in (self.dir.parent / "diagnostic" / "diagnostic.tsv", self.dir / "diagnostic.tsv"):
                if path.is_file():
                    return [*found, ("AX", path)]
        return found

    def read(self, path: Path, columns, labelled: bool = True) -> list[data.ClassifyExample]:
        spec = self.spec
        data.check_file(str(path), f"{spec.name}")
        text_columns = [c for c in (spec.text, spec.pair) if c]
        need = text_columns + ([spec.label] if labelled else [spec.index])
        rows, skipped = read_tsv(path, columns, need)
        if skipped:
            log.info(f"{path}: skipped {skipped} rows too short to hold the columns {', '.join(need)}")
        if not rows:
            raise UserError(f"{path} has no complete rows; is it {spec.name}'s file?")
        examples = []
        for line, row in rows:
            label, pair = row[spec.label] if labelled else "", row[spec.pair] if spec.pair else None
            if labelled:
                self.check_label(label, path, line)
            examples.append(data.ClassifyExample(row[spec.text], label, pair, "" if labelled else row[spec.index]))
        return examples

    def check_label(self, label: str, path: Path, line: int) -> None:
        if self.regression:
            try:
                float(label)
            except ValueError:
                raise UserError(
                    f"{path}:{line}: score {label!r} is not a number; is it {self.spec.name}'s file?"
                ) from None
        elif label not in self.labels:
            raise UserError(
                f"{path}:{line}: label {label!r} is not one of {', '.join(self.labels)}; is it {self.spec.name}'s file?"
            )

    def encode(self, tok) -> None:
        i, labels = self.inputs, None if self.regression else self.labels

        def enc(examples, path):
            return data.encode_classify(tok, examples, labels, i.seq_len, i.strict, str(path))

        self.train = enc(self.train_examples, self.dir / "train.tsv")
        self.dev = [(suffix, examples, enc(examples, self.dir)) for suffix, examples in self.dev_sets]
        self.tests = [(sub, path, examples, enc(examples, path)) for sub, path, examples in self.test_sets]
        self.truncated = {"train": self.train.truncated, "eval": sum(e.truncated for _, _, e in self.dev)}

    def values(self, logits) -> list[str] | list[float]:
        """Predicted labels, or scores for a regression."""
        return [float(row[0]) for row in logits] if self.regression else argmax_labels(logits, self.labels)

    def evaluate(self, predict: Predict) -> dict:
        report = {}
        for suffix, examples, enc in self.dev:
            gold, pred = [ex.label for ex in examples], self.values(predict(enc))
            report |= {m + suffix: score(m, gold, pred) for m in self.spec.metrics}
        return {"score": statistics.mean(report.values()), **report}

    def on_best(self, predict: Predict, output: Path, write: bool) -> None:
        for sub, _, examples, enc in self.tests:
            values = self.values(predict(enc))
            if write:
                rows = [(ex.index, f"{v:.3f}" if self.regression else v) for ex, v in zip(examples, values)]
                write_submission(output / "submission" / f"{sub}.tsv", rows)


def score(name: str, gold: list[str], pred: list) -> float:
    """One GLUE metric of predicted labels (or scores) against the gold column's strings."""
    if name == "mcc":
        return metrics.matthews(gold, pred)
    if name == "f1":
        return metrics.binary_f1(gold, pred, "1")
    if name in ("pearson", "spearman"):
        return getattr(metrics, name)([float(g) for g in gold], pred)
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


def write_submission(path: Path, rows: list[tuple[str, str]]) -> None:
    """`index<TAB>prediction` rows, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in rows), encoding="utf-8")
    tmp.replace(path)
