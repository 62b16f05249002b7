"""data_prep.indexed against Megatron-LM's own reader and writer (megatron-core is the reference)."""

import numpy as np
import pytest
import torch

from data_prep.indexed import IndexedDataset, IndexedDatasetError
from data_prep.indexed_writer import IndexedDatasetWriter

megatron = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def _docs(seed=0, n=40, vocab=30000):
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, vocab, rng.integers(1, 30)) for _ in range(rng.integers(1, 6))] for _ in range(n)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_reads_ours_and_files_are_byte_identical(tmp_path, dtype):
    docs = _docs()
    with IndexedDatasetWriter(tmp_path / "ours", dtype) as w:
        for doc in docs:
            for sent in doc:
                w.add_sequence(sent)
            w.end_document()
    builder = megatron.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for doc in docs:
        for sent in doc:
            builder.add_item(torch.tensor(sent.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))

    theirs = megatron.IndexedDataset(str(tmp_path / "ours"))
    flat = [s for doc in docs for s in doc]
    assert len(theirs) == len(flat)
    for i, sent in enumerate(flat):
        np.testing.assert_array_equal(theirs[i], sent)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()


def test_we_read_megatron_written_files(tmp_path):
    docs = _docs(seed=1, vocab=70000)
    builder = megatron.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32)
    for doc in docs:
        for sent in doc:
            builder.add_item(torch.tensor(sent.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(tmp_path / "m.idx"))
    ds = IndexedDataset(tmp_path / "m")
    assert ds.dtype == np.int32 and ds.num_documents == len(docs)
    for j, doc in enumerate(docs):
        seqs = ds.document(j)
        assert len(seqs) == len(doc)
        for i, sent in zip(seqs, doc, strict=True):
            np.testing.assert_array_equal(ds[i], sent)
            assert not ds[i].flags.owndata  # a view into the map, not a copy


def test_failed_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
        w.add_sequence([1, 2, 3])
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_truncated_index_is_a_clear_error(tmp_path):
    with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
        w.add_sequence([1, 2, 3])
    idx = tmp_path / "x.idx"
    idx.write_bytes(idx.read_bytes()[:-3])
    with pytest.raises(IndexedDatasetError, match="truncated"):
        IndexedDataset(tmp_path / "x")


def test_add_documents_equals_sequence_by_sequence_writes(tmp_path):
    docs = _docs(seed=2)
    with IndexedDatasetWriter(tmp_path / "one", np.uint16) as w:
        for doc in docs:
            for sent in doc:
                w.add_sequence(sent)
            w.end_document()
    with IndexedDatasetWriter(tmp_path / "bulk", np.uint16) as w:
        w.add_sequence(docs[0][0])  # the first bulk document continues the open one
        first = docs[0][1:]
        w.add_documents(np.concatenate(first or [np.zeros(0)]), [len(s) for s in first], [len(first)])
        # documents 1-9 in one call, the last left open and finished by the next call with an empty one
        sents = [s for doc in docs[1:10] for s in doc]
        w.add_documents(np.concatenate(sents), [len(s) for s in sents], [len(d) for d in docs[1:10]], open_last=True)
        w.add_documents(np.zeros(0), [], [0, 0])  # closes document 9; an empty document is skipped
        sents = [s for doc in docs[10:] for s in doc]
        w.add_documents(np.concatenate(sents), [len(s) for s in sents], [len(d) for d in docs[10:]])
        with pytest.raises(ValueError):
            w.add_documents(np.zeros(3), [3], [2])
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"bulk{ext}").read_bytes()
