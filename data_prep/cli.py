"""`bert-prep`: offline data preparation. Each subcommand is a module exposing `add_parser(subparsers)`,
which registers its arguments and sets `func`; adding a command is one line in `COMMANDS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from common.errors import run_cli
from data_prep import build, corpus, inspect, vocab

COMMANDS = [corpus, vocab, build, inspect]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bert-prep",
        description="Offline data preparation: text (txt, jsonl, Parquet, Arrow) -> WordPiece or byte-level BPE "
        "vocabulary (or any "
        "Hugging Face tokenizer) -> memory-mapped token datasets.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return p


def _main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: one-line errors, exit code 2 on a user mistake."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
