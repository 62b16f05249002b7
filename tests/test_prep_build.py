"""`bert-prep build`: every input format and compression, determinism across workers, shards, Megatron."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import numpy as np
import pytest
import torch
import zstandard
from fixtures_prep import documents, jsonl, prep_tokenizer_fixture, run_cli, txt  # noqa: F401

from data_prep.cli import main as prep_main
from data_prep.indexed import IndexedDataset

megatron = pytest.importorskip("megatron.core.datasets.indexed_dataset")

COMPRESSORS = {
    "": lambda b: b,
    ".gz": gzip.compress,
    ".xz": lzma.compress,
    ".bz2": bz2.compress,
    ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
}


def build(tok, out, *inputs, extra=()):
    assert run_cli("build", "--input", *inputs, "--tokenizer", tok, "--output", out, *extra) == 0
    return IndexedDataset(out)


def contents(ds: IndexedDataset) -> list[list[list[int]]]:
    return [[ds[i].tolist() for i in ds.document(j)] for j in range(ds.num_documents)]


def test_every_format_and_compression_gives_the_same_dataset(tmp_path, prep_tokenizer):
    docs = documents(40, seed=5)
    first, second = docs[:25], docs[25:]
    ref = build(prep_tokenizer, tmp_path / "ref", _write(tmp_path / "ref.txt", txt(docs)))
    assert ref.num_documents == 40
    for fmt, render in (("txt", txt), ("jsonl", jsonl)):
        for ext, compress in COMPRESSORS.items():
            d = tmp_path / f"{fmt}{ext or '.plain'}"
            d.mkdir()
            # two files in one directory, read in sorted order; one of them given twice (deduplicated)
            _write(d / f"a.{fmt}{ext}", render(first), compress)
            _write(d / f"b.{fmt}{ext}", render(second), compress)
            ds = build(prep_tokenizer, tmp_path / f"out_{d.name}", d, d / f"a.{fmt}{ext}", extra=["--format", fmt])
            assert contents(ds) == contents(ref), (fmt, ext)
            assert len(ds.manifest["sources"]) == 2
    globbed = build(prep_tokenizer, tmp_path / "glob", str(tmp_path / "txt.*" / "*.txt.gz"))
    assert contents(globbed) == contents(ref)


def test_manifest_counts_sources_and_megatron_reads_the_build(tmp_path, prep_tokenizer):
    src = _write(tmp_path / "a.txt.gz", txt(documents(30, seed=6)), gzip.compress)
    ds = build(prep_tokenizer, tmp_path / "d", src)
    m = ds.manifest
    assert m["format"] == "mmidx-bert" and m["format_version"] == 2 and m["tool_version"]
    assert m["counts"]["documents"] == ds.num_documents == 30
    assert m["counts"]["sentences"] == len(ds) and m["counts"]["tokens"] == ds.num_tokens
    assert m["sources"] == [
        {"path": str(src.resolve()), "bytes": src.stat().st_size, "format": "txt", "doc_boundary": "blank"}
    ]
    theirs = megatron.IndexedDataset(str(tmp_path / "d"))
    assert len(theirs) == len(ds)
    np.testing.assert_array_equal(theirs.document_indices, ds.document_indices)
    for i in range(len(ds)):
        np.testing.assert_array_equal(theirs[i], ds[i])


def test_megatron_builder_output_equals_ours_byte_for_byte(tmp_path, prep_tokenizer):
    ds = build(prep_tokenizer, tmp_path / "d", _write(tmp_path / "a.txt", txt(documents(20, seed=7))))
    builder = megatron.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    for j in range(ds.num_documents):
        for i in ds.document(j):
            builder.add_item(torch.tensor(ds[i].astype(np.int64)))
        builder.end_document()
    builder.finalize(str(tmp_path / "m.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"d{ext}").read_bytes() == (tmp_path / f"m{ext}").read_bytes()


@pytest.mark.slow
def test_output_is_identical_for_any_worker_count_and_chunk_size(tmp_path, prep_tokenizer):
    src = _write(tmp_path / "a.txt", txt(documents(120, seed=8)))
    one = build(prep_tokenizer, tmp_path / "w1", src)
    two = build(prep_tokenizer, tmp_path / "w2", src, extra=["--workers", 2, "--chunk-mb", 0.002])
    assert one.num_documents == 120
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    assert one.manifest["counts"] == two.manifest["counts"]


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_documents_longer_than_a_chunk_stay_whole(tmp_path, prep_tokenizer, fmt):
    """A document is cut into parts to bound memory, yet stored as one document, whatever the chunk size."""
    docs = documents(6, seed=12)
    docs[2] = [p for doc in documents(40, seed=13) for p in doc]  # one long document, ~40x the others
    render = txt if fmt == "txt" else jsonl
    src = _write(tmp_path / f"a.{fmt}", render(docs))
    ref = build(prep_tokenizer, tmp_path / "ref", src, extra=["--format", fmt])
    assert ref.num_documents == 6 and len(ref.document(2)) > 100
    for chunk_mb in (0.002, 0.00001):  # smaller than the long document; smaller than any paragraph
        for shards in (0, 2):
            out = tmp_path / f"c{chunk_mb}_{shards}"
            args = ["--input", src, "--tokenizer", prep_tokenizer, "--output", out, "--format", fmt]
            assert run_cli("build", *args, "--chunk-mb", chunk_mb, "--shards", shards) == 0
            if shards == 0:
                for ext in (".bin", ".idx"):
                    assert (tmp_path / f"ref{ext}").read_bytes() == out.with_name(out.name + ext).read_bytes()
            else:
                for k in range(2):
                    assert contents(IndexedDataset(f"{out}_{k:05d}")) == contents(ref)[k::2]


def test_shards_deal_documents_round_robin(tmp_path, prep_tokenizer):
    src = _write(tmp_path / "a.txt", txt(documents(23, seed=9)))
    whole = contents(build(prep_tokenizer, tmp_path / "all", src))
    args = ["--input", src, "--tokenizer", prep_tokenizer, "--output", tmp_path / "sh", "--shards", 3]
    assert run_cli("build", *args, "--chunk-mb", 0.001) == 0
    assert not (tmp_path / "sh.bin").exists()
    assert run_cli("inspect", tmp_path / "sh") == 2  # points at the shards
    for k in range(3):
        shard = IndexedDataset(tmp_path / f"sh_{k:05d}")
        assert contents(shard) == whole[k::3]
        assert shard.manifest["counts"]["documents"] == len(whole[k::3])
        assert shard.manifest["counts"]["tokens"] == shard.num_tokens
    assert run_cli("build", "--input", src, "--tokenizer", prep_tokenizer, "--output", tmp_path / "x",
                   "--shards", 30, "--no-progress") == 2  # fmt: skip
    assert not list(tmp_path.glob("x*"))


def test_invalid_utf8_is_replaced_and_counted(tmp_path, prep_tokenizer):
    good = "The river was known. The team played.\n\nA new album was released.\n"
    raw = good.encode().replace(b"river", b"ri\xffver\xfe").replace(b"album", b"al\xc3bum \xef\xbf\xbd")
    src = _write(tmp_path / "bad.txt", raw)
    ds = build(prep_tokenizer, tmp_path / "d", src)
    assert ds.manifest["counts"]["invalid_utf8_replaced"] == 3  # the genuine U+FFFD is not counted
    assert ds.num_documents == 2


def test_overwrite_replaces_and_empty_lines_make_no_empty_documents(tmp_path, prep_tokenizer):
    src = _write(tmp_path / "a.txt", "\n\n  \nThe river.\n\n\n\nThe team. The city.\n\n")
    ds = build(prep_tokenizer, tmp_path / "d", src)
    assert ds.num_documents == 2 and len(ds) == 3
    _write(src, "The river.\n")
    ds = build(prep_tokenizer, tmp_path / "d", src, extra=["--overwrite"])
    assert ds.num_documents == 1 and json.loads((tmp_path / "d.json").read_text())["counts"]["sentences"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d.bin", "d.idx", "d.json"]
    # the input directory holds the output: the dataset's own files are not read as text
    (tmp_path / "d.bin.tmp").write_bytes(b"\x00")  # and a leftover of a killed run
    ds = build(prep_tokenizer, tmp_path / "d", tmp_path, extra=["--overwrite"])
    assert ds.num_documents == 1 and [s["path"] for s in ds.manifest["sources"]] == [str(src.resolve())]


def _write(path, content, compress=lambda b: b):
    data = content.encode("utf-8") if isinstance(content, str) else content
    path.write_bytes(compress(data))
    return path


def test_progress_bar_and_summary(tmp_path, prep_tokenizer, capsys):
    src = _write(tmp_path / "a.txt", txt(documents(30, seed=14)))
    assert (
        prep_main(["build", "--input", str(src), "--tokenizer", str(prep_tokenizer), "--output", str(tmp_path / "d")])
        == 0
    )
    out, err = capsys.readouterr()
    ds = IndexedDataset(tmp_path / "d")
    assert f"docs={ds.num_documents:,}" in err and f"tokens={ds.num_tokens:,}" in err and "tok_s=" in err
    assert f"{ds.num_documents:,} documents, {len(ds):,} sentences, {ds.num_tokens:,} tokens" in out
    assert "tokens/s" in out and "MB/s" in out
