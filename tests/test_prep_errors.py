"""Bad input: one line naming the file and what to do, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
from fixtures_prep import documents, prep_tokenizer_fixture, run_cli, run_subprocess, txt  # noqa: F401

from data_prep.indexed import HEADER_BYTES, IndexedDataset


def fails(capsys, *argv, match: str) -> str:
    """Run `bert-prep ARGV`, expect exit 2 and a one-line `error:` message containing `match`."""
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert match in err[0], err[0]
    return err[0]


def build_args(tok, out, *inputs, extra=()):
    return ("build", "--input", *inputs, "--tokenizer", tok, "--output", out, *extra)


@pytest.fixture
def good(tmp_path, prep_tokenizer):
    src = tmp_path / "good.txt"
    src.write_text(txt(documents(10, seed=11)), encoding="utf-8")
    return src


def test_bad_build_inputs_name_the_file_and_write_nothing(tmp_path, capsys, prep_tokenizer, good):
    out = tmp_path / "out" / "d"
    missing = tmp_path / "nope.txt"
    fails(capsys, *build_args(prep_tokenizer, out, good, missing), match=str(missing))
    fails(capsys, *build_args(prep_tokenizer, out, str(tmp_path / "*.none")), match="*.none")
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    fails(capsys, *build_args(prep_tokenizer, out, tmp_path / "empty.txt"), match="no text")
    (tmp_path / "bin.txt").write_bytes(b"The river.\n" + bytes(range(256)) * 4)
    fails(capsys, *build_args(prep_tokenizer, out, good, tmp_path / "bin.txt"), match="bin.txt looks binary")
    fails(capsys, *build_args(prep_tokenizer, out, good, tmp_path / "bin.txt", extra=["--workers", 2]),
          match="bin.txt looks binary")  # fmt: skip
    (tmp_path / "utf.txt").write_bytes(b"The river.\n\nThe ri\xffver.\n")
    fails(capsys, *build_args(prep_tokenizer, out, tmp_path / "utf.txt", extra=["--strict"]), match="utf.txt line 3")
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(good.read_bytes())[:-40])
    fails(capsys, *build_args(prep_tokenizer, out, tmp_path / "cut.txt.gz"), match="cut.txt.gz could not be read")
    (tmp_path / "a.jsonl").write_text('{"text": "The river."}\n{"text": "The team.\n')
    fails(capsys, *build_args(prep_tokenizer, out, tmp_path / "a.jsonl", extra=["--format", "jsonl"]),
          match="a.jsonl line 2 is not valid JSON")  # fmt: skip
    (tmp_path / "b.jsonl").write_text('{"body": "The river."}\n')
    fails(capsys, *build_args(prep_tokenizer, out, tmp_path / "b.jsonl", extra=["--format", "jsonl"]),
          match="--text-key")  # fmt: skip
    fails(capsys, *build_args(prep_tokenizer, out, good, extra=["--workers", 0]), match="--workers")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_unloadable_tokenizer_and_existing_output(tmp_path, capsys, prep_tokenizer, good):
    fails(capsys, *build_args(tmp_path / "no_tok", tmp_path / "d", good), match="no_tok does not exist")
    broken = tmp_path / "broken_tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    fails(capsys, *build_args(broken, tmp_path / "d", good), match="broken_tok does not load")
    fails(capsys, *build_args(prep_tokenizer / "vocab.txt", tmp_path / "d", good), match="vocab.txt is a file")
    (tmp_path / "empty_tok").mkdir()
    fails(capsys, *build_args(tmp_path / "empty_tok", tmp_path / "d", good), match="empty_tok has no vocab.txt")
    assert run_cli(*build_args(prep_tokenizer, tmp_path / "d", good)) == 0
    before = (tmp_path / "d.bin").read_bytes()
    capsys.readouterr()
    fails(capsys, *build_args(prep_tokenizer, tmp_path / "d", good), match="--overwrite")
    # a failing --overwrite run keeps the old dataset intact
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01")
    fails(capsys, *build_args(prep_tokenizer, tmp_path / "d", tmp_path / "bin.txt", extra=["--overwrite"]),
          match="binary")  # fmt: skip
    assert (tmp_path / "d.bin").read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_console_error_is_one_line_without_traceback(tmp_path, prep_tokenizer):
    r = run_subprocess("build", "--input", tmp_path / "missing.txt", "--tokenizer", prep_tokenizer, "--output",
                       tmp_path / "d")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: input {tmp_path / 'missing.txt'} does not exist (no file, directory or glob "\
        "match); check --input"  # fmt: skip


@pytest.fixture
def dataset(tmp_path, prep_tokenizer, good):
    assert run_cli(*build_args(prep_tokenizer, tmp_path / "d", good)) == 0
    return tmp_path / "d"


def test_inspect_reports_and_verifies_a_good_dataset(dataset, capsys):
    capsys.readouterr()
    assert run_cli("inspect", dataset, "--verify", "--show", 3) == 0
    out = capsys.readouterr().out
    ds = IndexedDataset(dataset)
    assert f"sentences {len(ds):,}" in out and "verify    ok" in out and "dtype     uint16" in out
    assert out.count("\n[") == 3  # three decoded samples


def corrupt(path, offset, data: bytes):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_inspect_rejects_truncated_or_corrupted_files(dataset, capsys):
    idx, bin_, manifest = (dataset.with_suffix(s) for s in (".idx", ".bin", ".json"))
    good_idx, good_bin, good_json = idx.read_bytes(), bin_.read_bytes(), manifest.read_text()
    n = len(IndexedDataset(dataset))

    def restore():
        idx.write_bytes(good_idx), bin_.write_bytes(good_bin), manifest.write_text(good_json)

    idx.write_bytes(good_idx[:-5])
    fails(capsys, "inspect", dataset, match="d.idx is truncated")
    restore()
    corrupt(idx, 0, b"XXXX")
    fails(capsys, "inspect", dataset, match="not an MMIDIDX index")
    restore()
    bin_.write_bytes(good_bin[:-2])
    fails(capsys, "inspect", dataset, match="d.bin is truncated")
    restore()
    bin_.write_bytes(good_bin + b"\x00\x00")
    fails(capsys, "inspect", dataset, "--verify", match="d.bin has")
    restore()
    corrupt(idx, HEADER_BYTES + 4, struct.pack("<i", 1))  # second sequence's length
    fails(capsys, "inspect", dataset, "--verify", match="lengths and pointers disagree")
    restore()
    corrupt(idx, HEADER_BYTES + 12 * n + 8, struct.pack("<q", 10**6))  # a document boundary
    fails(capsys, "inspect", dataset, "--verify", match="document boundaries")
    restore()
    corrupt(bin_, 2, np.array([65535], np.uint16).tobytes())  # an id outside the vocabulary
    fails(capsys, "inspect", dataset, "--verify", match="outside the vocabulary")
    restore()
    m = json.loads(good_json)
    m["counts"]["tokens"] += 1
    manifest.write_text(json.dumps(m))
    fails(capsys, "inspect", dataset, "--verify", match="tokens")
    manifest.write_text("{truncated")
    fails(capsys, "inspect", dataset, "--verify", match="d.json is not a readable JSON manifest")
    restore()
    fails(capsys, "inspect", dataset.with_name("nothing"), match="nothing.idx does not exist")
    assert run_cli("inspect", dataset, "--verify") == 0


def test_bad_vocab_inputs(tmp_path, capsys, good):
    out = tmp_path / "tok"
    fails(capsys, "vocab", "--input", tmp_path / "nope", "--vocab-size", 100, "--output", out, match="nope")
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def\n")
    fails(capsys, "vocab", "--input", good, tmp_path / "bin.txt", "--vocab-size", 100, "--output", out,
          match="bin.txt looks binary")  # fmt: skip
    (tmp_path / "empty.txt").write_text("\n\n")
    fails(capsys, "vocab", "--input", tmp_path / "empty.txt", "--vocab-size", 100, "--output", out, match="no text")
    fails(capsys, "vocab", "--input", good, "--vocab-size", 3, "--output", out, match="--vocab-size")
    assert not out.exists()
