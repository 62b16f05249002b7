"""Load a Hugging Face tokenizer, name its special tokens, describe it for the manifest; encode in batches.

What loads (`load`):
- a BERT directory: written by `bert-prep vocab`, a `tokenizer_config.json` naming a `Bert...` class, or
  only a Google-style `vocab.txt`; or a locally cached name: through `transformers.BertTokenizer`;
- any other directory holding a `tokenizer.json`, or a `tokenizer.json` file itself (BPE, Unigram,
  WordPiece, WordLevel): through `transformers.PreTrainedTokenizerFast` on that file.

Special tokens. BERT samples need pad, cls, sep and mask (and unk where the vocabulary has one). Each role
comes from `--special-tokens ROLE=TOKEN`, else the tokenizer's config (`tokenizer_config.json` or
`special_tokens_map.json`: `cls_token`, ...; cls falls back to `bos_token`, sep to `eos_token`), else its
own special added tokens by their usual names (`[CLS]` or `<s>`, ...). A named token must be in the
vocabulary. A non-BERT tokenizer gets BERT's post-processor (`cls A sep`, `cls A sep B sep`, token types
0/1), so the tokenizer `bert-export` ships encodes pairs as pretraining built them.

Design choices:
- Only the Rust backend encodes: `encode_batch_fast(..., add_special_tokens=False)` gives the ids of the
  tokenizer's own `encode`, id for id, without building per-token Python objects. (transformers makes a
  role token that is a plain vocabulary entry a special added token; text spelling it out then encodes
  as that one token, as it does in transformers.)
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import UserError

SPECIAL_TOKENS = ("pad", "unk", "cls", "sep", "mask")
REQUIRED_SPECIAL_TOKENS = ("pad", "cls", "sep", "mask")
_FALLBACK = {"cls": "bos", "sep": "eos"}
_USUAL_NAMES = {
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]", "<s>", "<cls>"),
    "sep": ("[SEP]", "</s>", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
}
MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]


def parse_special_tokens(pairs: Sequence[str] | None) -> dict[str, str]:
    """`["cls=<s>", "sep=</s>"]` -> `{"cls": "<s>", "sep": "</s>"}`; UserError on anything else."""
    out: dict[str, str] = {}
    for pair in pairs or ():
        role, eq, token = pair.partition("=")
        if not eq or not token or role not in SPECIAL_TOKENS:
            raise UserError(
                f"--special-tokens takes ROLE=TOKEN with ROLE one of {', '.join(SPECIAL_TOKENS)}, got {pair!r}"
            )
        out[role] = token
    return out


def load(name_or_path: str, special_tokens: Mapping[str, str] | None = None):
    """The `transformers` fast tokenizer of a directory, a tokenizer.json or a locally available name, with
    its special tokens set (`special_tokens`: role -> token, overriding its config)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path, overrides = Path(name_or_path), dict(special_tokens or {})
    if is_bert(path, name_or_path):
        tok = _load_bert(name_or_path, overrides)
    else:
        tok = _load_json(path, name_or_path, overrides)
    if len(tok) <= len(SPECIAL_TOKENS):  # transformers builds an empty vocabulary rather than failing
        raise UserError(f"tokenizer {name_or_path} loads with only {len(tok)} tokens; pass a real vocabulary")
    missing = [s for s in REQUIRED_SPECIAL_TOKENS if getattr(tok, f"{s}_token_id", None) is None]
    if missing:
        raise UserError(
            f"tokenizer {name_or_path} has no {'/'.join(missing)} token; name it with --special-tokens "
            f"{missing[0]}=TOKEN"
        )
    return tok


def is_bert(path: Path, name: str) -> bool:
    """Whether `name` loads through BertTokenizer (else through its tokenizer.json); UserError when unusable."""
    if path.is_file():
        if path.suffix != ".json":
            raise UserError(
                f"tokenizer {name} is a file; pass its directory (the --output of `bert-prep vocab`) or a "
                "tokenizer.json"
            )
        return False
    if not path.is_dir():
        if os.sep in name:
            raise UserError(f"tokenizer directory {name} does not exist; pass the --output of `bert-prep vocab`")
        return True  # a locally cached name
    has_json, has_vocab = (path / "tokenizer.json").is_file(), (path / "vocab.txt").is_file()
    if not (has_json or has_vocab):
        raise UserError(f"tokenizer directory {name} has no vocab.txt or tokenizer.json; run `bert-prep vocab`")
    return not has_json or str(_read_json(path / "tokenizer_config.json").get("tokenizer_class", "")).startswith("Bert")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _load_bert(name: str, overrides: dict[str, str]):
    import transformers

    try:
        tok = transformers.BertTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as e:  # transformers raises many types for an unusable directory
        raise UserError(
            f"tokenizer {name} does not load ({type(e).__name__}: {_first_line(e)}); "
            "pass a directory written by `bert-prep vocab` or one holding a BERT vocab.txt"
        ) from e
    if not getattr(tok, "is_fast", False):
        raise UserError(f"tokenizer {name} has no fast (Rust) backend; pass a BERT WordPiece tokenizer")
    vocab = tok.get_vocab()
    for role, token in overrides.items():
        _check_in_vocab(vocab.get(token), role, token, name)
        setattr(tok, f"{role}_token", token)
    return tok


def read_backend(file: Path, name: str):
    """The `tokenizers.Tokenizer` of a tokenizer.json; UserError when it does not load."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise UserError(
            f"tokenizer {name} does not load ({type(e).__name__}: {_first_line(e)}); pass a tokenizer.json "
            "written by Hugging Face tokenizers or its directory"
        ) from e


def _load_json(path: Path, name: str, overrides: dict[str, str]):
    import transformers

    file = path if path.is_file() else path / "tokenizer.json"
    backend = read_backend(file, name)
    config = _config_tokens(file.parent) if file.name == "tokenizer.json" else {}
    roles = _roles(backend, config, overrides, name)
    backend.post_processor = _bert_template(backend, roles)
    kwargs = {f"{role}_token": token for role, token in roles.items()}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, model_input_names=MODEL_INPUT_NAMES, **kwargs)


def _config_tokens(directory: Path) -> dict[str, str]:
    """Role -> token named by the directory's `special_tokens_map.json` and `tokenizer_config.json` (this wins)."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = _read_json(directory / name)
        for role in (*SPECIAL_TOKENS, "bos", "eos"):
            value = data.get(f"{role}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and value:
                out[role] = value
    return out


def _roles(backend, config: dict[str, str], overrides: dict[str, str], name: str) -> dict[str, str]:
    """Role -> token: --special-tokens, else the config (cls <- bos, sep <- eos), else the usual names."""
    specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    roles = {}
    for role in SPECIAL_TOKENS:
        token = overrides.get(role) or config.get(role) or config.get(_FALLBACK.get(role, ""))
        token = token or next((t for t in _USUAL_NAMES[role] if t in specials), None)
        required = role in REQUIRED_SPECIAL_TOKENS or role in overrides
        if token is None or (not required and backend.token_to_id(token) is None):
            if required:
                fallback = f" or {_FALLBACK[role]}_token" if role in _FALLBACK else ""
                raise UserError(
                    f"tokenizer {name} names no {role} token (no {role}_token{fallback} in its config); "
                    f"pass --special-tokens {role}=TOKEN"
                )
            continue
        _check_in_vocab(backend.token_to_id(token), role, token, name)
        roles[role] = token
    return roles


def _check_in_vocab(token_id: int | None, role: str, token: str, name: str) -> None:
    if token_id is None:
        raise UserError(
            f"tokenizer {name} has no token {token!r} for {role}; pass --special-tokens {role}=TOKEN with a "
            "token of its vocabulary"
        )


def _bert_template(backend, roles: dict[str, str]):
    """BERT's post-processor with this tokenizer's cls and sep: `cls A sep` and `cls A sep B sep`."""
    from tokenizers import processors

    cls, sep = roles["cls"], roles["sep"]
    ids = {cls: backend.token_to_id(cls), sep: backend.token_to_id(sep)}
    return processors.TemplateProcessing(
        single=[cls, "$A", sep], pair=[cls, "$A", sep, "$B:1", f"{sep}:1"], special_tokens=list(ids.items())
    )


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]


@dataclass(frozen=True)
class TokenizerInfo:
    """What the manifest records about the tokenizer (see docs/DESIGN.md)."""

    path: str
    sha256: str
    vocab_size: int
    lowercase: bool
    special_tokens: dict[str, int]
    model: str = "WordPiece"
    special_token_strings: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "lowercase": self.lowercase,
            "model": self.model,
            "special_tokens": dict(self.special_tokens),
            "special_token_strings": dict(self.special_token_strings),
        }


def describe(tok, name_or_path: str) -> TokenizerInfo:
    """Manifest entry: absolute path (or the name), vocabulary hash, size, casing, model, special tokens."""
    path = Path(name_or_path)
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = (spec.get("model") or {}).get("type") or "unknown"
    vocab_file = path / "vocab.txt"
    if vocab_file.is_file():
        vocab_bytes = vocab_file.read_bytes()
    elif model == "WordPiece":  # hash in vocab.txt form, so the same vocabulary hashes the same either way
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        vocab_bytes = "".join(t + "\n" for t, _ in vocab).encode()
    else:  # merges, scores and pipeline fix the ids as much as the vocabulary does
        vocab_bytes = tok.backend_tokenizer.to_str().encode()
    roles = {s: getattr(tok, f"{s}_token") for s in SPECIAL_TOKENS if getattr(tok, f"{s}_token_id", None) is not None}
    return TokenizerInfo(
        path=str(path.resolve()) if path.exists() else name_or_path,
        sha256=hashlib.sha256(vocab_bytes).hexdigest(),
        vocab_size=len(tok),
        lowercase=_lowercases(spec.get("normalizer")),
        special_tokens={s: int(getattr(tok, f"{s}_token_id")) for s in roles},
        model=model,
        special_token_strings={s: str(t) for s, t in roles.items()},
    )


def _lowercases(normalizer: dict | None) -> bool:
    if not normalizer:
        return False
    if normalizer.get("type") == "Sequence":
        return any(_lowercases(n) for n in normalizer.get("normalizers", []))
    return normalizer.get("type") == "Lowercase" or bool(
        normalizer.get("type") == "BertNormalizer" and normalizer.get("lowercase")
    )


_CONTROL = re.compile("[\x00-\x1f\x7f]")  # ASCII control characters, tab and newline included


def ascii_normalizer(backend_json: str):
    """A cheaper normalizer that gives the same ids as the tokenizer's own on ASCII text without control
    characters, or None when the tokenizer's normalizer is not a `BertNormalizer`.

    On such text `BertNormalizer` only lowercases (when `lowercase`): `clean_text` finds no control
    character and no whitespace but spaces, `handle_chinese_chars` no CJK character, `strip_accents` no
    accent. Added tokens are matched before (`normalized=False`) or after (`normalized=True`) normalization,
    on the same text either way. The full normalizer is about 30% of the tokenizer's time on English.
    Any other normalizer (BPE's NFC, a Sequence, none) keeps the full path: nothing is assumed about it.
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
