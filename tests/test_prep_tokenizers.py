"""Any Hugging Face tokenizer: BPE, Unigram and non-BERT WordPiece tokenizer.json files, their special tokens,
ids equal to the tokenizer's own `encode` on hostile text, int32 ids past 65,535 read back by Megatron."""

from __future__ import annotations

import bisect
import json
import random
import re

import blingfire
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers
from fixtures_prep import (  # noqa: F401
    BPE_ROLES,
    HOSTILE,
    WORDS,
    documents,
    prep_tokenizers_fixture,
    run_cli,
)
from tokenizers import Tokenizer

from common.errors import UserError
from data_prep import tokenizer, words
from data_prep.indexed import IndexedDataset

KINDS = ["bpe", "unigram", "wordpiece"]


def hostile_texts(n: int, seed: int) -> list[str]:
    """HOSTILE itself, then random mixes of its pieces, words and single code points from every plane."""
    rng = random.Random(seed)
    pieces = [w for s in HOSTILE for w in s.split(" ")] + WORDS[:40] + ["\n", "\r\n", "  ", "\t"]
    out = list(HOSTILE) + ["", " ", "\x00 nul"]
    for _ in range(n):
        words = [rng.choice(pieces) for _ in range(rng.randint(1, 12))]
        words += [chr(rng.choice([rng.randrange(32, 0xD800), rng.randrange(0xE000, 0x110000)]))]
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


def roles_for(kind: str) -> dict[str, str]:
    return BPE_ROLES if kind == "bpe" else {}


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_ids_equal_the_tokenizers_own_encode_on_hostile_text(prep_tokenizers, kind):
    file = prep_tokenizers[kind]
    tok = tokenizer.load(str(file), roles_for(kind))
    encoder = tokenizer.Encoder(tok.backend_tokenizer.to_str(), np.int32)
    assert encoder._fast is None  # not a BertNormalizer: the ASCII fast path is off, it could change ids
    texts = hostile_texts(400, seed=kind.__len__())
    ids, lengths = encoder.encode(texts, batch=64)
    got = [a.tolist() for a in np.split(ids, np.cumsum(lengths)[:-1])]
    own = Tokenizer.from_file(str(file))
    assert got == [e.ids for e in own.encode_batch(texts, add_special_tokens=False)]
    assert got[:40] == [own.encode(t, add_special_tokens=False).ids for t in texts[:40]]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(file))
    assert got == hf(texts, add_special_tokens=False)["input_ids"]


def reference_documents(rows: list[str], file) -> list[list[list[int]]]:
    """Each row a document: its lines (stripped) split by blingfire, each sentence through the tokenizer's
    own `encode`; empty sentences and documents dropped, as `bert-prep build` drops them."""
    own = Tokenizer.from_file(str(file))
    docs = []
    for row in rows:
        sents = [s for p in row.splitlines() if p.strip() for s in blingfire.text_to_sentences(p.strip()).split("\n")]
        ids = [own.encode(s, add_special_tokens=False).ids for s in sents if s.strip()]
        docs.append([i for i in ids if i])
    return [d for d in docs if d]


@pytest.mark.parametrize("kind", KINDS)
def test_build_from_parquet_with_any_tokenizer(tmp_path, prep_tokenizers, kind):
    """One row per document, hostile paragraphs among English ones; the dataset holds the tokenizer's own
    ids and the manifest its model and special tokens."""
    rng = random.Random(1)
    rows = ["\n".join(doc + [rng.choice(HOSTILE)]) for doc in documents(30, seed=8)]
    pq.write_table(pa.table({"text": rows}), tmp_path / "a.parquet", row_group_size=8)
    extra = ["--special-tokens", *(f"{r}={t}" for r, t in BPE_ROLES.items())] if kind == "bpe" else []
    file = prep_tokenizers[kind]
    args = ["build", "--input", tmp_path / "a.parquet", "--tokenizer", file, "--output", tmp_path / "d"]
    assert run_cli(*args, "--chunk-mb", "0.002", *extra) == 0
    ds = IndexedDataset(tmp_path / "d")
    assert [[ds[i].tolist() for i in ds.document(j)] for j in range(ds.num_documents)] == reference_documents(
        rows, file
    )
    entry = ds.manifest["tokenizer"]
    own = Tokenizer.from_file(str(file))
    assert entry["model"] == {"bpe": "BPE", "unigram": "Unigram", "wordpiece": "WordPiece"}[kind]
    assert entry["vocab_size"] == own.get_vocab_size() and entry["path"] == str(file.resolve())
    assert entry["special_tokens"] == {r: own.token_to_id(t) for r, t in entry["special_token_strings"].items()}
    assert set(entry["special_token_strings"]) == {"pad", "unk", "cls", "sep", "mask"}
    if kind == "unigram":
        assert entry["special_token_strings"]["cls"] == "<cls>"  # found by its usual name
    assert ds.dtype == np.uint16
    assert run_cli("inspect", tmp_path / "d", "--verify", "--show", "2") == 0  # decodes with the manifest's roles


def test_special_tokens_from_flags_from_config_or_a_one_line_error(tmp_path, prep_tokenizers, capsys):
    (tmp_path / "a.txt").write_text("The river was wide. The team played.\n", encoding="utf-8")
    base = ["build", "--input", tmp_path / "a.txt", "--output", tmp_path / "d"]
    assert run_cli(*base, "--tokenizer", prep_tokenizers["bpe_file"]) == 2  # no config, no usual names
    assert "names no pad token" in capsys.readouterr().err and not list(tmp_path.glob("d*"))
    for bad, match in (("cls<s>", "ROLE=TOKEN"), ("bos=<|start|>", "ROLE one of"), ("cls=<nope>", "'<nope>'")):
        flags = ["--special-tokens", *(f"{r}={t}" for r, t in BPE_ROLES.items() if r != "cls"), bad]
        assert run_cli(*base, "--tokenizer", prep_tokenizers["bpe_file"], *flags) == 2
        assert match in capsys.readouterr().err
    # a directory whose config names bos/eos: cls and sep follow them
    assert run_cli(*base, "--tokenizer", prep_tokenizers["bpe_dir"]) == 0
    own = Tokenizer.from_file(str(prep_tokenizers["bpe"]))
    manifest = IndexedDataset(tmp_path / "d").manifest["tokenizer"]
    assert manifest["special_token_strings"] == BPE_ROLES
    assert manifest["special_tokens"] == {r: own.token_to_id(t) for r, t in BPE_ROLES.items()}
    # a flag wins over the config
    assert (
        run_cli(*base, "--tokenizer", prep_tokenizers["bpe_dir"], "--overwrite", "--special-tokens", "sep=<|pad|>") == 0
    )
    assert IndexedDataset(tmp_path / "d").manifest["tokenizer"]["special_token_strings"]["sep"] == "<|pad|>"


def test_loaded_tokenizer_encodes_pairs_like_pretraining(prep_tokenizers):
    """`load` (what finetune and export use) gives BERT's `cls A sep B sep` with token types for any tokenizer."""
    for kind in ("bpe_dir", "unigram"):
        tok = tokenizer.load(str(prep_tokenizers[kind]))
        own = Tokenizer.from_file(str(prep_tokenizers["bpe" if kind == "bpe_dir" else kind]))
        a, b = (
            own.encode("The river.", add_special_tokens=False).ids,
            own.encode("A team!", add_special_tokens=False).ids,
        )
        enc = tok("The river.", "A team!")
        assert enc["input_ids"] == [tok.cls_token_id, *a, tok.sep_token_id, *b, tok.sep_token_id]
        assert enc["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)


def test_more_than_65535_ids_are_int32_and_megatron_reads_them(tmp_path):
    """A WordLevel tokenizer.json of 70,000 words: ids past uint16 are stored as int32 (Megatron's choice;
    its format has no uint32), equal the tokenizer's own ids, and megatron-core reads them back."""
    megatron = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    from tokenizers import models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    vocab.update({f"w{i}": i for i in range(5, 70_000)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.save(str(tmp_path / "words.json"))
    rng = random.Random(3)
    rows = [
        "\n".join(" ".join(f"w{rng.randrange(5, 70_000)}" for _ in range(9)) + "." for _ in range(3)) for _ in range(40)
    ]
    pq.write_table(pa.table({"text": rows}), tmp_path / "a.parquet")
    assert run_cli("build", "--input", tmp_path / "a.parquet", "--tokenizer", tmp_path / "words.json", "--output",
                   tmp_path / "d") == 0  # fmt: skip
    ds = IndexedDataset(tmp_path / "d")
    assert ds.dtype == np.int32 and ds.manifest["dtype"] == "int32" and ds.tokens.max() > 65535
    assert [[ds[i].tolist() for i in ds.document(j)] for j in range(ds.num_documents)] == reference_documents(
        rows, tmp_path / "words.json"
    )
    theirs = megatron.IndexedDataset(str(tmp_path / "d"))
    assert theirs.index.dtype == np.int32 and len(theirs) == len(ds)
    for i in range(len(ds)):
        np.testing.assert_array_equal(theirs[i], ds[i])


def test_bad_tokenizer_files(tmp_path, prep_tokenizers):
    (tmp_path / "broken.json").write_text('{"model": {"type": "BPE"')
    with pytest.raises(UserError, match="broken.json does not load"):
        tokenizer.load(str(tmp_path / "broken.json"))
    (tmp_path / "vocab.bin").write_bytes(b"\x00")
    with pytest.raises(UserError, match="is a file; pass its directory .* or a tokenizer.json"):
        tokenizer.load(str(tmp_path / "vocab.bin"))
    spec = json.loads(prep_tokenizers["bpe"].read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}  # pieces no longer show where words start
    (tmp_path / "plain_tok.json").write_text(json.dumps(spec))
    assert words.word_marks(json.dumps(spec)) is None
    with pytest.raises(UserError, match="--whole-word-mask"):
        words.word_pieces(str(tmp_path / "plain_tok.json"))


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_whole_word_masking_groups_the_words_between_spaces(prep_tokenizers, kind):
    """Word starts read from the pieces (`Ġ`, `▁`) agree with the text's own spaces (the offsets), and every
    mask covers whole words."""
    from pretrain.masking import Masker, continuation_flags

    own = Tokenizer.from_file(str(prep_tokenizers[kind]))
    flags = continuation_flags(*_pieces(prep_tokenizers[kind], own))
    text = " ".join(p for doc in documents(6, seed=5) for p in doc)
    enc = own.encode(text, add_special_tokens=False)
    # reference: the whitespace-delimited word holding the piece's first non-space character (a piece of
    # spaces only belongs to the word that follows it)
    starts = [m.start() for m in re.finditer(r"\S+", text)]
    first = [s + len(text[s:e]) - len(text[s:e].lstrip()) for s, e in enc.offsets]
    word = np.array([bisect.bisect_right(starts, f) - 1 for f in first])
    # the first piece has no space before it (no prefix space): it follows [CLS], which it never joins
    assert flags[enc.ids][1:].tolist() == (word[1:] == word[:-1]).tolist()
    cls, sep, mask = (
        (own.token_to_id(t) for t in ("<|start|>", "<|end|>", "<|mask|>"))
        if kind == "bpe"
        else (own.token_to_id(t) for t in ("<cls>", "<sep>", "<mask>"))
    )
    masker = Masker(own.get_vocab_size(), mask, [cls, sep], 0.15, flags)
    ids = np.array([cls, *enc.ids, sep])
    longest = 0
    for seed in range(20):
        positions = masker.mask(ids, np.random.default_rng(seed))[1] - 1  # token indices in `enc`
        picked = np.isin(np.arange(len(enc.ids)), positions)
        for w in np.unique(word[picked]):
            assert picked[word == w].all(), f"word {w} is masked in part"
            longest = max(longest, int((word == w).sum()))
    assert longest >= 2  # words of several pieces were masked whole


def _pieces(file, own):
    tokens, mark, marks_start = words.word_pieces(str(file))
    return tokens, own.get_vocab_size(), mark, marks_start


def test_pretraining_whole_word_masking_with_bpe_or_a_one_line_refusal(tmp_path, prep_tokenizers):
    from pretrain.data import PretrainingData
    from pretrain.data_config import DataConfig

    (tmp_path / "a.txt").write_text("\n\n".join("\n".join(d) for d in documents(30, seed=9)) + "\n")
    spec = json.loads(prep_tokenizers["bpe"].read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}  # pieces that do not show word starts
    (tmp_path / "plain_tok.json").write_text(json.dumps(spec))
    flags = ["--special-tokens", *(f"{r}={t}" for r, t in BPE_ROLES.items())]
    for name, tok in (("bpe", prep_tokenizers["bpe_dir"]), ("plain", tmp_path / "plain_tok.json")):
        args = ["build", "--input", tmp_path / "a.txt", "--tokenizer", tok, "--output", tmp_path / name]
        assert run_cli(*args, *flags) == 0
    cfg = dict(seq_len=32, eval_fraction=0.1, num_workers=0, whole_word_mask=True)
    data = PretrainingData(DataConfig(prefixes=[str(tmp_path / "bpe")], **cfg))
    own = Tokenizer.from_file(str(prep_tokenizers["bpe"]))
    np.testing.assert_array_equal(data.maskers["train"].continuation, continuation_of(own))
    with pytest.raises(UserError, match="--whole-word-mask needs pieces that show word starts"):
        PretrainingData(DataConfig(prefixes=[str(tmp_path / "plain")], **cfg))


def continuation_of(own: Tokenizer) -> np.ndarray:
    """Byte-level BPE by hand: a piece that starts with no whitespace byte (`Ġ` a space, `ĉ` a tab, `Ċ` a
    newline, ...: byte b shows as chr(256 + b)) continues a word; special tokens never do."""
    specials = set(own.get_added_tokens_decoder())
    starts = tuple(chr(256 + b) for b in b" \t\n\r\x0b\x0c")
    pieces = [own.id_to_token(i) for i in range(own.get_vocab_size())]
    return np.array([i not in specials and not t.startswith(starts) for i, t in enumerate(pieces)])
