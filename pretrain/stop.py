"""`StopFlag`: SIGTERM/SIGINT turned into a stop every rank agrees on, at the same micro-batch.

The flag is read before every micro-batch through one all-reduce (`agreed`), so all ranks stop at the same
step boundary, save and exit 0; a rank that took a stop ignores further SIGTERMs while it exits.
"""

from __future__ import annotations

import signal

from pretrain.runtime import dist


class StopFlag:
    """Set by SIGTERM/SIGINT; read before every micro-batch (all ranks agree through an all-reduce)."""

    def __init__(self):
        self.signal: int | None = None
        self.stopping = False  # the ranks agreed to stop for a signal (this rank's, or a peer's)
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the signals back; a run that stopped for a signal goes on ignoring SIGTERM while it exits: the
        checkpoint is written by now, a supervisor may repeat the request, and a rank that stopped because a
        peer was signalled may get its own SIGTERM only now (the launcher's on another node came late), which
        must not kill it in the exit's last collective."""
        for sig, handler in self._previous.items():
            stopping = (self.stopping or self.signal is not None) and sig == signal.SIGTERM
            signal.signal(sig, signal.SIG_IGN if stopping else handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signal = signum

    def agreed(self) -> bool:
        """Whether any rank was signalled (a collective: every rank calls it at the same point)."""
        return self.note(dist.all_reduce([float(self.signal is not None)], op="max")[0])

    def note(self, signalled_anywhere: float) -> bool:
        """Record the ranks' agreement (an all-reduced max of `signal is not None`) and return it."""
        self.stopping = self.stopping or bool(signalled_anywhere)
        return self.stopping
