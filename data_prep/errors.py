"""User-facing errors: one sentence, no traceback, non-zero exit.

Every command-line entry point runs through `run_cli`, so a `UserError` raised anywhere below it
(bad path, corrupt file, inconsistent flags) reaches the user as `error: <message>` and exit code 2,
while a genuine bug still shows its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A mistake the user can fix; the message says what was wrong and what to do."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; turn a UserError or Ctrl-C into a one-line message and an exit code."""
    try:
        return int(main(argv) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
