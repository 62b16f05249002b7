"""Progress and log output of every command: plain lines on stdout, from rank 0 only unless asked otherwise.

    from common.log import get_logger
    log = get_logger(__name__)
    log.info("saved %s", path)

- One handler on the `bert` logger writes the message alone (no level or time prefix), to whatever
  `sys.stdout` is at that moment, so output reads as it always has and test captures see it.
- Rank filter: a line is written when `RANK` (set by the `deepspeed` launcher and torchrun) is 0 or unset,
  or on every rank when `BERT_LOG_RANKS=all`; lines of other ranks then carry a `[rank N]` prefix. The rank
  is read when a line is written, since launchers set it before the first line but after imports.
- Warnings meant for the user stay `warnings.warn` (each shown once); errors are `UserError` (errors.py).
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "bert"


class _CurrentStdout(logging.StreamHandler):
    """A handler bound to the current `sys.stdout`, not to the one of the moment it was made."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = int(os.environ.get("RANK", "0") or 0)
        if rank == 0:
            return True
        if os.environ.get("BERT_LOG_RANKS") == "all":
            record.msg = f"[rank {rank}] {record.msg}"
            return True
        return False


def _root() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not root.handlers:
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` (e.g. `pretrain.train` -> `bert.pretrain.train`)."""
    _root()
    return logging.getLogger(f"{ROOT}.{name}")


def is_rank0() -> bool:
    """Rank 0 of a launcher job, or a process started without one."""
    return int(os.environ.get("RANK", "0") or 0) == 0
