"""`bert-prep vocab` and `build` against Hugging Face: the ids we store are BertTokenizerFast's, id for id."""

from __future__ import annotations

import json

import blingfire
import numpy as np
import pytest
import transformers
from fixtures_prep import documents, jsonl, prep_tokenizer_fixture, run_cli, txt  # noqa: F401

from data_prep.indexed import IndexedDataset

BertTokenizerFast = getattr(transformers, "BertTokenizerFast", transformers.BertTokenizer)


def reference_sentences(docs: list[list[str]], split: bool = True) -> list[list[str]]:
    """Each document's sentences, split by blingfire directly (the splitter the issue names)."""
    out = []
    for doc in docs:
        sents = []
        for para in doc:
            parts = blingfire.text_to_sentences(para).split("\n") if split else [para]
            sents += [s for s in parts if s.strip()]
        out.append(sents)
    return out


def assert_dataset_matches_hf(prefix, docs, tok_dir, split: bool = True) -> None:
    hf = BertTokenizerFast.from_pretrained(str(tok_dir))
    expected = [
        [ids for ids in hf(sents, add_special_tokens=False)["input_ids"] if ids]
        for sents in reference_sentences(docs, split)
    ]
    expected = [d for d in expected if d]
    ds = IndexedDataset(prefix)
    assert ds.num_documents == len(expected)
    for j, doc in enumerate(expected):
        got = [ds[i].tolist() for i in ds.document(j)]
        assert got == doc, f"document {j} differs from BertTokenizerFast"


def test_vocab_loads_in_transformers_and_matches_vocab_txt(prep_tokenizer):
    assert sorted(p.name for p in prep_tokenizer.iterdir()) == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    hf = BertTokenizerFast.from_pretrained(str(prep_tokenizer))
    lines = (prep_tokenizer / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(hf) and 300 < len(lines) <= 600
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert hf.convert_ids_to_tokens(list(range(len(lines)))) == lines
    # BERT's uncased pipeline: accents stripped, lowercased, [CLS] ... [SEP] around a single sequence.
    enc = hf("Café NAÏVE 東京 the river", add_special_tokens=True)["input_ids"]
    assert enc[0] == hf.cls_token_id and enc[-1] == hf.sep_token_id
    assert hf.decode(enc[1:-1]).split()[:2] == ["cafe", "naive"]


def test_build_equals_bert_tokenizer_fast_uncased_txt(tmp_path, prep_tokenizer):
    docs = documents(60, seed=1)
    (tmp_path / "a.txt").write_text(txt(docs), encoding="utf-8")
    assert (
        run_cli("build", "--input", tmp_path / "a.txt", "--tokenizer", prep_tokenizer, "--output", tmp_path / "d") == 0
    )
    assert_dataset_matches_hf(tmp_path / "d", docs, prep_tokenizer)
    m = json.loads((tmp_path / "d.json").read_text())
    hf = BertTokenizerFast.from_pretrained(str(prep_tokenizer))
    assert m["tokenizer"]["path"] == str(prep_tokenizer.resolve())
    assert m["tokenizer"]["lowercase"] is True and m["tokenizer"]["vocab_size"] == len(hf)
    assert m["tokenizer"]["special_tokens"] == {
        "pad": hf.pad_token_id, "unk": hf.unk_token_id, "cls": hf.cls_token_id, "sep": hf.sep_token_id,
        "mask": hf.mask_token_id,
    }  # fmt: skip
    assert m["dtype"] == "uint16"


@pytest.mark.parametrize("split", [True, False])
def test_build_equals_bert_tokenizer_fast_cased_jsonl(tmp_path, split):
    docs = documents(50, seed=2)
    (tmp_path / "train.txt").write_text(txt(documents(150, seed=3)), encoding="utf-8")
    assert run_cli("vocab", "--input", tmp_path / "train.txt", "--vocab-size", 500, "--output", tmp_path / "tok",
                   "--cased") == 0  # fmt: skip
    (tmp_path / "a.jsonl").write_text(jsonl(docs, key="body"), encoding="utf-8")
    args = ["build", "--input", tmp_path / "a.jsonl", "--tokenizer", tmp_path / "tok", "--output", tmp_path / "d"]
    args += ["--format", "jsonl", "--jsonl-key", "body"] + ([] if split else ["--no-split-sentences"])
    assert run_cli(*args) == 0
    assert_dataset_matches_hf(tmp_path / "d", docs, tmp_path / "tok", split)
    manifest = json.loads((tmp_path / "d.json").read_text())
    assert manifest["tokenizer"]["lowercase"] is False and manifest["split_sentences"] is split


def test_google_style_vocab_txt_directory_and_int32_for_large_vocabularies(tmp_path, prep_tokenizer):
    """A directory with only vocab.txt (like Google's BERT releases); 70k entries need int32 ids."""
    base = (prep_tokenizer / "vocab.txt").read_text(encoding="utf-8").splitlines()
    tok_dir = tmp_path / "google"
    tok_dir.mkdir()
    (tok_dir / "vocab.txt").write_text("\n".join(base + [f"zz{i}" for i in range(len(base), 70000)]) + "\n")
    docs = documents(20, seed=4) + [["zz69999 zz5000 the river."]]
    (tmp_path / "a.txt").write_text(txt(docs), encoding="utf-8")
    assert run_cli("build", "--input", tmp_path / "a.txt", "--tokenizer", tok_dir, "--output", tmp_path / "d") == 0
    ds = IndexedDataset(tmp_path / "d")
    assert ds.dtype == np.int32 and ds.manifest["tokenizer"]["vocab_size"] == 70000
    assert ds[len(ds) - 1][:2].tolist() == [69999, 5000]
    assert_dataset_matches_hf(tmp_path / "d", docs, tok_dir)
