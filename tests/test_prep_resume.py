"""`bert-prep build` restarts: what an interrupted build keeps, when a re-run resumes, when it starts over."""

from __future__ import annotations

import json

import pytest
from fixtures_prep import documents, prep_tokenizer_fixture, run_cli, txt  # noqa: F401

from data_prep import build


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(txt(documents(600, seed=40)), encoding="utf-8")
    return path


def args(src, tok, out, *extra):
    return ("build", "--input", src, "--tokenizer", tok, "--output", out, "--chunk-mb", "0.01", *extra)


def interrupt_after(monkeypatch, chunks: int, error: type[BaseException] = KeyboardInterrupt) -> None:
    """Journal after every chunk and raise `error` while tokenizing chunk `chunks + 1`."""
    monkeypatch.setattr(build, "JOURNAL_SECONDS", 0.0)
    real, calls = build._ChunkWork.__call__, []

    def flaky(self, parts):
        calls.append(1)
        if len(calls) == chunks + 1:
            raise error("stop")
        return real(self, parts)

    monkeypatch.setattr(build._ChunkWork, "__call__", flaky)


def test_interrupted_build_keeps_its_work_and_resumes(tmp_path, src, prep_tokenizer, monkeypatch, capsys):
    assert run_cli(*args(src, prep_tokenizer, tmp_path / "clean", "--shards", "2")) == 0
    with monkeypatch.context() as m:
        interrupt_after(m, 4)
        assert run_cli(*args(src, prep_tokenizer, tmp_path / "d", "--shards", "2")) == 130  # Ctrl-C
    assert "re-run the same command to continue" in capsys.readouterr().err
    assert json.loads((tmp_path / "d.journal.tmp").read_text())["chunks"] == 4
    assert not list(tmp_path.glob("d_0000?.bin")) and list(tmp_path.glob("d_0000?.bin.tmp"))
    assert run_cli(*args(src, prep_tokenizer, tmp_path / "d", "--shards", "2")) == 0
    assert "resuming" in capsys.readouterr().out
    for k in range(2):
        for ext in ("bin", "idx", "json"):
            assert (tmp_path / f"d_{k:05d}.{ext}").read_bytes() == (tmp_path / f"clean_{k:05d}.{ext}").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_different_build_starts_over(tmp_path, src, prep_tokenizer, monkeypatch, capsys):
    """Changed options or inputs, or a damaged journal: the leftovers are discarded, never mixed in."""
    assert run_cli(*args(src, prep_tokenizer, tmp_path / "clean", "--chunk-mb", "0.02")) == 0
    for change in ("options", "journal"):
        with monkeypatch.context() as m:
            interrupt_after(m, 3)
            assert run_cli(*args(src, prep_tokenizer, tmp_path / "d", "--overwrite")) == 130
        if change == "journal":
            (tmp_path / "d.journal.tmp").write_text("{damaged")
        capsys.readouterr()
        assert run_cli(*args(src, prep_tokenizer, tmp_path / "d", "--chunk-mb", "0.02", "--overwrite")) == 0
        assert "resuming" not in capsys.readouterr().out
        for ext in ("bin", "idx"):
            assert (tmp_path / f"d.{ext}").read_bytes() == (tmp_path / f"clean.{ext}").read_bytes()
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        assert run_cli(*args(src, prep_tokenizer, tmp_path / "e")) == 130
    src.write_text(src.read_text(encoding="utf-8") + "One more paragraph.\n", encoding="utf-8")
    capsys.readouterr()
    assert run_cli(*args(src, prep_tokenizer, tmp_path / "e")) == 0
    assert "resuming" not in capsys.readouterr().out


def test_bad_input_mid_run_leaves_nothing(tmp_path, src, prep_tokenizer, monkeypatch):
    """A UserError (here a binary file found after several journaled chunks) discards everything."""
    monkeypatch.setattr(build, "JOURNAL_SECONDS", 0.0)
    (tmp_path / "z.txt").write_bytes(b"text\nmore\x00binary\n")
    assert run_cli("build", "--input", src, tmp_path / "z.txt", "--tokenizer", prep_tokenizer, "--output",
                   tmp_path / "d", "--chunk-mb", "0.01") == 2  # fmt: skip
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("d")]
