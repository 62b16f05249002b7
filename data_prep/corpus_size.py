"""`python -m data_prep.corpus_size INPUT... --min-mb 1`: is there enough text to pretrain on?

The main job (`DEMO_CORPUS=PATH bash scripts/demo.sh`) runs this before its vocabulary, dataset and training
steps, so a corpus too small to learn from, or a path that names nothing, fails in one line at once.

Design choices:
- The inputs are resolved and read exactly as `bert-prep build` reads them (`data_prep.text`: files,
  directories, globs, compressed text, jsonl, Parquet, Arrow), and the size counted is the UTF-8 text of their
  paragraphs, not the files' bytes (a compressed or columnar file holds more or less text than its size).
- Reading stops as soon as the minimum is reached, so a corpus of any size is checked in about a second.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from common.errors import UserError, run_cli
from common.log import get_logger
from data_prep.inputs import resolve_inputs
from data_prep.text import TextReader

log = get_logger(__name__)


def text_bytes(specs: Sequence[str], limit: float) -> tuple[int, int]:
    """(bytes of paragraph text read, stopping once past `limit`; the number of input files)."""
    inputs = resolve_inputs(specs)
    seen = 0
    for paragraph in TextReader(inputs).paragraphs():
        seen += len(paragraph.encode("utf-8"))
        if seen >= limit:
            break
    return seen, len(inputs)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.corpus_size", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories or globs, as for bert-prep")
    p.add_argument("--min-mb", type=float, default=1.0, help="the least text, in MB, to accept (default 1)")
    args = p.parse_args(argv)
    limit = args.min_mb * 1e6
    seen, files = text_bytes(args.inputs, limit)
    where = " ".join(args.inputs)
    if seen < limit:
        raise UserError(
            f"{where} holds {seen / 1e6:.2f} MB of text in {files} file(s), less than the {args.min_mb:g} MB "
            "pretraining needs to learn anything; pass more text"
        )
    log.info(f"corpus: {where}: at least {args.min_mb:g} MB of text in {files} file(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
