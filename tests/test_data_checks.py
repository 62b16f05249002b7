"""Data checked before step 1 (issue 26 item 4) and datasets named as one (issue 28 item 6).

Built with the real `bert-prep build`; positions, documents and ids are read back with megatron-core's reader
and checksums with xxhash itself, independently of the code under test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from fixtures_prep import ROOT, documents, prep_tokenizer_fixture, run_cli, txt  # noqa: F401
from fixtures_train import ds_config_json, run_env, tiny_model_json

from common.errors import UserError
from data_prep import integrity
from pretrain.data import PretrainingData
from pretrain.data_config import DataConfig

CFG = dict(seq_len=32, eval_fraction=0.1, num_workers=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory, prep_tokenizer) -> Path:
    """A dataset of 60 documents written by `bert-prep build` (copy it before changing it)."""
    root = tmp_path_factory.mktemp("checks")
    (root / "in.txt").write_text(txt(documents(60, seed=7)), encoding="utf-8")
    assert run_cli("build", "--input", root / "in.txt", "--tokenizer", prep_tokenizer, "--output", root / "d") == 0
    return root / "d"


def copy(prefix: Path, to: Path) -> Path:
    to.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(str(prefix) + ext, str(to) + ext)
    return to


def megatron(prefix: Path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset

    return MegatronDataset(str(prefix), multimodal=False, mmap=True)


def middle_sequence(prefix: Path) -> tuple[int, int, int]:
    """(byte offset in .bin, sequence, document) of the middle of the middle sequence, per megatron-core."""
    ref = megatron(prefix)
    seq = len(ref) // 2
    pointer, length = ref.index[seq][:2]
    doc = int(np.searchsorted(ref.document_indices, seq, side="right")) - 1
    return int(pointer) + 2 * (int(length) // 2), seq, doc


def test_build_records_the_largest_id_and_checksums(built):
    manifest = json.loads(built.with_suffix(".json").read_text())
    assert manifest["format_version"] == 2
    entry = manifest["integrity"]
    ref = megatron(built)
    top = max(int(ref[i].max()) for i in range(len(ref)))
    assert entry["max_token_id"] == top < manifest["tokenizer"]["vocab_size"]
    for ext, key in ((".bin", "bin"), (".idx", "index")):
        data = built.with_suffix(ext).read_bytes()
        assert entry[f"{key}_bytes"] == len(data)
        assert entry[f"{key}_xxh3_128"] == xxhash.xxh3_128(data).hexdigest()


def test_random_bytes_in_the_bin_refuse_the_run_at_start(built, tmp_path):
    prefix = copy(built, tmp_path / "d")
    offset, seq, doc = middle_sequence(prefix)
    with open(prefix.with_suffix(".bin"), "r+b") as f:  # random bytes, then one id surely past the vocabulary
        f.seek(offset)
        f.write(np.random.default_rng(0).integers(0, 256, 6, dtype=np.uint8).tobytes() + b"\xff\xff")
    vocab = json.loads(prefix.with_suffix(".json").read_text())["tokenizer"]["vocab_size"]
    args = ["--deepspeed_config", ds_config_json(tmp_path / "ds.json"), "--data", str(prefix), "--seq-len", "32"]
    args += ["--model", tiny_model_json(tmp_path / "m.json", vocab_size=vocab), "--save", str(tmp_path / "run")]
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.train", *args, "--train-steps", "2", "--num-workers", "0"],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert f"d.bin: document {doc} (sequence {seq}) holds token id" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_id_beyond_the_vocabulary_in_the_manifest_refuses(built, tmp_path):
    prefix = copy(built, tmp_path / "d")
    manifest = json.loads(prefix.with_suffix(".json").read_text())
    vocab = manifest["tokenizer"]["vocab_size"]
    manifest["integrity"]["max_token_id"] = vocab
    prefix.with_suffix(".json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=rf"d.json records token id {vocab}, outside the vocabulary of {vocab} ids"):
        PretrainingData(DataConfig(prefixes=[str(prefix)], **CFG))


def test_an_index_changed_after_the_build_refuses(built, tmp_path):
    prefix = copy(built, tmp_path / "d")
    ref = megatron(prefix)
    docs = ref.document_indices
    j = int(np.flatnonzero(np.diff(docs)[:-1] > 1)[0]) + 1  # a boundary that can move one sentence on
    idx = prefix.with_suffix(".idx")
    offset = idx.stat().st_size - 8 * (len(docs) - j)
    data = bytearray(idx.read_bytes())
    data[offset : offset + 8] = np.int64(docs[j] - 1).tobytes()  # still increasing: consistent, but not built
    idx.write_bytes(bytes(data))
    integrity.check_index(megatron_free(prefix))  # the index is consistent in itself ...
    with pytest.raises(UserError, match="d.idx does not match the checksum in .*d.json"):  # ... but not the built one
        PretrainingData(DataConfig(prefixes=[str(prefix)], **CFG))


def megatron_free(prefix: Path):
    from data_prep.indexed import IndexedDataset

    return IndexedDataset(prefix)


def test_an_old_manifest_warns_once_and_inspect_upgrades_it(built, tmp_path, capsys):
    prefix = copy(built, tmp_path / "d")
    path = prefix.with_suffix(".json")
    new = json.loads(path.read_text())
    old = {k: v for k, v in new.items() if k != "integrity"} | {"format_version": 1}
    path.write_text(json.dumps(old))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PretrainingData(DataConfig(prefixes=[str(prefix)], **CFG))
    said = [str(w.message) for w in caught if "format_version 1" in str(w.message)]
    assert len(said) == 1 and f"bert-prep inspect {prefix} --verify --write-manifest" in said[0]
    assert run_cli("inspect", prefix, "--verify", "--write-manifest") == 0
    assert json.loads(path.read_text()) == new  # the full read records what the build recorded as it wrote
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PretrainingData(DataConfig(prefixes=[str(prefix)], **CFG))
    assert run_cli("inspect", prefix, "--verify", "--write-manifest") == 2
    assert "already exists" in capsys.readouterr().err


def stream(data: PretrainingData, world: int, steps: int, micro: int = 4) -> list[dict[str, torch.Tensor]]:
    """The global order of `steps` micro-batches per rank of `world` ranks (rank r's i-th is global i*W + r)."""
    loaders = [data.loader("train", micro, rank, world, num_workers=0) for rank in range(world)]
    return [next(loaders[r]) for _ in range(steps) for r in range(world)]


def test_a_sample_damaged_after_the_start_check_is_skipped_alike_on_any_world_size(built, tmp_path):
    prefix = copy(built, tmp_path / "d")
    data = PretrainingData(DataConfig(prefixes=[str(prefix)], pair_task="none", **CFG))  # start check passes
    offset, seq, doc = middle_sequence(prefix)
    with open(prefix.with_suffix(".bin"), "r+b") as f:  # the run's memory map sees it
        f.seek(offset)
        f.write(b"\xff\xff")
    steps = -(-data.num_samples("train") // 8)  # a whole epoch on 2 ranks of 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        one, two = stream(data, 1, 2 * steps), stream(data, 2, steps)
    skipped = [str(w.message) for w in caught if "skipping train sample" in str(w.message)]
    assert len(skipped) == 2  # the damaged sample, met once per world size
    assert skipped[0] == skipped[1] and "\n" not in skipped[0]
    assert f"d.bin: document {doc} (sequence {seq}) holds token id 65535, outside the vocabulary" in skipped[0]
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert int(a["input_ids"].max()) < data.vocab_size and int(a["mlm_labels"].max()) < data.vocab_size
    with pytest.raises(UserError, match=f"document {doc} .*holds token id 65535"):  # a relaunch refuses at start
        PretrainingData(DataConfig(prefixes=[str(prefix)], **CFG))


def test_the_sampled_scan_reads_the_same_spread_blocks(built, monkeypatch):
    from data_prep.indexed import IndexedDataset

    ds = IndexedDataset(built)
    monkeypatch.setattr(integrity, "SAMPLE_BLOCKS", 5)
    monkeypatch.setattr(integrity, "SAMPLE_BLOCK_BYTES", 64)
    picked = integrity.blocks(ds, whole=False)
    assert picked == integrity.blocks(ds, whole=False) and len(picked) == 5
    assert picked[0][0] == 0 and sum(picked[-1]) == len(ds.tokens) and all(n == 32 for _, n in picked)
    assert sum(n for _, n in integrity.blocks(ds, whole=True)) == len(ds.tokens)


# --- issue 28 item 6: shards and globs as one --data entry


@pytest.fixture(scope="module")
def shards(tmp_path_factory, prep_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("shards")
    (root / "in.txt").write_text(txt(documents(90, seed=8)), encoding="utf-8")
    out = root / "data" / "wiki"
    assert (
        run_cli("build", "--input", root / "in.txt", "--tokenizer", prep_tokenizer, "--output", out, "--shards", 3) == 0
    )
    (root / "more.txt").write_text(txt(documents(30, seed=9)), encoding="utf-8")
    assert (
        run_cli("build", "--input", root / "more.txt", "--tokenizer", prep_tokenizer, "--output", root / "data/books")
        == 0
    )
    return root / "data"


def same_samples(a: PretrainingData, b: PretrainingData, n: int = 12) -> None:
    assert [s.prefix for s in a.sources] == [s.prefix for s in b.sources]
    assert a.num_samples("train") == b.num_samples("train") > n
    for g in range(n):
        x, y = a.masked_sample("train", g), b.masked_sample("train", g)
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_a_sharded_prefix_and_a_glob_name_their_datasets(shards):
    names = [str(shards / f"wiki_{k:05d}") for k in range(3)]
    data = PretrainingData(DataConfig(prefixes=[str(shards / "wiki")], **CFG))
    same_samples(data, PretrainingData(DataConfig(prefixes=names, **CFG)))
    every = PretrainingData(DataConfig(prefixes=[str(shards / "*")], **CFG))
    same_samples(every, PretrainingData(DataConfig(prefixes=[str(shards / "books"), *names], **CFG)))
    globbed = PretrainingData(DataConfig(prefixes=[str(shards / "wiki_*")], **CFG))
    assert [s.prefix for s in globbed.sources] == names


def test_a_shard_set_is_one_dataset_for_the_weights(shards):
    cfg = dict(CFG, prefixes=[str(shards / "wiki"), str(shards / "books")])
    plain = PretrainingData(DataConfig(**cfg))
    sizes = np.array([s.num_samples("train") for s in plain.sources])
    weighted = PretrainingData(DataConfig(**cfg, weights=[1.0, 3.0]))
    counts = weighted._slots["train"][0]
    total = sizes.sum()
    assert counts[3] == round(0.75 * total)  # books: 3 of 4 parts
    np.testing.assert_allclose(counts[:3], 0.25 * total * sizes[:3] / sizes[:3].sum(), atol=0.5)  # shards by size
    with pytest.raises(UserError, match="--data-weights has 3 values for 2 --data prefixes"):
        PretrainingData(DataConfig(**cfg, weights=[1.0, 1.0, 1.0]))


def test_a_missing_shard_or_name_is_one_line(shards, tmp_path):
    for k in range(3):
        copy(shards / f"wiki_{k:05d}", tmp_path / f"wiki_{k:05d}")
    for ext in (".bin", ".idx", ".json"):
        (tmp_path / f"wiki_00002{ext}").unlink()
    with pytest.raises(UserError, match=r"shard .*wiki_00002 is missing \(.*wiki_00000.json records 3 shards\)"):
        PretrainingData(DataConfig(prefixes=[str(tmp_path / "wiki")], **CFG))
    with pytest.raises(UserError, match=r"nope\*.bin/.idx does not exist"):
        PretrainingData(DataConfig(prefixes=[str(tmp_path / "nope*")], **CFG))
