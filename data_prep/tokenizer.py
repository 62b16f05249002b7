"""Load a BERT WordPiece tokenizer and describe it for the manifest; encode sentences in batches.

Design choices:
- The tokenizer is loaded once through `transformers.BertTokenizer.from_pretrained` (a directory written
  by `bert-prep vocab`, a directory holding only a Google-style `vocab.txt`, or a locally cached name),
  and then only its Rust backend is used: `encode_batch_fast(..., add_special_tokens=False)` gives the
  ids of `BertTokenizerFast` id for id without building per-token Python objects.
- Worker processes rebuild the backend from its JSON string, so they never touch the file system or
  the hub and are guaranteed to tokenize exactly like the parent.
- `--workers` means cores: the backend's own thread pool is switched off, so N workers use N cores.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.errors import UserError

SPECIAL_TOKENS = ("pad", "unk", "cls", "sep", "mask")


def load(name_or_dir: str):
    """The `transformers` fast BERT tokenizer for a directory or a locally available name."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    path = Path(name_or_dir)
    if path.is_file():
        raise UserError(f"tokenizer {name_or_dir} is a file; pass its directory (the --output of `bert-prep vocab`)")
    if not path.is_dir() and os.sep in name_or_dir:
        raise UserError(f"tokenizer directory {name_or_dir} does not exist; pass the --output of `bert-prep vocab`")
    if path.is_dir() and not any((path / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
        raise UserError(f"tokenizer directory {name_or_dir} has no vocab.txt or tokenizer.json; run `bert-prep vocab`")
    try:
        tok = transformers.BertTokenizer.from_pretrained(name_or_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types for an unusable directory
        raise UserError(
            f"tokenizer {name_or_dir} does not load ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "pass a directory written by `bert-prep vocab` or one holding a BERT vocab.txt"
        ) from e
    if not getattr(tok, "is_fast", False):
        raise UserError(f"tokenizer {name_or_dir} has no fast (Rust) backend; pass a BERT WordPiece tokenizer")
    if len(tok) <= len(SPECIAL_TOKENS):  # transformers builds an empty vocabulary rather than failing
        raise UserError(f"tokenizer {name_or_dir} loads with only {len(tok)} tokens; pass a real BERT vocabulary")
    missing = [s for s in SPECIAL_TOKENS if getattr(tok, f"{s}_token_id", None) is None]
    if missing:
        raise UserError(f"tokenizer {name_or_dir} lacks the BERT special tokens {missing}; pass a BERT tokenizer")
    return tok


@dataclass(frozen=True)
class TokenizerInfo:
    """What the manifest records about the tokenizer (see docs/DESIGN.md)."""

    path: str
    sha256: str
    vocab_size: int
    lowercase: bool
    special_tokens: dict[str, int]

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "lowercase": self.lowercase,
            "special_tokens": dict(self.special_tokens),
        }


def describe(tok, name_or_dir: str) -> TokenizerInfo:
    """Manifest entry: absolute directory (or the name), vocab.txt hash, size, casing, special token ids."""
    path = Path(name_or_dir)
    vocab_file = path / "vocab.txt"
    if vocab_file.is_file():
        vocab_bytes = vocab_file.read_bytes()
    else:  # hash the vocabulary in vocab.txt form, so the same vocabulary hashes the same either way
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        vocab_bytes = "".join(t + "\n" for t, _ in vocab).encode()
    normalizer = tok.backend_tokenizer.normalizer
    lowercase = bool(getattr(normalizer, "lowercase", getattr(tok, "do_lower_case", False)))
    return TokenizerInfo(
        path=str(path.resolve()) if path.is_dir() else name_or_dir,
        sha256=hashlib.sha256(vocab_bytes).hexdigest(),
        vocab_size=len(tok),
        lowercase=lowercase,
        special_tokens={s: int(getattr(tok, f"{s}_token_id")) for s in SPECIAL_TOKENS},
    )


_CONTROL = re.compile("[\x00-\x1f\x7f]")  # ASCII control characters, tab and newline included


def ascii_normalizer(backend_json: str):
    """A cheaper normalizer that gives the same ids as the tokenizer's own on ASCII text without control
    characters, or None when the tokenizer's normalizer is not a `BertNormalizer`.

    On such text `BertNormalizer` only lowercases (when `lowercase`): `clean_text` finds no control
    character and no whitespace but spaces, `handle_chinese_chars` no CJK character, `strip_accents` no
    accent. Added tokens are matched before (`normalized=False`) or after (`normalized=True`) normalization,
    on the same text either way. The full normalizer is about 30% of the tokenizer's time on English.
    """
    from tokenizers import normalizers

    spec = json.loads(backend_json).get("normalizer") or {}
    if spec.get("type") != "BertNormalizer":
        return None
    return normalizers.Lowercase() if spec.get("lowercase", True) else normalizers.Sequence([])


class Encoder:
    """Sentences -> (concatenated ids, per-sentence lengths); picklable as the backend's JSON.

    With `fast_path`, ASCII sentences without control characters (most of an English corpus) go through a
    copy of the tokenizer whose normalizer is `ascii_normalizer`, all others through the tokenizer itself;
    the ids are the same either way (tests/test_prep_tokenize.py checks them against BertTokenizerFast).
    """

    def __init__(self, backend_json: str, dtype: np.dtype, fast_path: bool = True):
        from tokenizers import Tokenizer

        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self._tok = Tokenizer.from_str(backend_json)
        self._fast = None
        normalizer = ascii_normalizer(backend_json) if fast_path else None
        if normalizer is not None:
            self._fast = Tokenizer.from_str(backend_json)
            self._fast.normalizer = normalizer
        self.dtype = np.dtype(dtype)

    def encode(self, sentences: list[str], batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Ids of all sentences back to back (no [CLS]/[SEP]) and each sentence's length.

        Batches of `batch` sentences: an `Encoding` carries tokens, offsets and masks besides the ids (tens
        of bytes per token), so converting each batch to a flat array at once keeps that cost constant.
        """
        flats, lengths = [], []
        for i in range(0, len(sentences), batch):
            ids = self._ids(sentences[i : i + batch])
            n = np.fromiter(map(len, ids), np.int32, len(ids))
            flats.append(np.fromiter(itertools.chain.from_iterable(ids), self.dtype, int(n.sum())))
            lengths.append(n)
        if not lengths:
            return np.zeros(0, self.dtype), np.zeros(0, np.int32)
        return np.concatenate(flats), np.concatenate(lengths)

    def _ids(self, sentences: list[str]) -> list[list[int]]:
        """Each sentence's ids, the ASCII ones through the fast tokenizer."""
        if self._fast is None:
            return [e.ids for e in self._tok.encode_batch_fast(sentences, add_special_tokens=False)]
        plain = [s.isascii() and not _CONTROL.search(s) for s in sentences]
        ids: list = [None] * len(sentences)
        for tok, want in ((self._fast, True), (self._tok, False)):
            where = [j for j, p in enumerate(plain) if p is want]
            if where:
                encodings = tok.encode_batch_fast([sentences[j] for j in where], add_special_tokens=False)
                for j, e in zip(where, encodings):
                    ids[j] = e.ids
        return ids
