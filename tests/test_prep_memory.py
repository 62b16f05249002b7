"""Bounded memory for any line length (issue 26 item 5): long lines are cut into pieces at whitespace.

The peak-memory test runs the real `bert-prep build` and `bert-prep vocab` on a 50 MB line and reads the peak
resident size of that one process (`ru_maxrss` of a fresh parent's only child). Measured on the 2-core test
machine (docs/PERFORMANCE.md): before the cut, 992 MB (build) and 649 MB (vocab) for 8 MB, 5.8 GB and 3.6 GB
for 50 MB; after it, 250 MB and 292 MB for 8 MB, 393 MB and 397 MB for 50 MB. The bound sits between.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_prep import ROOT, WORDS, documents, jsonl, prep_tokenizer_fixture, run_cli, txt  # noqa: F401

from data_prep import inputs, text
from data_prep.indexed import IndexedDataset

PEAK_BOUND_MB = 600  # 50 MB line: 393-397 MB with the cut, 3.6-5.8 GB without


def test_pieces_cut_after_whitespace_and_only_long_lines():
    assert list(text.pieces("short line", 16)) == ["short line"]
    assert list(text.pieces("", 16)) == [""]
    assert list(text.pieces("aaaa bbbb\tcccc dddd eeee", 10)) == ["aaaa bbbb\t", "cccc dddd ", "eeee"]
    assert list(text.pieces("x" * 25, 10)) == ["x" * 10, "x" * 10, "x" * 5]  # no space: cut mid-word
    line = " ".join(np.random.default_rng(0).choice(WORDS, 500))
    assert "".join(text.pieces(line, 64)) == line and max(map(len, text.pieces(line, 64))) <= 64


def test_a_txt_file_is_read_in_pieces_as_the_whole_line_is_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "MAX_PIECE_CHARS", 7)
    rng = np.random.default_rng(1)
    alphabet = np.array(list("ab é東😀  \t"))
    for trial in range(200):
        lines = ["".join(rng.choice(alphabet, rng.integers(0, 40))) for _ in range(rng.integers(1, 5))]
        eol = ["\n", "\r\n"][trial % 2]
        path = tmp_path / f"{trial}.txt"
        path.write_bytes((eol.join(lines) + eol).encode())
        reader = text.TextReader([inputs.Input(path, "txt")])
        want = []
        for line in lines:
            cut = list(text.pieces(line, 7))
            want += [(p, i == len(cut) - 1) for i, p in enumerate(cut)]
        assert list(reader._line_pieces(path, 0)) == want
        assert reader.stats.text_bytes == path.stat().st_size


def test_long_lines_build_alike_from_txt_and_jsonl(tmp_path, monkeypatch, prep_tokenizer):
    monkeypatch.setattr(text, "MAX_PIECE_CHARS", 50)  # most paragraphs of the test text are longer
    docs = documents(30, seed=3)
    (tmp_path / "a.txt").write_text(txt(docs), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(jsonl(docs), encoding="utf-8")
    for name in ("a.txt", "a.jsonl"):
        out = tmp_path / name
        assert (
            run_cli(
                "build",
                "--input",
                out,
                "--tokenizer",
                prep_tokenizer,
                "--output",
                out,
                "--doc-boundary",
                "file",
                "--no-split-sentences",
            )
            == 0
        )
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a.txt{ext}").read_bytes() == (tmp_path / f"a.jsonl{ext}").read_bytes()
    ds = IndexedDataset(tmp_path / "a.txt")  # each paragraph one sequence, unless cut into pieces
    assert len(ds) > sum(len(d) for d in docs) and int(ds.sequence_lengths.max()) <= 50


def peak_mb(*argv: object) -> float:
    """Peak resident MB of `python -m data_prep.cli ARGV`, the only child of a fresh parent."""
    probe = (
        "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if rc == 0 else -rc)"
    )
    cmd = [sys.executable, "-c", probe, sys.executable, "-m", "data_prep.cli", *map(str, argv)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    kb = int(out.strip().splitlines()[-1])
    assert kb > 0, f"bert-prep {argv[0]} failed with exit code {-kb}"
    return kb / 1024


@pytest.mark.slow
def test_a_50_mb_line_builds_and_trains_a_vocabulary_in_bounded_memory(tmp_path, prep_tokenizer):
    words = np.random.default_rng(0).choice(WORDS, 12_000_000)
    line = " ".join(words)[:50_000_000]  # one 50 MB paragraph without a sentence end: the worst case
    assert len(line) == 50_000_000
    (tmp_path / "long.txt").write_text("A first line. It is short.\n\n" + line + "\n", encoding="utf-8")
    build = peak_mb("build", "--input", tmp_path / "long.txt", "--tokenizer", prep_tokenizer,
                    "--output", tmp_path / "d", "--no-progress")  # fmt: skip
    vocab = peak_mb("vocab", "--input", tmp_path / "long.txt", "--vocab-size", 600, "--output", tmp_path / "tok",
                    "--no-progress")  # fmt: skip
    assert build < PEAK_BOUND_MB and vocab < PEAK_BOUND_MB, (build, vocab)
    assert Path(tmp_path / "d.idx").is_file() and (tmp_path / "tok" / "vocab.txt").is_file()
