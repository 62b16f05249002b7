"""`bert-prep vocab`: train a BERT WordPiece vocabulary with Hugging Face `tokenizers`.

The result is a directory that `transformers.BertTokenizerFast.from_pretrained(DIR)` loads: `vocab.txt`
(one token per line, in id order, like Google's BERT releases), `tokenizer.json` and `tokenizer_config.json`.
Choices: the pipeline is BERT's own (BertNormalizer with Chinese-character splitting, lowercasing and
accent stripping unless `--cased`; BertPreTokenizer; `##` continuation prefix), the five special tokens
take ids 0-4 in the order [PAD] [UNK] [CLS] [SEP] [MASK], and the text streams from the same reader as
`bert-prep build` (any mix of txt, jsonl, Parquet and Arrow inputs, each in its own format), so the
vocabulary sees exactly the paragraphs that will be tokenized.

Deterministic: the same inputs give the same vocab.txt, byte for byte. `tokenizers`' WordPiece trainer alone
does not (huggingface/tokenizers#1794, unfixed in 0.23): it numbers the `##c` continuation tokens in hash-map
order, and merges of equal count are then chosen by those numbers, so two runs can differ in ids and even in
tokens. A first pass over the text finds every character that can continue a word; their `##c` tokens go to
the trainer as extra special tokens, numbered in sorted order before training starts, and become ordinary
vocabulary entries in the saved tokenizer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from data_prep import text
from data_prep.errors import UserError
from data_prep.flags import add_command, option
from data_prep.log import get_logger

log = get_logger(__name__)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class VocabConfig:
    """Train a BERT WordPiece vocabulary (writes DIR/vocab.txt and the tokenizer files).

    Train a BERT WordPiece vocabulary with Hugging Face tokenizers on text in the `bert-prep build` input
    formats (txt, jsonl, Parquet, Arrow; mixed, each input's format from its extension) and save a directory
    that transformers.BertTokenizerFast.from_pretrained loads.

    Each field is a command-line flag of `bert-prep vocab` (data_prep.flags).
    """

    input: list[str] = option(metavar="PATH")
    """Input files, directories or globs, as for `bert-prep build` (formats may differ per input)."""
    vocab_size: int = option(metavar="N")
    """Vocabulary size, special tokens included."""
    output: str = option(metavar="DIR")
    """Directory to write the tokenizer to."""
    cased: bool = False
    """Keep case and accents (default: lowercase and strip accents)."""
    format: text.InputFormat | None = None
    """Read every input in this format (default: each input's extension, txt for an unknown one)."""
    text_key: str = option("text", aliases=("--jsonl-key",), metavar="KEY")
    """Field (jsonl) or string column (parquet, arrow) holding the text."""
    min_frequency: int = option(2, metavar="N")
    """Drop merges seen fewer times."""
    progress: bool = True
    """Show the trainer's progress bar (--no-progress: none)."""


def train_vocab(cfg: VocabConfig) -> Path:
    """Train on `cfg.input` and save a BERT tokenizer directory at `cfg.output`; returns its path."""
    if cfg.vocab_size <= len(SPECIALS) + 10:
        raise UserError(f"--vocab-size must be larger than {len(SPECIALS) + 10}, got {cfg.vocab_size}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from tokenizers import Tokenizer, models, trainers

    files = text.resolve_inputs(cfg.input, cfg.format)
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


def _save(tok, out: Path, cased: bool) -> Path:
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
        fast = transformers.BertTokenizer(tokenizer_object=tok, do_lower_case=not cased)
        fast.save_pretrained(tmp)
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
    size = sum(1 for _ in open(out / "vocab.txt", encoding="utf-8"))
    log.info(f"wrote {out}/vocab.txt ({size} tokens, {'cased' if cfg.cased else 'uncased'}) and tokenizer files")
    return 0
