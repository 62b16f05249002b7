"""Data written by Megatron's `preprocess_data.py` (no manifest): `inspect --verify`, `--tokenizer`,
`--write-manifest`, then pretraining samples from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures_prep import documents, prep_tokenizer_fixture, run_cli, txt  # noqa: F401

from data_prep.indexed import IndexedDataset
from pretrain.data import PretrainingData
from pretrain.data_config import DataConfig

megatron = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def megatron_copy(src: IndexedDataset, prefix, extra_id: int | None = None) -> None:
    """Rewrite `src` sentence by sentence through Megatron's own `IndexedDatasetBuilder`."""
    builder = megatron.IndexedDatasetBuilder(f"{prefix}.bin", dtype=src.dtype.type)
    for j in range(src.num_documents):
        for i in src.document(j):
            builder.add_item(torch.tensor(src[i].astype(np.int64)))
        builder.end_document()
    if extra_id is not None:
        builder.add_item(torch.tensor([extra_id]))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


@pytest.fixture
def ours(tmp_path, prep_tokenizer):
    (tmp_path / "a.txt").write_text(txt(documents(40, seed=21)), encoding="utf-8")
    args = ["build", "--input", tmp_path / "a.txt", "--tokenizer", prep_tokenizer, "--output", tmp_path / "ours"]
    assert run_cli(*args) == 0
    return IndexedDataset(tmp_path / "ours")


def test_megatron_data_verifies_and_adopts_a_manifest(tmp_path, prep_tokenizer, ours, capsys):
    m = tmp_path / "m_text_sentence"
    megatron_copy(ours, m)
    capsys.readouterr()
    assert run_cli("inspect", m, "--verify") == 0
    assert "counts and ids unchecked" in capsys.readouterr().out
    assert run_cli("inspect", m, "--show", 2) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    assert run_cli("inspect", m, "--write-manifest", "--tokenizer", prep_tokenizer) == 2
    assert "--write-manifest needs --verify" in capsys.readouterr().err
    assert not m.with_suffix(".json").exists()

    assert run_cli("inspect", m, "--verify", "--tokenizer", prep_tokenizer, "--show", 2, "--write-manifest") == 0
    out = capsys.readouterr().out
    assert f"and the vocabulary of {prep_tokenizer}" in out and out.count("\n[") == 2
    adopted = json.loads(m.with_suffix(".json").read_text())
    assert adopted["adopted"] is True and adopted["sources"] == []
    assert adopted["tokenizer"] == ours.manifest["tokenizer"]
    assert adopted["dtype"] == ours.manifest["dtype"]
    assert {k: adopted["counts"][k] for k in ("documents", "sentences", "tokens")} == {
        k: ours.manifest["counts"][k] for k in ("documents", "sentences", "tokens")
    }
    assert run_cli("inspect", m, "--verify") == 0  # now against the manifest
    assert run_cli("inspect", m, "--verify", "--tokenizer", prep_tokenizer, "--write-manifest") == 2
    assert "already exists" in capsys.readouterr().err

    cfg = dict(seq_len=32, eval_fraction=0.1, num_workers=0)
    theirs, mine = (
        PretrainingData(DataConfig(prefixes=[str(m)], **cfg)),
        PretrainingData(DataConfig(prefixes=[str(tmp_path / "ours")], **cfg)),
    )
    for i in range(5):
        a, b = theirs.sample("train", 0, i), mine.sample("train", 0, i)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_megatron_data_with_ids_outside_the_vocabulary(tmp_path, prep_tokenizer, ours, capsys):
    m = tmp_path / "bad"
    megatron_copy(ours, m, extra_id=60000)
    assert run_cli("inspect", m, "--verify") == 0  # the index itself is consistent
    capsys.readouterr()
    assert run_cli("inspect", m, "--verify", "--tokenizer", prep_tokenizer, "--write-manifest") == 2
    assert "holds id 60000, outside the vocabulary" in capsys.readouterr().err
    assert not m.with_suffix(".json").exists()
