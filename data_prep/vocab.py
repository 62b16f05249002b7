"""`bert-prep vocab`: train a WordPiece (BERT) or byte-level BPE (ModernBERT) vocabulary with Hugging Face
`tokenizers` (`--model`).

The result is a directory that `transformers.BertTokenizerFast.from_pretrained(DIR)` loads: `vocab.txt`
(one token per line, in id order, like Google's BERT releases), `tokenizer.json` and `tokenizer_config.json`.
Choices: the pipeline is BERT's own (BertNormalizer with Chinese-character splitting, lowercasing and
accent stripping unless `--cased`; BertPreTokenizer; `##` continuation prefix), the five special tokens
take ids 0-4 in the order [PAD] [UNK] [CLS] [SEP] [MASK], and the text streams from the same reader as
`bert-prep build` (any mix of txt, jsonl, Parquet and Arrow inputs, each in its own format), so the
vocabulary sees exactly the paragraphs that will be tokenized.

`--model bpe` is byte-level BPE as ModernBERT's tokenizer is (NFC, the 256 byte symbols as the initial
alphabet, no prefix space, `Ġ` marking a word start), with WordPiece's special tokens and ids 0-4, the same
`[CLS] A [SEP]` post-processor and lowercasing unless `--cased`; it saves `tokenizer.json` (no vocab.txt),
which `bert-prep build --tokenizer DIR` and transformers' AutoTokenizer load. Its trainer numbers the
vocabulary deterministically (tests/test_vocab_models.py trains twice and compares).

`--model unigram` is trained by Google's `sentencepiece` (one thread), not by `tokenizers`' UnigramTrainer:
that one (0.23) gave another tokenizer.json in every process over the same text, even with
TOKENIZERS_PARALLELISM=false and RAYON_NUM_THREADS=1 set before import (its EM is serial anyway). Its source
says why: the word counts reach the trainer as a Rust HashMap (randomly keyed per process) and are collected
in that order, so the EM sums add up in another order each time; characters missing from the final pieces
get scores `min_score + k * 1e-4` in HashSet order; and pieces of equal score keep hash order in the final
sort. No trainer option (seed_size, shrinking_factor, n_sub_iterations, max_piece_length) nor sorting the
input reaches them. SentencePiece on one thread is the same in every process.
The text is normalized first by the saved tokenizer's own normalizer (NFKC, whitespace runs to one space,
lowercase unless `--cased`), so SentencePiece (identity normalization, pieces split at whitespace) learns on
exactly what the Metaspace pre-tokenizer will see; its pieces and scores become a `tokenizers` Unigram model
with WordPiece's special tokens at ids 0-4 and post-processor. Paragraphs go to SentencePiece in chunks cut
at spaces (a piece never crosses one, so the counts are unchanged), as it skips long lines.
`--min-frequency` does not apply to unigram.

Deterministic: the same inputs give the same vocab.txt, byte for byte. `tokenizers`' WordPiece trainer alone
does not (huggingface/tokenizers#1794, unfixed in 0.23): it numbers the `##c` continuation tokens in hash-map
order, and merges of equal count are then chosen by those numbers, so two runs can differ in ids and even in
tokens. A first pass over the text finds every character that can continue a word; their `##c` tokens go to
the trainer as extra special tokens, numbered in sorted order before training starts, and become ordinary
vocabulary entries in the saved tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.errors import UserError
from common.flags import add_command, option
from common.log import get_logger
from data_prep import inputs, text

log = get_logger(__name__)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class VocabConfig:
    """Train a vocabulary: WordPiece (BERT, writes DIR/vocab.txt too), byte-level BPE (ModernBERT) or unigram.

    Train a WordPiece, byte-level BPE or unigram vocabulary (--model) with Hugging Face tokenizers (unigram:
    with SentencePiece, saved as a tokenizers Unigram) on text in
    the `bert-prep build` input formats (txt, jsonl, Parquet, Arrow; mixed, each input's format from its
    extension) and save a directory that transformers' AutoTokenizer.from_pretrained and `bert-prep build
    --tokenizer DIR` load; special tokens [PAD] [UNK] [CLS] [SEP] [MASK] take ids 0-4 in every model.

    Each field is a command-line flag of `bert-prep vocab` (common.flags).
    """

    input: list[str] = option(metavar="PATH")
    """Input files, directories or globs, as for `bert-prep build` (formats may differ per input)."""
    vocab_size: int = option(metavar="N")
    """Vocabulary size, special tokens included."""
    output: str = option(metavar="DIR")
    """Directory to write the tokenizer to."""
    cased: bool = False
    """Keep case and accents (default: lowercase and strip accents)."""
    format: inputs.InputFormat | None = None
    """Read every input in this format (default: each input's extension, txt for an unknown one)."""
    text_key: str = option("text", aliases=("--jsonl-key",), metavar="KEY")
    """Field (jsonl) or string column (parquet, arrow) holding the text."""
    min_frequency: int = option(2, metavar="N")
    """Drop merges seen fewer times."""
    progress: bool = True
    """Show the trainer's progress bar (--no-progress: none)."""
    model: Literal["wordpiece", "bpe", "unigram"] = "wordpiece"
    """Vocabulary model: wordpiece (BERT; writes vocab.txt too), bpe (byte-level, as ModernBERT's) or unigram
    (SentencePiece's, with a Metaspace pre-tokenizer)."""


def train_vocab(cfg: VocabConfig) -> Path:
    """Train on `cfg.input` and save a BERT tokenizer directory at `cfg.output`; returns its path."""
    if cfg.vocab_size <= len(SPECIALS) + 10:
        raise UserError(f"--vocab-size must be larger than {len(SPECIALS) + 10}, got {cfg.vocab_size}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from tokenizers import Tokenizer, models, trainers

    files = inputs.resolve_inputs(cfg.input, cfg.format)
    if cfg.model == "bpe":
        return _train_bpe(cfg, files)
    if cfg.model == "unigram":
        return _train_unigram(cfg, files)
    tok = _pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")), cfg.cased)
    continuations = _continuation_tokens(text.TextReader(files, cfg.text_key).paragraphs(), tok)
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIALS + continuations,
        continuing_subword_prefix="##",
        show_progress=cfg.progress,
    )
    reader = text.TextReader(files, cfg.text_key)
    tok.train_from_iterator(reader.paragraphs(), trainer)
    if tok.get_vocab_size() <= len(SPECIALS) + len(continuations):
        raise UserError(f"the inputs ({reader.files[0]} ...) hold no text to learn a vocabulary from; check --input")
    # The same vocabulary in a tokenizer whose only special tokens are the five (the trainer added the `##c`).
    trained = _pipeline(Tokenizer(models.WordPiece(tok.get_vocab(), unk_token="[UNK]")), cfg.cased)
    trained.add_special_tokens(SPECIALS)
    return _save(trained, Path(cfg.output), cfg.cased)


def _train_bpe(cfg: VocabConfig, files) -> Path:
    """Byte-level BPE with WordPiece's special tokens (ids 0-4) and post-processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    lower = [] if cfg.cased else [normalizers.Lowercase()]
    tok = Tokenizer(models.BPE(unk_token=None))  # every byte is in the alphabet: nothing is unknown
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), *lower])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=cfg.progress,
    )
    reader = text.TextReader(files, cfg.text_key)
    tok.train_from_iterator(reader.paragraphs(), trainer)
    if tok.get_vocab_size() <= len(SPECIALS) + 256:
        raise UserError(f"the inputs ({reader.files[0]} ...) hold no text to learn a vocabulary from; check --input")
    return _save(tok, Path(cfg.output), cfg.cased, vocab_txt=False)


# SentencePiece skips a sentence longer than its max_sentence_length (bytes): chunks stay well under it.
_SPM_CHUNK_CHARS = 1 << 14
_SPM_MAX_BYTES = 1 << 16


def _train_unigram(cfg: VocabConfig, files) -> Path:
    """Unigram learned by SentencePiece on one thread, as a `tokenizers` Unigram with WordPiece's specials."""
    import io

    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    lower = [] if cfg.cased else [normalizers.Lowercase()]
    space = [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    normalizer = normalizers.Sequence([normalizers.NFKC(), *space, *lower])
    reader = text.TextReader(files, cfg.text_key)

    def chunks():
        for paragraph in reader.paragraphs():
            line = normalizer.normalize_str(paragraph)
            while line:
                cut = len(line) if len(line) <= _SPM_CHUNK_CHARS else line.rfind(" ", 0, _SPM_CHUNK_CHARS) + 1
                yield line[: cut or _SPM_CHUNK_CHARS].strip()
                line = line[cut or _SPM_CHUNK_CHARS :]

    model = io.BytesIO()
    spm.set_random_generator_seed(0)  # only sampling draws from it; fixed all the same
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=chunks(),
            model_writer=model,
            model_type="unigram",
            vocab_size=cfg.vocab_size,
            hard_vocab_limit=False,  # a small corpus gives fewer pieces, as the other trainers do
            pad_id=0,
            unk_id=1,
            bos_id=-1,
            eos_id=-1,
            pad_piece=SPECIALS[0],
            unk_piece=SPECIALS[1],
            user_defined_symbols=SPECIALS[2:],  # ids 2-4, in order
            normalization_rule_name="identity",  # normalized above, by the saved normalizer
            character_coverage=1.0,  # every character seen gets a piece; [UNK] only for unseen ones
            max_sentence_length=_SPM_MAX_BYTES,
            num_threads=1,  # more threads split the EM sums in another order
            minloglevel=0 if cfg.progress else 2,
        )
    except RuntimeError as e:
        if "sentences_.empty()" in str(e):  # SentencePiece's check that it read some text
            raise UserError(
                f"the inputs ({reader.files[0]} ...) hold no text to learn a vocabulary from; check --input"
            ) from e
        raise
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(sp.id_to_piece(i), 0.0 if i < len(SPECIALS) else sp.get_score(i)) for i in range(sp.get_piece_size())]
    assert [p for p, _ in vocab[: len(SPECIALS)]] == SPECIALS, vocab[: len(SPECIALS)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=1, byte_fallback=False))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens(SPECIALS)
    return _save(tok, Path(cfg.output), cfg.cased, vocab_txt=False)


def _pipeline(tok, cased: bool):
    """BERT's normalizer, pre-tokenizer and decoder on `tok`."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=not cased)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _continuation_tokens(paragraphs, tok) -> list[str]:
    """`##c` for every character c of the normalized text that can follow another inside a word (not
    whitespace, punctuation or a CJK character, which the pre-tokenizer makes words of their own), sorted."""
    raw: set[str] = set()
    for paragraph in paragraphs:
        raw.update(paragraph)
    chars = {c for r in raw for c in tok.normalizer.normalize_str(r) if not c.isspace()}
    inside = [c for c in sorted(chars) if len(tok.pre_tokenizer.pre_tokenize_str("a" + c)) == 1]
    return ["##" + c for c in inside]


def _save(tok, out: Path, cased: bool, vocab_txt: bool = True) -> Path:
    """Write the directory; files appear complete or not at all, vocab.txt last."""
    import transformers
    from tokenizers import processors

    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp:
        if vocab_txt:
            fast = transformers.BertTokenizer(tokenizer_object=tok, do_lower_case=not cased)
        else:  # BPE: the roles named, as WordPiece's BertTokenizer names them
            roles = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIALS))
            fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **roles)
        fast.save_pretrained(tmp)
        if vocab_txt:
            vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
            (Path(tmp) / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
        for f in sorted(Path(tmp).iterdir(), key=lambda f: f.name == "vocab.txt"):  # vocab.txt last
            os.replace(f, out / f.name)
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bert-prep vocab`."""
    return add_command(subparsers, "vocab", VocabConfig, run)


def run(cfg: VocabConfig) -> int:
    out = train_vocab(cfg)
    if cfg.model != "wordpiece":
        size = len(json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
        log.info(f"wrote {out}/tokenizer.json ({cfg.model}, {size} tokens, {'cased' if cfg.cased else 'uncased'})")
        return 0
    size = sum(1 for _ in open(out / "vocab.txt", encoding="utf-8"))
    log.info(f"wrote {out}/vocab.txt ({size} tokens, {'cased' if cfg.cased else 'uncased'}) and tokenizer files")
    return 0
