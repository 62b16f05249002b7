"""`bert-prep vocab`: train a BERT WordPiece vocabulary with Hugging Face `tokenizers`.

The result is a directory that `transformers.BertTokenizerFast.from_pretrained(DIR)` loads: `vocab.txt`
(one token per line, in id order, like Google's BERT releases), `tokenizer.json` and `tokenizer_config.json`.
Choices: the pipeline is BERT's own (BertNormalizer with Chinese-character splitting, lowercasing and
accent stripping unless `--cased`; BertPreTokenizer; `##` continuation prefix), the five special tokens
take ids 0-4 in the order [PAD] [UNK] [CLS] [SEP] [MASK], and the text streams from the same reader as
`bert-prep build`, so the vocabulary sees exactly the paragraphs that will be tokenized.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from data_prep import text
from data_prep.errors import UserError

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_vocab(
    inputs: list[str],
    vocab_size: int,
    output: str | os.PathLike,
    cased: bool = False,
    fmt: str = "txt",
    jsonl_key: str = "text",
    min_frequency: int = 2,
) -> Path:
    """Train on `inputs` and save a BERT tokenizer directory at `output`; returns its path."""
    if vocab_size <= len(SPECIALS) + 10:
        raise UserError(f"--vocab-size must be larger than {len(SPECIALS) + 10}, got {vocab_size}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    reader = text.TextReader(text.resolve_inputs(inputs), fmt, jsonl_key)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=not cased)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIALS,
        continuing_subword_prefix="##",
        show_progress=True,
    )
    tok.train_from_iterator((p for doc in reader.documents() for p in doc), trainer)
    if tok.get_vocab_size() <= len(SPECIALS):
        raise UserError(f"the inputs ({reader.files[0]} ...) hold no text to learn a vocabulary from; check --input")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp:  # files appear complete or not at all
        fast = transformers.BertTokenizer(tokenizer_object=tok, do_lower_case=not cased)
        fast.save_pretrained(tmp)
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        (Path(tmp) / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
        for f in sorted(Path(tmp).iterdir(), key=lambda f: f.name == "vocab.txt"):  # vocab.txt last
            os.replace(f, out / f.name)
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bert-prep vocab`."""
    p = subparsers.add_parser(
        "vocab",
        help="train a BERT WordPiece vocabulary (writes DIR/vocab.txt and the tokenizer files)",
        description=(
            "Train a BERT WordPiece vocabulary with Hugging Face tokenizers on text in the `bert-prep build` "
            "input conventions, and save a directory that transformers.BertTokenizerFast.from_pretrained loads."
        ),
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="input files, directories or globs")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size, specials included")
    p.add_argument("--output", required=True, metavar="DIR", help="directory to write the tokenizer to")
    p.add_argument("--cased", action="store_true", help="keep case and accents (default: lowercase, strip accents)")
    p.add_argument("--format", choices=text.FORMATS, default="txt", help="input format (default txt)")
    p.add_argument("--jsonl-key", default="text", help="field holding the document text in jsonl (default text)")
    p.add_argument("--min-frequency", type=int, default=2, help="drop merges seen fewer times (default 2)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    out = train_vocab(
        args.input, args.vocab_size, args.output, args.cased, args.format, args.jsonl_key, args.min_frequency
    )
    size = sum(1 for _ in open(out / "vocab.txt", encoding="utf-8"))
    print(f"wrote {out}/vocab.txt ({size} tokens, {'cased' if args.cased else 'uncased'}) and tokenizer files")
    return 0
