"""Raw-text corpora and a trained tokenizer for the data_prep tests.

The text mixes plain English-like sentences with the cases that break tokenizers: accents, CJK,
emoji, control characters, odd whitespace, abbreviations and numbers.
"""

from __future__ import annotations

import json
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
