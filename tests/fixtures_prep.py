"""Raw-text corpora and a trained tokenizer for the data_prep tests.

The text mixes plain English-like sentences with the cases that break tokenizers: accents, CJK,
emoji, control characters, odd whitespace, abbreviations and numbers.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.cli import main as prep_main

ROOT = Path(__file__).resolve().parents[1]
WORDS = """the of and to in is was for on that with as by at from his her it an were are which this be or has
had one first new two after who their its they been also but not all time year world state city school river music
film team war history people university north south game album station born known played between during including
under series national since group season company released family church""".split()  # noqa: SIM905
ODD = ["café", "naïve", "Ünïcödé", "東京", "北京大学", "😀", "3.14", "1,000", "e-mail", "don't", "U.S.", "Dr.",
       "x\u200by", "tab\tbed", "ÀÉÎÕÜ", "Ελληνικά", "Русский", "a\u0301", "ﬁ", "ǅ", "[MASK]"]  # fmt: skip


def sentence(rng: random.Random) -> str:
    words = [rng.choice(ODD) if rng.random() < 0.08 else rng.choice(WORDS) for _ in range(rng.randint(3, 18))]
    return " ".join(words).capitalize() + rng.choice([".", ".", "!", "?"])


def documents(n: int, seed: int = 0) -> list[list[str]]:
    """`n` documents of 1-4 paragraphs of 1-5 sentences."""
    rng = random.Random(seed)
    return [
        [" ".join(sentence(rng) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))] for _ in range(n)
    ]


def txt(docs: list[list[str]]) -> str:
    """The txt convention: one paragraph per line, a blank line between documents."""
    return "".join("\n".join(doc) + "\n\n" for doc in docs)


def jsonl(docs: list[list[str]], key: str = "text") -> str:
    return "".join(json.dumps({key: "\n".join(doc), "id": i}) + "\n" for i, doc in enumerate(docs))


def run_cli(*argv: str) -> int:
    """`bert-prep ARGV` in-process (no progress bar noise)."""
    args = [str(a) for a in argv]
    if args[0] == "build" and "--no-progress" not in args:
        args.append("--no-progress")
    return prep_main(args)


def run_subprocess(*argv: str, **kw) -> subprocess.CompletedProcess:
    """`python -m data_prep.cli ARGV` as a real process: exit code, stderr, no traceback."""
    return subprocess.run(
        [sys.executable, "-m", "data_prep.cli", *map(str, argv)], cwd=ROOT, capture_output=True, text=True, **kw
    )


@pytest.fixture(scope="session", name="prep_tokenizer")
def prep_tokenizer_fixture(tmp_path_factory) -> Path:
    """An uncased WordPiece vocabulary (size 600) trained by `bert-prep vocab` on the test text."""
    root = tmp_path_factory.mktemp("prep_tok")
    (root / "train.txt").write_text(txt(documents(200, seed=123)), encoding="utf-8")
    assert run_cli("vocab", "--input", root / "train.txt", "--vocab-size", 600, "--output", root / "tok") == 0
    return root / "tok"


# Strings that break tokenizers: scripts, emoji sequences, combining marks, control and invisible characters,
# whitespace runs, words longer than any piece limit, special-token spellings, line and paragraph separators.
HOSTILE = [
    "Ünïcödé naïve café 東京 北京大学 Ελληνικά Русский",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flag 🇩🇪 keycap 1\ufe0f\u20e3",
    "combining a\u0301 e\u0300\u0323 Z\u0351\u0323\u0318alg\u0336o",
    "control \x01\x02\x07 tab\tvertical\x0bform\x0cend \x7f del \x1c\x1d",
    "zero\u200bwidth\u200djoiner\ufeffbom \u00adsoft",
    "whitespace   runs \u3000 ideographic\u00a0nbsp \u2003em",
    "x" * 300 + " long " + "ab" * 200,
    "<s> </s> <mask> [MASK] [CLS] <|start|> <|pad|> <unk>",
    "RTL עברית العربية \u202emirrored\u202c",
    "ﬁ ligature ǅ titlecase ß ẞ İ ı",
    "numbers 3.14 1,000,000 ½ ² ① \U0001d7d8",
    "line\u2028separator\u2029paragraph",
    "  leading and trailing  ",
    "\ufffd replacement",
]
BPE_SPECIALS = ["<|start|>", "<|pad|>", "<|end|>", "<|unk|>", "<|mask|>"]  # names no role convention knows
BPE_ROLES = {"cls": "<|start|>", "sep": "<|end|>", "pad": "<|pad|>", "mask": "<|mask|>", "unk": "<|unk|>"}


def _train_texts() -> list[str]:
    return [p for doc in documents(200, seed=123) for p in doc] + HOSTILE * 3


def train_tokenizer(kind: str, path: Path, vocab_size: int = 600) -> Path:
    """A tokenizer.json trained by Hugging Face `tokenizers` on the test text (no hub):
    `bpe`: byte-level BPE (NFC, `Ġ` word starts) with BPE_SPECIALS; `unigram`: SentencePiece-style Unigram
    (NFKC, Metaspace `▁`) with `<pad> <unk> <cls> <sep> <mask>`; `wordpiece`: a non-BERT WordPiece pipeline
    (NFD, lowercase, strip accents, whitespace split) with `[PAD] [UNK] [CLS] [SEP] [MASK]`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=BPE_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        specials = ["<pad>", "<unk>", "<cls>", "<sep>", "<mask>"]
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
        )
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece()
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_train_texts(), trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.fixture(scope="session", name="prep_tokenizers")
def prep_tokenizers_fixture(tmp_path_factory) -> dict[str, Path]:
    """kind -> tokenizer.json file (see `train_tokenizer`), plus `bpe_dir`: the BPE in a directory whose
    tokenizer_config.json names bos/eos/pad/mask/unk the way RoBERTa-style configs do (no cls/sep)."""
    root = tmp_path_factory.mktemp("prep_toks")
    out = {kind: train_tokenizer(kind, root / kind / "tokenizer.json") for kind in ("bpe", "unigram", "wordpiece")}
    config = {"bos_token": "<|start|>", "eos_token": "<|end|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}
    config["mask_token"] = {"content": "<|mask|>", "lstrip": False}  # AddedToken form, as transformers saves it
    (root / "bpe" / "tokenizer_config.json").write_text(json.dumps(config))
    out["bpe_file"] = root / "bpe_file.json"  # the same tokenizer with no config beside it
    out["bpe_file"].write_bytes(out["bpe"].read_bytes())
    out["bpe_dir"] = root / "bpe"
    return out


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live children of `pid`."""
    out = []
    for stat in os.listdir("/proc"):
        try:
            fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            cmdline = open(f"/proc/{stat}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if fields[1] == str(pid):
            out.append((int(stat), cmdline))
    return out
