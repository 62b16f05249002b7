"""Where a word starts in a tokenizer's pieces, whatever its model: WordPiece's `##` continuation marks, or the
space marker of a byte-level BPE (`Ġ`) or Metaspace (`▁`) pre-tokenizer (`word_marks`, `word_pieces`).
Whole-word masking (pretrain.masking) masks the pieces of a word together through it.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import UserError
from data_prep import tokenizer

_WHITESPACE = ("\t", "\n", "\x0b", "\x0c", "\r", " ")


_BYTE_LEVEL_WHITESPACE = tuple(chr(0x100 + ord(c)) for c in _WHITESPACE)  # Ġ for the space, ĉ for a tab, ...


def word_marks(backend_json: str) -> tuple[tuple[str, ...], bool] | None:
    """How the tokenizer's pieces show words, for whole-word masking: `(marks, marks_start)`.

    `(("##",), False)`: a piece starting with `##` continues a word (WordPiece, BPE with that prefix);
    byte-level BPE: a piece starting with a whitespace byte (`Ġ` for a space, `ĉ` for a tab, ...) starts a
    word; Metaspace (SentencePiece-style BPE/Unigram): `▁` or a whitespace character starts one; `((), True)`
    for WordLevel (every token is a word). None when the pieces do not show it (e.g. an end-of-word suffix).
    """
    spec = json.loads(backend_json)
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind == "WordLevel":
        return (), True
    if model.get("continuing_subword_prefix"):
        return (model["continuing_subword_prefix"],), False
    if kind == "WordPiece":
        return ("##",), False
    if kind not in ("BPE", "Unigram") or model.get("end_of_word_suffix"):
        return None
    for pre in _flatten(spec.get("pre_tokenizer"), "pretokenizers"):
        if pre.get("type") == "ByteLevel":
            return _BYTE_LEVEL_WHITESPACE, True
        if pre.get("type") == "Metaspace":
            return (pre.get("replacement") or "▁", *_WHITESPACE), True
    return None


def _flatten(spec: dict | None, key: str) -> list[dict]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [s for inner in spec.get(key, []) for s in _flatten(inner, key)]
    return [spec]


def word_pieces(name_or_path: str) -> tuple[list[str | None], tuple[str, ...], bool]:
    """For whole-word masking: the token of each id (None for added tokens, which are words of their own)
    and `word_marks`. UserError for a tokenizer whose pieces do not show word starts."""
    path = Path(name_or_path)
    vocab = path / "vocab.txt" if path.is_dir() else path
    if vocab.suffix == ".txt" and vocab.is_file() and (path == vocab or tokenizer.is_bert(path, name_or_path)):
        return vocab.read_text(encoding="utf-8").splitlines(), ("##",), False  # a BERT vocabulary: no transformers
    if tokenizer.is_bert(path, name_or_path):
        backend = tokenizer.load(name_or_path).backend_tokenizer
    else:
        backend = tokenizer.read_backend(path if path.is_file() else path / "tokenizer.json", name_or_path)
    marks = word_marks(backend.to_str())
    if marks is None:
        raise UserError(
            f"--whole-word-mask needs pieces that show word starts (WordPiece ##, byte-level BPE Ġ, SentencePiece "
            f"▁); tokenizer {name_or_path} shows none, drop --whole-word-mask"
        )
    added = backend.get_added_tokens_decoder()
    tokens = [None if i in added else backend.id_to_token(i) for i in range(backend.get_vocab_size())]
    return tokens, *marks
