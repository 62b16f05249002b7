"""Parquet, Arrow and `datasets.save_to_disk` inputs, mixed formats in one run, document boundaries.

Inputs are written by the libraries users have them from (pyarrow, datasets); the reference for every
build is the same documents as txt, the convention `bert-prep` has always read.
"""

from __future__ import annotations

import json
import warnings

import datasets
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
from fixtures_prep import documents, jsonl, prep_tokenizer_fixture, run_cli, txt  # noqa: F401
from test_prep_errors import fails
from test_prep_resume import interrupt_after

from data_prep import inputs, text
from data_prep.indexed import IndexedDataset


def contents(prefix) -> list[list[list[int]]]:
    ds = IndexedDataset(prefix)
    return [[ds[i].tolist() for i in ds.document(j)] for j in range(ds.num_documents)]


def build(tok, out, *inputs, extra=()) -> list[list[list[int]]]:
    assert run_cli("build", "--input", *inputs, "--tokenizer", tok, "--output", out, *extra) == 0
    return contents(out)


def rows(docs: list[list[str]]) -> list[str]:
    """One row per document, its paragraphs on separate lines."""
    return ["\n".join(doc) for doc in docs]


def write_arrow(path, table: pa.Table, stream: bool) -> None:
    """An Arrow IPC stream (what datasets writes) or file, in batches of 7 rows."""
    with pa.OSFile(str(path), "wb") as sink:
        new = pa.ipc.new_stream if stream else pa.ipc.new_file
        with new(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=7):
                writer.write_batch(batch)


def test_parquet_arrow_and_save_to_disk_give_the_txt_dataset(tmp_path, prep_tokenizer):
    docs = documents(45, seed=50)
    (tmp_path / "ref.txt").write_text(txt(docs), encoding="utf-8")
    ref = build(prep_tokenizer, tmp_path / "ref", tmp_path / "ref.txt")
    table = pa.table({"id": list(range(45)), "text": rows(docs)})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=10)  # several row groups
    pq.write_table(table.cast(pa.schema([("id", pa.int64()), ("text", pa.large_string())])), tmp_path / "b.pq")
    write_arrow(tmp_path / "stream.arrow", table, stream=True)
    write_arrow(tmp_path / "file.arrow", table, stream=False)
    datasets.Dataset.from_dict({"text": rows(docs), "n": list(range(45))}).save_to_disk(
        str(tmp_path / "saved"), num_shards=3
    )
    for name in ("a.parquet", "b.pq", "stream.arrow", "file.arrow", "saved"):
        for chunk_mb in ("1", "0.0005"):  # one chunk; chunks smaller than a document
            out = tmp_path / f"out_{name}_{chunk_mb}"
            assert build(prep_tokenizer, out, tmp_path / name, extra=["--chunk-mb", chunk_mb]) == ref, name
    args = ["--workers", "2", "--chunk-mb", "0.001", "--shards", "2"]  # any worker count: the same bytes
    for out, extra in ((tmp_path / "w2", args), (tmp_path / "w1", args[2:])):
        assert (
            run_cli("build", "--input", tmp_path / "a.parquet", "--tokenizer", prep_tokenizer, "--output", out, *extra)
            == 0
        )
    for name in ("w1_00000.bin", "w1_00001.idx"):
        assert (tmp_path / name).read_bytes() == (tmp_path / name.replace("w1", "w2")).read_bytes()
    manifest = IndexedDataset(tmp_path / "out_saved_1").manifest
    assert [s["path"].rsplit("/", 1)[1] for s in manifest["sources"]] == [
        f"data-0000{i}-of-00003.arrow" for i in range(3)
    ]
    assert {s["format"] for s in manifest["sources"]} == {"arrow"} and manifest["text_key"] == "text"


def test_mixed_formats_in_one_vocab_and_one_build(tmp_path):
    """wiki as jsonl (a WikiExtractor-style name without extension, read through `jsonl:`), books as txt,
    more as Parquet: one vocab run and one build, equal to the same documents converted to one txt file."""
    wiki, books, more = documents(30, seed=51), documents(20, seed=52), documents(10, seed=53)
    (tmp_path / "wiki").mkdir()
    (tmp_path / "wiki" / "wiki_00").write_text(jsonl(wiki), encoding="utf-8")
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "b.txt").write_text(txt(books), encoding="utf-8")
    pq.write_table(pa.table({"text": rows(more)}), tmp_path / "books" / "more.parquet")
    (tmp_path / "books" / "_SUCCESS").write_text("")  # a Spark marker: skipped in a directory
    (tmp_path / "all.txt").write_text(txt(books + more + wiki), encoding="utf-8")  # sorted input order
    mixed = ["jsonl:" + str(tmp_path / "wiki" / "wiki_*"), tmp_path / "books"]
    # what the vocabulary trainer sees (its result is not bit-reproducible run to run, so compare its input)
    paragraphs = text.TextReader(inputs.resolve_inputs([str(m) for m in mixed])).paragraphs()
    assert list(paragraphs) == [p for doc in books + more + wiki for p in doc]
    args = ["vocab", "--input", *mixed, "--vocab-size", 400, "--output", tmp_path / "tok_mixed", "--no-progress"]
    assert run_cli(*args) == 0 and len((tmp_path / "tok_mixed" / "vocab.txt").read_text().splitlines()) > 300
    assert run_cli("vocab", "--input", tmp_path / "all.txt", "--vocab-size", 400, "--output", tmp_path / "tok_ref") == 0
    tok = tmp_path / "tok_ref"
    assert build(tok, tmp_path / "mixed", *mixed) == build(tok, tmp_path / "ref", tmp_path / "all.txt")
    formats = [s["format"] for s in IndexedDataset(tmp_path / "mixed").manifest["sources"]]
    assert formats == ["txt", "parquet", "jsonl"]
    # --format overrides every extension (and --jsonl-key stays an alias of --text-key)
    (tmp_path / "w.txt").write_text(jsonl(wiki, key="body"), encoding="utf-8")
    got = build(tok, tmp_path / "forced", tmp_path / "w.txt", extra=["--format", "jsonl", "--jsonl-key", "body"])
    assert got == build(tok, tmp_path / "wiki_ref", "jsonl:" + str(tmp_path / "wiki" / "wiki_00"))


def test_document_boundaries(tmp_path, prep_tokenizer):
    """A book with blank lines between paragraphs; one-sentence rows (Hugging Face bookcorpus)."""
    book = [p for doc in documents(8, seed=54) for p in doc]
    (tmp_path / "book.txt").write_text("\n\n".join(book) + "\n", encoding="utf-8")
    per_paragraph = build(prep_tokenizer, tmp_path / "blank", tmp_path / "book.txt")
    whole = build(prep_tokenizer, tmp_path / "file", tmp_path / "book.txt", extra=["--doc-boundary", "file"])
    per_line = build(prep_tokenizer, tmp_path / "row", tmp_path / "book.txt", extra=["--doc-boundary", "row"])
    assert len(per_paragraph) == len(book) and per_line == per_paragraph
    assert whole == [[s for doc in per_paragraph for s in doc]]
    sents = _sentences(" ".join(p for doc in documents(12, seed=55) for p in doc))
    pq.write_table(pa.table({"text": sents[:20] + [""] + sents[20:]}), tmp_path / "s.parquet")  # "": a break
    one_row = ["--no-split-sentences"]  # a row is one sequence
    with pytest.warns(UserWarning, match="are a single sentence; NSP/SOP pretraining skips them"):
        one_each = build(prep_tokenizer, tmp_path / "rows", tmp_path / "s.parquet", extra=one_row)
    assert [len(d) for d in one_each] == [1] * len(sents)
    assert IndexedDataset(tmp_path / "rows").manifest["counts"]["single_sentence_documents"] == len(sents)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when documents hold several sentences
        blocks = build(
            prep_tokenizer, tmp_path / "blocks", tmp_path / "s.parquet", extra=[*one_row, "--doc-boundary", "blank"]
        )
        one = build(
            prep_tokenizer, tmp_path / "one", tmp_path / "s.parquet", extra=[*one_row, "--doc-boundary", "file"]
        )
    assert blocks == [[s for d in one_each[:20] for s in d], [s for d in one_each[20:] for s in d]]
    assert one == [[s for d in one_each for s in d]]


def _sentences(paragraph: str) -> list[str]:
    import blingfire

    return [s for s in blingfire.text_to_sentences(paragraph).split("\n") if s.strip()]


def test_pretraining_warns_when_most_documents_are_one_sentence(tmp_path, prep_tokenizer):
    from pretrain.data import PretrainingData
    from pretrain.data_config import DataConfig

    docs = [[s] for s in _sentences(" ".join(p for d in documents(20, seed=57) for p in d))]
    docs += documents(5, seed=58)  # a few documents with pairs in them
    pq.write_table(pa.table({"text": rows(docs)}), tmp_path / "d.parquet")
    with pytest.warns(UserWarning):
        build(prep_tokenizer, tmp_path / "d", tmp_path / "d.parquet", extra=["--no-split-sentences"])
    cfg = dict(prefixes=[str(tmp_path / "d")], seq_len=32, eval_fraction=0.0, num_workers=0)
    with pytest.warns(UserWarning, match="are a single sentence, which --pair-task nsp skips"):
        PretrainingData(DataConfig(**cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PretrainingData(DataConfig(**cfg, pair_task="none"))


def test_bad_parquet_and_arrow_inputs_name_file_and_column(tmp_path, capsys, prep_tokenizer):
    out = tmp_path / "out" / "d"
    table = pa.table({"body": rows(documents(40, seed=59)), "n": list(range(40))})
    pq.write_table(table, tmp_path / "a.parquet", compression="zstd", row_group_size=10)

    def bad(*inputs, match, extra=()):
        fails(capsys, "build", "--input", *inputs, "--tokenizer", prep_tokenizer, "--output", out, *extra, match=match)

    bad(tmp_path / "a.parquet", match="a.parquet has no column 'text' (it has 'body', 'n'); set --text-key")
    bad(tmp_path / "a.parquet", extra=["--text-key", "n"], match="a.parquet column 'n' holds int64, not text")
    raw = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(raw[:-100])
    bad(tmp_path / "cut.parquet", match="cut.parquet is not a readable Parquet file")
    (tmp_path / "text.parquet").write_text("The river.\n")
    bad(tmp_path / "text.parquet", match="text.parquet is not a readable Parquet file")
    pages = bytearray(raw)
    start = raw.index(b"\x28\xb5\x2f\xfd", 4)  # a zstd frame: a compressed page of the first row group
    pages[start + 8 : start + 40] = bytes(32)
    (tmp_path / "pages.parquet").write_bytes(bytes(pages))
    bad(tmp_path / "pages.parquet", extra=["--text-key", "body"], match="pages.parquet column 'body' could not be read")
    write_arrow(tmp_path / "a.arrow", table, stream=True)
    (tmp_path / "cut.arrow").write_bytes((tmp_path / "a.arrow").read_bytes()[:-300])
    bad(tmp_path / "cut.arrow", extra=["--text-key", "body"], match="cut.arrow column 'body' could not be read")
    bad(tmp_path / "a.arrow", match="a.arrow has no column 'text'")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["The river."]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    capsys.readouterr()  # datasets' progress bar
    bad(tmp_path / "dd", match="is a datasets.DatasetDict; pass one split's directory")
    fails(capsys, "vocab", "--input", tmp_path / "a.parquet", "--vocab-size", 100, "--output", tmp_path / "tok",
          match="a.parquet has no column 'text'")  # fmt: skip
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert not (tmp_path / "tok" / "vocab.txt").exists()


def test_parquet_reader_streams_in_batches_sized_by_the_chunk(tmp_path):
    """Batches hold about `max_bytes` of text (never the whole file), and the progress reaches the file size."""
    from data_prep import columnar

    table = pa.table({"text": ["word " * 200] * 500})  # 1 KB rows, 0.5 MB, one row group
    pq.write_table(table, tmp_path / "a.parquet")
    stats = inputs.ReadStats()
    seen = []
    batches = columnar._parquet_batches(tmp_path / "a.parquet", "text", stats, 0, 20_000)
    for column in batches:
        seen.append(len(column))
    assert 10 <= max(seen) <= 40 and sum(seen) == 500  # ~20 rows of 1 KB each
    assert stats.bytes_read == (tmp_path / "a.parquet").stat().st_size
    reader = text.TextReader(inputs.resolve_inputs([str(tmp_path / "a.parquet")]))
    assert sum(len(p) for p in reader.paragraphs(20_000)) == 500 * len("word " * 200) - 500
    assert reader.stats.text_bytes == 500 * 1000


def test_parquet_build_resumes_after_an_interruption(tmp_path, prep_tokenizer, monkeypatch, capsys):
    pq.write_table(pa.table({"text": rows(documents(400, seed=60))}), tmp_path / "a.parquet", row_group_size=50)
    args = ["build", "--input", tmp_path / "a.parquet", "--tokenizer", prep_tokenizer, "--chunk-mb", "0.01"]
    assert run_cli(*args, "--output", tmp_path / "clean", "--shards", "2") == 0
    with monkeypatch.context() as m:
        interrupt_after(m, 4)
        assert run_cli(*args, "--output", tmp_path / "d", "--shards", "2") == 130
    assert json.loads((tmp_path / "d.journal.tmp").read_text())["chunks"] == 4
    capsys.readouterr()
    assert run_cli(*args, "--output", tmp_path / "d", "--shards", "2") == 0
    assert "resuming" in capsys.readouterr().out
    for k in range(2):
        for ext in ("bin", "idx", "json"):
            assert (tmp_path / f"d_{k:05d}.{ext}").read_bytes() == (tmp_path / f"clean_{k:05d}.{ext}").read_bytes()
    with monkeypatch.context() as m:  # another --doc-boundary is another build: it starts over
        interrupt_after(m, 4)
        assert run_cli(*args, "--output", tmp_path / "e") == 130
    assert run_cli(*args, "--output", tmp_path / "e", "--doc-boundary", "file") == 0
    assert "resuming" not in capsys.readouterr().out and IndexedDataset(tmp_path / "e").num_documents == 1
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_a_parquet_or_arrow_file_without_its_extension_gets_a_hint(tmp_path, fmt):
    """Read as text, a Parquet file's bytes became paragraphs; now one line says how to read it."""
    from common.errors import UserError
    from data_prep.inputs import resolve_inputs

    table = pa.table({"text": ["one document", "another one"]})
    if fmt == "parquet":
        pq.write_table(table, tmp_path / "corpus")
    else:
        with pa.OSFile(str(tmp_path / "corpus"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    with pytest.raises(UserError, match=f"without a .{fmt} extension.*pass --format {fmt}"):
        resolve_inputs([str(tmp_path / "corpus")])
    assert resolve_inputs([str(tmp_path / "corpus")], fmt)[0].format == fmt
