"""Extractive question answering (`--task qa`): SQuAD v1.1/v2.0 JSON -> context windows -> spans -> EM/F1.

Design choices (those of Google's run_squad.py, behind BERT's published SQuAD numbers):
- A context longer than the room left after the question is cut into windows of context tokens;
  `--doc-stride` is the step between window starts (default a third of --seq-len, BERT's 128 at 384), so the
  windows overlap and an answer cut by one window's edge lies whole in the next. Questions are cut to
  `--max-query-length` tokens.
- Training: a window's label is the first and last piece of the answer when the whole answer lies in it, else
  [CLS] (position 0, "not here"), as for an unanswerable v2.0 question. A training answer whose text is not
  at its `answer_start` in the context is skipped and counted.
- Prediction: the `--n-best` start and end positions of each window pair into spans that lie in the context,
  do not end before they start, are at most `--max-answer-length` pieces long, and start where this window
  gives the token the most context on both sides; the best span over all windows wins, its text cut from the
  original context by character offsets (original case, spacing and punctuation).
- v2.0 (`"version": "v2.0"`, or an `is_impossible` field): the no-answer score is the smallest [CLS]
  start + end logit over the windows; a question is answered "" when that score exceeds the best span's by
  more than a threshold: `--null-threshold`, or by default the one that maximizes F1 on the eval set (the
  official script's best_f1_thresh), reported with the rest.
- For the best model, OUTPUT/predictions.json ({id: answer}, the official format) and, for v2.0,
  OUTPUT/null_odds.json ({id: no-answer minus best-span score}: the official script's --na-prob-file).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from common.errors import UserError
from common.log import get_logger
from finetune import data, metrics
from finetune.kinds import Inputs, Predict, Task

log = get_logger(__name__)


@dataclass(kw_only=True)
class QAOptions:
    """qa: windows and answer decoding."""

    doc_stride: int | None = None
    """qa: step in tokens between the starts of a context's windows (default: a third of --seq-len)."""
    max_query_length: int = 64
    """qa: questions are cut to this many tokens."""
    max_answer_length: int = 30
    """qa: longest answer predicted, in tokens."""
    n_best: int = 20
    """qa: start and end positions per window that are paired into candidate answers."""
    null_threshold: float | None = None
    """qa, SQuAD v2.0: answer "" when the no-answer score beats the best span's by more than this (default:
    the threshold that maximizes F1 on the eval set)."""

    def validate(self) -> None:
        if min(self.n_best, self.max_answer_length, self.max_query_length) < 1 or (self.doc_stride or 1) < 1:
            raise UserError("--n-best, --max-answer-length, --max-query-length and --doc-stride must be at least 1")


@dataclass
class QAExample:
    qid: str
    question: str
    context: str
    answers: list[str]
    """Gold answer texts; empty when the question has no answer in the context."""
    start: int = -1
    """Character offset of the first answer in the context (-1: none)."""


def read_squad(path: str, what: str) -> tuple[list[QAExample], bool]:
    """(examples, whether the file is SQuAD v2.0) of a SQuAD JSON file."""
    p = data.check_file(path, what)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{what} file {path} is not JSON ({e.msg}, line {e.lineno}); pass a SQuAD JSON file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise UserError(f'{what} file {path} has no "data" list; pass a SQuAD v1.1 or v2.0 JSON file')
    examples, v2 = [], str(doc.get("version", "")).startswith("v2")
    try:
        for article in doc["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    v2 = v2 or "is_impossible" in qa
                    examples.append(_example(qa, paragraph["context"]))
    except (KeyError, TypeError, IndexError) as e:
        where = f"question {len(examples) + 1}"
        raise UserError(f"{what} file {path}: {where} lacks {e} or is malformed; pass a SQuAD JSON file") from None
    if not examples:
        raise UserError(f"{what} file {path} holds no questions; pass a SQuAD JSON file with questions")
    return examples, v2


def _example(qa: dict, context: str) -> QAExample:
    answers = [] if qa.get("is_impossible") else qa["answers"]
    start = int(answers[0]["answer_start"]) if answers else -1
    return QAExample(str(qa["id"]), qa["question"], context, [a["text"] for a in answers], start)


def answer_found(ex: QAExample) -> bool:
    """The first answer's text is where its answer_start says (or the question has none)."""
    return ex.start < 0 or ex.context[ex.start : ex.start + len(ex.answers[0])] == ex.answers[0]


@dataclass
class Windows:
    """The encoded windows of a set of questions, with what decoding needs to map positions back to text."""

    enc: data.Encoded
    """Token ids; labels [start, end] positions per window."""
    example: list[int] = field(default_factory=list)
    """The question each window comes from."""
    offsets: list[list[tuple[int, int] | None]] = field(default_factory=list)
    """Per window position: its characters in the context; None outside the context."""
    max_context: list[list[bool]] = field(default_factory=list)
    """Per window position: no other window gives that token more context on both sides."""


def window_spans(n: int, room: int, stride: int) -> list[tuple[int, int]]:
    """(start, length) of the windows over `n` context tokens, `room` tokens each, starts `stride` apart."""
    spans, start = [], 0
    while True:
        length = min(room, n - start)
        spans.append((start, length))
        if start + length >= n:
            return spans
        start += min(length, stride)


def is_max_context(spans: list[tuple[int, int]], index: int, position: int) -> bool:
    """Whether window `index` is the one where token `position` has the most context (BERT's rule: the most
    tokens on its shorter side, ties to the longer window, then the earlier one)."""
    best, best_index = None, None
    for i, (start, length) in enumerate(spans):
        if start <= position < start + length:
            score = min(position - start, start + length - 1 - position) + 0.01 * length
            if best is None or score > best:
                best, best_index = score, i
    return best_index == index


def answer_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """First and last context token overlapping characters [start, end)."""
    inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    return (inside[0], inside[-1]) if inside else None


def encode_windows(tok, examples: list[QAExample], seq_len: int, stride: int, max_query: int) -> Windows:
    """[CLS] question [SEP] context window [SEP] for every window of every question."""
    questions = tok([ex.question for ex in examples], add_special_tokens=False)["input_ids"]
    contexts = tok([ex.context for ex in examples], add_special_tokens=False, return_offsets_mapping=True)
    out = Windows(data.Encoded([], [] if data.segments(tok) else None, []))
    for n, ex in enumerate(examples):
        question = questions[n][:max_query]
        out.enc.truncated += len(questions[n]) > max_query
        ids, offsets = contexts["input_ids"][n], [tuple(o) for o in contexts["offset_mapping"][n]]
        room = seq_len - len(question) - 3
        if room < 1:
            raise UserError(f"--seq-len {seq_len} leaves no room for context after a {len(question)}-token question")
        answer = answer_tokens(offsets, ex.start, ex.start + len(ex.answers[0])) if ex.start >= 0 else None
        spans = window_spans(len(ids), room, stride)
        for k, (start, length) in enumerate(spans):
            head = [tok.cls_token_id, *question, tok.sep_token_id]
            out.enc.input_ids.append([*head, *ids[start : start + length], tok.sep_token_id])
            if out.enc.token_type_ids is not None:
                out.enc.token_type_ids.append([0] * len(head) + [1] * (length + 1))
            out.offsets.append([None] * len(head) + offsets[start : start + length] + [None])
            context = [is_max_context(spans, k, start + j) for j in range(length)]
            out.max_context.append([False] * len(head) + context + [False])
            inside = answer is not None and start <= answer[0] and answer[1] < start + length
            out.enc.labels.append([len(head) + answer[0] - start, len(head) + answer[1] - start] if inside else [0, 0])
            out.example.append(n)
    return out


def candidate_spans(logits: Tensor, offsets: list, max_context: list, n_best: int, max_len: int) -> Iterator:
    """(score, start, end) of the spans allowed in one window, from its (S, 2) start/end logits."""
    start, end = logits[:, 0], logits[:, 1]
    k = min(n_best, len(start))
    ends = end.topk(k).indices.tolist()
    for s in start.topk(k).indices.tolist():
        if offsets[s] is None or not max_context[s]:
            continue
        for e in ends:
            if offsets[e] is not None and s <= e < s + max_len:
                yield float(start[s] + end[e]), s, e


def decode(windows: Windows, examples: list[QAExample], logits: list[Tensor], n_best: int, max_len: int):
    """({id: text of the best span}, {id: no-answer score minus the best span's score; inf without a span})."""
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for w, (row, n) in enumerate(zip(logits, windows.example)):
        null[n] = min(null.get(n, math.inf), float(row[0, 0] + row[0, 1]))
        for score, s, e in candidate_spans(row, windows.offsets[w], windows.max_context[w], n_best, max_len):
            if score > best.get(n, (-math.inf, ""))[0]:
                text = examples[n].context[windows.offsets[w][s][0] : windows.offsets[w][e][1]]
                best[n] = (score, text.strip())  # a byte-level BPE piece's characters include its leading space
    texts = {ex.qid: best.get(n, (-math.inf, ""))[1] for n, ex in enumerate(examples)}
    odds = {ex.qid: null[n] - best.get(n, (-math.inf, ""))[0] for n, ex in enumerate(examples)}
    return texts, odds


class QA(Task):
    """SQuAD-style extractive QA; the metric is F1 (%), as the official script reports it."""

    head = "span"
    metrics = ("f1", "exact")

    def __init__(self, inputs: Inputs, options: QAOptions):
        super().__init__(inputs)
        self.options = options
        train, _ = read_squad(inputs.train, "--train")
        self.train_examples = [ex for ex in train if answer_found(ex)]
        self.skipped = len(train) - len(self.train_examples)
        if self.skipped:
            log.info(f"--train {inputs.train}: {self.skipped} answers are not at their answer_start; skipped")
        self.eval_examples, self.v2 = read_squad(inputs.eval, "--eval")
        self.predictions: dict[str, str] = {}
        self.odds: dict[str, float] = {}

    def encode(self, tok) -> None:
        seq_len, opt = self.inputs.seq_len, self.options
        args = (seq_len, opt.doc_stride or max(1, seq_len // 3), opt.max_query_length)
        self.train = encode_windows(tok, self.train_examples, *args).enc
        self.windows = encode_windows(tok, self.eval_examples, *args)
        self.truncated = {"train": self.train.truncated, "eval": self.windows.enc.truncated}
        version = "v2.0" if self.v2 else "v1.1"
        log.info(
            f"qa (SQuAD {version}): {len(self.train.input_ids)} training windows of {len(self.train_examples)} "
            f"questions, {len(self.windows.example)} eval windows of {len(self.eval_examples)}"
        )

    def evaluate(self, predict: Predict) -> dict:
        opt = self.options
        texts, self.odds = decode(
            self.windows, self.eval_examples, predict(self.windows.enc), opt.n_best, opt.max_answer_length
        )
        gold = {ex.qid: ex.answers for ex in self.eval_examples}
        report = metrics.squad_report(gold, texts, self.odds if self.v2 else None, opt.null_threshold)
        self.predictions = report.pop("predictions")
        if not self.v2:
            report.pop("threshold")
        return report

    def on_best(self, predict: Predict, output: Path, write: bool) -> None:
        if not write:
            return
        output.mkdir(parents=True, exist_ok=True)
        (output / "predictions.json").write_text(json.dumps(self.predictions, indent=2, ensure_ascii=False))
        if self.v2:
            (output / "null_odds.json").write_text(json.dumps(self.odds, indent=2))
