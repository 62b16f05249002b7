"""`bert-prep vocab` and `build` against Hugging Face: the ids we store are BertTokenizerFast's, id for id."""

from __future__ import annotations

import json
import random

import blingfire
import numpy as np
import pytest
import transformers
from fixtures_prep import WORDS, documents, jsonl, prep_tokenizer_fixture, run_cli, txt  # noqa: F401

from data_prep import tokenizer
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


def test_vocab_is_the_same_on_every_run(tmp_path):
    """`tokenizers`' WordPiece trainer numbers `##c` tokens in hash-map order and breaks ties between merges of
    equal count by those numbers (huggingface/tokenizers#1794): a small vocabulary over text full of ties came
    out different on nearly every run. `bert-prep vocab` must give the same files each time."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyzäé") for _ in range(rng.randint(3, 8))) for _ in range(120)]
    (tmp_path / "t.txt").write_text("".join(" ".join(random.Random(i).sample(words, 10)) + "\n" for i in range(300)))
    runs = []
    for i in range(4):
        assert run_cli("vocab", "--input", tmp_path / "t.txt", "--vocab-size", 200, "--min-frequency", 1,
                       "--output", tmp_path / f"v{i}", "--no-progress") == 0  # fmt: skip
        runs.append([(tmp_path / f"v{i}" / name).read_bytes() for name in ("vocab.txt", "tokenizer.json")])
    assert all(r == runs[0] for r in runs[1:])
    hf = BertTokenizerFast.from_pretrained(str(tmp_path / "v0"))
    assert sorted(hf.all_special_tokens) == sorted(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    assert "##a" in hf.get_vocab() and hf.tokenize("x ##a") == hf.tokenize("x # # a")  # an ordinary token


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


def ascii_texts(n: int, seed: int) -> list[str]:
    """ASCII strings that stress the fast path: every control character, special tokens in any case, tabs,
    words over WordPiece's 100-character limit, and raw character soup over all 128 code points."""
    rng = random.Random(seed)
    pieces = [*WORDS, "[MASK]", "[mask]", "[Mask]", "[SEP]", "[XTRA]", "MiXed", "mixed", "newword", "NEWWORD"]
    pieces += ["##ing", "don't", "U.S.", "e-mail", "3.14", "x" * 120, "\t", "\x08", "\x0b", "\x0c", "\x1f", "\x7f"]
    out = []
    for _ in range(n):
        if rng.random() < 0.3:
            out.append("".join(chr(rng.randrange(128)) for _ in range(rng.randint(1, 40))))
        else:
            words = [rng.choice(pieces) for _ in range(rng.randint(1, 15))]
            out.append(" ".join(w.upper() if rng.random() < 0.2 else w for w in words))
    return out


@pytest.mark.parametrize("cased", [False, True])
def test_ascii_fast_path_gives_bert_tokenizer_fast_ids(tmp_path, prep_tokenizer, cased):
    """`Encoder`'s cheaper normalizer for ASCII text equals BertTokenizerFast on hostile ASCII, with added
    tokens both normalized and not; and leaving out its control-character rule would break that."""
    tok_dir = prep_tokenizer
    if cased:
        (tmp_path / "train.txt").write_text(txt(documents(150, seed=3)), encoding="utf-8")
        assert run_cli("vocab", "--input", tmp_path / "train.txt", "--vocab-size", 500, "--output", tmp_path / "tok",
                       "--cased") == 0  # fmt: skip
        tok_dir = tmp_path / "tok"
    hf = BertTokenizerFast.from_pretrained(str(tok_dir))
    hf.add_tokens(["MiXed", "newword"])
    hf.add_tokens(["[XTRA]"], special_tokens=True)
    hf.save_pretrained(str(tmp_path / "added"))
    hf = BertTokenizerFast.from_pretrained(str(tmp_path / "added"))
    backend_json = tokenizer.load(str(tmp_path / "added")).backend_tokenizer.to_str()
    encoder = tokenizer.Encoder(backend_json, np.int32)
    assert encoder._fast is not None
    texts = ascii_texts(3000, seed=7) + [" ".join(documents(5, seed=8)[i]) for i in range(5)]  # + non-ASCII
    ids, lengths = encoder.encode(texts, batch=256)
    got = [a.tolist() for a in np.split(ids, np.cumsum(lengths)[:-1])]
    expected = hf(texts, add_special_tokens=False)["input_ids"]
    assert got == expected
    assert tokenizer.Encoder(backend_json, np.int32, fast_path=False)._fast is None
    unguarded = [e.ids for e in encoder._fast.encode_batch_fast(texts, add_special_tokens=False)]
    assert unguarded != expected  # control characters (and non-ASCII) need the full normalizer


def test_ascii_fast_path_only_for_bert_normalizer(prep_tokenizer):
    spec = json.loads(tokenizer.load(str(prep_tokenizer)).backend_tokenizer.to_str())
    assert tokenizer.ascii_normalizer(json.dumps(spec)) is not None
    for other in (None, {"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "Lowercase"}]}):
        spec["normalizer"] = other
        assert tokenizer.ascii_normalizer(json.dumps(spec)) is None
        assert tokenizer.Encoder(json.dumps(spec), np.int32)._fast is None


def test_no_ascii_fast_path_writes_the_same_bytes(tmp_path, prep_tokenizer):
    (tmp_path / "a.txt").write_text(txt(documents(80, seed=9)), encoding="utf-8")
    for name, extra in (("fast", []), ("full", ["--no-ascii-fast-path"])):
        args = ["build", "--input", tmp_path / "a.txt", "--tokenizer", prep_tokenizer, "--output", tmp_path / name]
        assert run_cli(*args, *extra) == 0
    for ext in ("bin", "idx"):
        assert (tmp_path / f"fast.{ext}").read_bytes() == (tmp_path / f"full.{ext}").read_bytes()
