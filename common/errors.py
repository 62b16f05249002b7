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


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """`warnings.formatwarning` for commands: `warning: <message>` without the source file and line, which
    tell a user nothing (a test or a library caller keeps Python's default)."""
    return f"warning: {str(message).splitlines()[0] if str(message) else category.__name__}\n"


def run_cli(
    main: Callable,
    argv: Sequence[str] | None = None,
    parse: Callable[[Sequence[str] | None], object] | None = None,
    after_success: Callable[[], object] | None = None,
) -> int:
    """Call `main(argv)`, or with `parse` `main(parse(argv))` (its config; a run that returns is exit code 0);
    turn a UserError or Ctrl-C into a one-line message and an exit code; warnings are shown as one line each.
    `after_success` runs after a clean run only: a command that may start DeepSpeed passes
    `pretrain.runtime.dist.shutdown` (every rank meets, then leaves the group), while a failed run exits at once."""
    import warnings

    warnings.formatwarning = one_line_warning
    try:
        if parse is None:
            rc = int(main(argv) or 0)
        else:
            main(parse(argv))
            rc = 0
        if rc == 0 and after_success is not None:
            after_success()
        return rc
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
