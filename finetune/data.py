"""Downstream task files -> labelled examples -> padded batches of token ids.

- `classify`: CSV (header row) or JSON Lines, one example per row: a text column, optionally a second text
  column for sentence pairs, and a label column. Labels are the sorted set found in the training file; an eval
  label outside it is an error, since the model has no output for it.
- `tag`: CoNLL-style files: one `TOKEN ... TAG` line per token (first column the token, last the tag, so
  CoNLL-2003's four columns work), a blank line between sentences, `-DOCSTART-` lines skipped. Tags are BIO.
  Each word's tag goes to its first piece (WordPiece or BPE); continuation pieces and specials get -100 (no loss,
  no metric).
- Token types (segment ids) only for a model that reads them (BERT): the tokenizer's `model_input_names` say so.
- Sequences longer than `--seq-len` are truncated and counted (tagged words cut off are predicted `O`, so
  their entities still count against recall), or rejected with `--strict`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.errors import UserError
from common.files import json_lines
from pretrain.models.base import IGNORE_INDEX

OUTSIDE = "O"


@dataclass
class ClassifyExample:
    text: str
    label: str
    pair: str | None = None
    index: str = ""
    """The example's id in a test file (GLUE's index column)."""


@dataclass
class TagExample:
    words: list[str]
    tags: list[str]
    line: int  # first line of the sentence in its file, for error messages


@dataclass
class Encoded:
    """Token ids of a whole file, ready for `batches`; `labels` is (N,) for classify, per token for tag."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    """Segment ids (0: first text, 1: second); None for a model without them (ModernBERT)."""
    labels: list
    """Per example: a class id, a float (regression), a [start, end] pair (qa), or per token class ids (tag)."""
    truncated: int = 0
    """Examples longer than --seq-len that were cut."""
    word_index: list[list[int]] = field(default_factory=list)
    """tag only: for each kept word, the position of its first piece."""
    token_labels: bool = False
    """Labels are per token (padded with IGNORE_INDEX in batches)."""


def check_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file {path} does not exist; check the path")
    if p.stat().st_size == 0 or not p.read_text(encoding="utf-8", errors="replace").strip():
        raise UserError(f"{what} file {path} is empty; give a file with at least one example")
    return p


def _rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row dict) of a CSV/TSV (header row) or JSON Lines file."""
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        for n, row in json_lines(path, "write one JSON object per line"):
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object per line, found {type(row).__name__}")
            rows.append((n, row))
        return rows
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        return [(reader.line_num, row) for row in reader]


def read_classify(path: str, text: str, label: str, pair: str | None = None, what: str = "--train") -> list:
    """Examples of a CSV/JSONL file; `text`, `pair` and `label` are column names (--text-column ...)."""
    p = check_file(path, what)
    rows = _rows(p)
    if not rows:
        raise UserError(f"{what} file {path} has a header but no examples; add rows")
    examples = []
    for n, row in rows:
        for flag, col in (("--text-column", text), ("--pair-column", pair), ("--label-column", label)):
            if col is not None and (col not in row or row[col] is None):
                have = ", ".join(map(str, row)) or "none"
                raise UserError(f"{path}:{n}: no column {col!r} (columns: {have}); set {flag} to the right name")
        second = None if pair is None else str(row[pair])
        examples.append(ClassifyExample(str(row[text]), str(row[label]).strip(), second))
    return examples


def read_conll(path: str, what: str = "--train") -> list[TagExample]:
    """Sentences of a CoNLL file; a line with one field or a non-BIO tag is an error naming its line."""
    p = check_file(path, what)
    sentences, words, tags, first = [], [], [], 1
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                sentences.append(TagExample(words, tags, first))
            words, tags, first = [], [], n + 1
            continue
        if len(fields) < 2:
            raise UserError(f"{path}:{n}: expected 'TOKEN TAG', found {line.strip()!r}; fix the line")
        tag = fields[-1]
        if tag != OUTSIDE and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise UserError(f"{path}:{n}: tag {tag!r} is not BIO (O, B-TYPE or I-TYPE); fix the line")
        words.append(fields[0])
        tags.append(tag)
    if words:
        sentences.append(TagExample(words, tags, first))
    if not sentences:
        raise UserError(f"{what} file {path} has no sentences; give a CoNLL file with 'TOKEN TAG' lines")
    return sentences


def discover_labels(examples: list) -> list[str]:
    """Sorted labels of the training examples (for tag: O first, then B-/I- of each type found)."""
    if examples and isinstance(examples[0], TagExample):
        types = sorted({t[2:] for ex in examples for t in ex.tags if t != OUTSIDE})
        return [OUTSIDE] + [f"{bi}-{t}" for t in types for bi in "BI"]
    return sorted({ex.label for ex in examples})


def check_labels(examples: list, labels: list[str], path: str) -> None:
    """Every eval label must be one training produced an output for."""
    known = set(labels)
    for i, ex in enumerate(examples):
        seen = ex.tags if isinstance(ex, TagExample) else [ex.label]
        unknown = [t for t in seen if t not in known]
        if unknown:
            where = f"{path}:{ex.line}" if isinstance(ex, TagExample) else f"{path} (example {i + 1})"
            raise UserError(
                f"{where}: label {unknown[0]!r} never occurs in the training file (known: {', '.join(labels)}); "
                "add it to the training data or remove it"
            )


def _too_long(path: str, n: int, seq_len: int, count: int) -> UserError:
    return UserError(
        f"{path}: example {n + 1} is {count} tokens, longer than --seq-len {seq_len}; raise --seq-len or drop --strict"
    )


def segments(tok) -> bool:
    """Whether the model reads token_type_ids: the tokenizer says so in `model_input_names`, as transformers'
    tokenizers do (BERT's list them; ModernBERT's, and ours for a ModernBERT model, do not)."""
    return "token_type_ids" in tok.model_input_names


def encode_classify(
    tok, examples: list[ClassifyExample], labels: list[str] | None, seq_len: int, strict: bool, path: str
) -> Encoded:
    """[CLS] text [SEP] (pair [SEP]) ids (the tokenizer's template), truncated longest-first to seq_len; `labels`
    None: the label is a number (regression). Examples without a label (test sets) get a placeholder."""
    texts, pairs = [ex.text for ex in examples], [ex.pair for ex in examples]
    args = (texts, pairs) if pairs[0] is not None else (texts,)
    full = tok(*args, add_special_tokens=True)["input_ids"]
    long = [n for n, ids in enumerate(full) if len(ids) > seq_len]
    if long and strict:
        raise _too_long(path, long[0], seq_len, len(full[long[0]]))
    enc = tok(*args, truncation=True, max_length=seq_len, return_token_type_ids=segments(tok))
    if labels is None:
        ids = [float(ex.label) if ex.label else 0.0 for ex in examples]
    else:
        index = {label: i for i, label in enumerate(labels)}
        ids = [index[ex.label] if ex.label else 0 for ex in examples]
    return Encoded(enc["input_ids"], enc.get("token_type_ids"), ids, len(long))


def encode_tag(tok, examples: list[TagExample], labels: list[str], seq_len: int, strict: bool, path: str):
    """Words -> pieces; each word's label on its first piece, none elsewhere; cut at seq_len - 1 + [SEP]."""
    index = {label: i for i, label in enumerate(labels)}
    enc = tok([ex.words for ex in examples], is_split_into_words=True, add_special_tokens=True)
    out = Encoded([], [] if segments(tok) else None, [], token_labels=True)
    for n, ex in enumerate(examples):
        ids, word_ids = enc["input_ids"][n], enc.word_ids(n)
        if len(ids) > seq_len:
            if strict:
                raise _too_long(f"{path}:{ex.line}", n, seq_len, len(ids))
            ids, word_ids = ids[: seq_len - 1] + ids[-1:], word_ids[: seq_len - 1] + [None]
            out.truncated += 1
        label_ids, firsts, prev = [], [], None
        for pos, w in enumerate(word_ids):
            first = w is not None and w != prev
            label_ids.append(index.get(ex.tags[w], IGNORE_INDEX) if first else IGNORE_INDEX)
            if first:
                firsts.append(pos)
            prev = w
        out.input_ids.append(ids)
        if out.token_type_ids is not None:
            out.token_type_ids.append([0] * len(ids))
        out.labels.append(label_ids)
        out.word_index.append(firsts)
    return out


def batches(enc: Encoded, order: list[int], batch_size: int, pad_id: int):
    """Yield dicts of (B, S) long tensors (right-padded to the batch's longest; token_type_ids only where the
    model reads them) plus `labels`: (B,) long or float, (B, 2) long (qa) or (B, S) long (tag)."""
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids = [enc.input_ids[i] for i in rows]
        batch = {"input_ids": _pad(ids, pad_id), "attention_mask": _pad([[1] * len(s) for s in ids], 0)}
        if enc.token_type_ids is not None:
            batch["token_type_ids"] = _pad([enc.token_type_ids[i] for i in rows], 0)
        labels = [enc.labels[i] for i in rows]
        batch["labels"] = _pad(labels, IGNORE_INDEX) if enc.token_labels else torch.tensor(labels)
        yield batch


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad to the longest row -> (B, S) long."""
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)
