"""`python -m pretrain.checkpoint to-universal SAVE_DIR`: checkpoint tools on the command line.

The library is pretrain/runtime/ (checkpoint.py: save, tags, pruning; resume.py; weights.py: conversion and
weights only); this module is its command, kept at this name so the documented command stays the same.
"""

from __future__ import annotations

import argparse
import sys

from common.errors import run_cli
from common.log import get_logger
from pretrain.runtime.weights import to_universal

log = get_logger(__name__)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.checkpoint",
        description="Checkpoint tools. to-universal: convert the newest ZeRO checkpoint of a --save directory "
        "into DeepSpeed's universal format, so the same run can resume on a different number of processes.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("to-universal", help="convert a ZeRO checkpoint to the universal format")
    conv.add_argument("save_dir", help="the run's --save directory")
    conv.add_argument("--tag", help="checkpoint tag to convert (default: newest good)")
    conv.add_argument(
        "--trust-checkpoint", action="store_true", help="skip the safe-load check (pretrain.runtime.safe_load)"
    )
    args = parser.parse_args(argv)
    dst = to_universal(args.save_dir, args.tag, args.trust_checkpoint)
    log.info(f"wrote {dst}; relaunch the run with any number of processes to resume from it")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(_main))
