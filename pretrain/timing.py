"""Where a training run's time goes: data wait, per-rank skew, and the end-of-run summary line.

Per optimizer step every rank measures two things: the seconds it waited for its next micro-batches (the
loader's `next`), and its local time, the data wait plus the forward passes (`begin` / `forward_done` around
each micro-batch; on a GPU, whose forward runs asynchronously, through CUDA events read after the step, so
nothing waits for them). Backward and the optimizer step are left out of the local time because the gradient
all-reduce inside them makes every rank wait for the slowest, so they take the same time everywhere; the
forward pass has no collective (ZeRO-3's parameter gathers aside), so a slow rank shows there.

Design choices:
- No collective of its own: a rank's numbers ride on the sum all-reduce the loop already runs for the losses
  (`values()`: the data wait and a world-sized vector holding the local time at this rank's slot), so the
  gather costs a few floats per step and cannot fall out of step between ranks.
- Skew is judged over windows of `interval` steps (one step is noisy): `step_skew` is the slowest rank's local
  time over the median rank's, minus 1, `slowest_rank` its rank; both are logged on the window's last step.
- What a slow rank costs is the time the others wait for it, (slowest - median) local time, as a share of the
  window's wall time; data loading costs its wait share. Either above `WARN_AT` gets a one-line warning (once
  during the run, and in the summary).
"""

from __future__ import annotations

import statistics
import time

import torch

WARN_AT = 0.10


class StepTiming:
    """Per-step accounting of one rank; `record` takes the all-reduced sums and returns the metrics keys."""

    def __init__(self, rank: int, world: int, interval: int = 10, peak_tflops: float | None = None):
        self.rank, self.world, self.interval, self.peak = rank, world, max(interval, 1), peak_tflops
        self.window = [0.0] * world  # local seconds per rank in the current window
        self.window_s = self.window_steps = 0
        self.total_local = [0.0] * world
        self.seconds = self.data_s = self.tokens = self.capacity = self.flops = self.slow_cost_s = 0.0
        self.warned: set[str] = set()
        self.local_s, self.t0 = 0.0, 0.0
        self.events: list[list[torch.cuda.Event]] = []  # (start, end) per micro-batch on a GPU

    def begin(self) -> float:
        """A micro-batch starts (before the loader's `next`); returns the host clock's time."""
        self.t0 = time.perf_counter()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            start = torch.cuda.Event(enable_timing=True)
            start.record()  # the GPU is idle here (the last micro-batch's loss was read), so it waits for the data
            self.events.append([start])
        return self.t0

    def forward_done(self) -> None:
        """Its forward pass is issued: done on the host; on a GPU an end event is queued behind it."""
        if self.events and len(self.events[-1]) == 1:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events[-1].append(end)
        else:
            self.local_s += time.perf_counter() - self.t0

    def values(self, data_s: float) -> list[float]:
        """This rank's floats to append to the loop's sum all-reduce (after the step: its events are done)."""
        local, self.local_s = self.local_s, 0.0
        local += sum(start.elapsed_time(end) for start, end in self.events) / 1e3  # milliseconds
        self.events = []
        mine = [0.0] * self.world
        mine[self.rank] = local
        return [data_s, *mine]

    def record(self, reduced: list[float], seconds: float, tokens: float, capacity: float, flops: float) -> dict:
        """`reduced`: the all-reduced `values()`; the rest: this step's wall time and its rank-summed counts."""
        data_s, local = reduced[0] / self.world, reduced[1:]
        self.seconds += seconds
        self.data_s += data_s
        self.tokens, self.capacity, self.flops = self.tokens + tokens, self.capacity + capacity, self.flops + flops
        self.window = [a + b for a, b in zip(self.window, local)]
        self.total_local = [a + b for a, b in zip(self.total_local, local)]
        self.window_s += seconds
        self.window_steps += 1
        out = {"data_wait_frac": data_s / seconds if seconds > 0 else 0.0}
        if self.window_steps == self.interval:
            skew, slowest, cost = _skew(self.window, self.window_s)
            self.slow_cost_s += cost * self.window_s
            out.update(step_skew=skew, slowest_rank=slowest)
            self._warn_once("rank", cost, self._rank_warning(slowest, cost))
            self._warn_once("data", self.data_s / self.seconds, self._data_warning(self.data_s / self.seconds))
            self.window, self.window_s, self.window_steps = [0.0] * self.world, 0.0, 0
        return out

    def warnings(self) -> list[str]:
        """One line per cost above WARN_AT over the whole run so far."""
        if not self.seconds:
            return []
        _, slowest, _ = _skew(self.total_local, self.seconds)
        found = [(self.data_s / self.seconds, self._data_warning(self.data_s / self.seconds))]
        found.append((self.slow_cost_s / self.seconds, self._rank_warning(slowest, self.slow_cost_s / self.seconds)))
        return [line for share, line in found if share > WARN_AT]

    def summary(self) -> str:
        """The run's line: tokens/s, MFU (when the peak is known), data wait, padding and skew."""
        if not self.seconds:
            return "timing: no steps ran"
        skew, slowest, _ = _skew(self.total_local, self.seconds)
        mfu = f", MFU {100 * self.flops / self.seconds / 1e12 / (self.peak * self.world):.1f}%" if self.peak else ""
        padding = 1 - self.tokens / self.capacity if self.capacity else 0.0
        wait = self.data_s / self.seconds
        return (
            f"timing: {self.tokens / self.seconds:,.0f} tokens/s{mfu}, data wait {100 * wait:.1f}%"
            f", padding {100 * padding:.1f}%, step skew {100 * skew:.1f}% (slowest rank {slowest} of {self.world})"
        )

    def _warn_once(self, kind: str, share: float, line: str) -> None:
        from common.log import get_logger

        if share > WARN_AT and kind not in self.warned:
            self.warned.add(kind)
            get_logger(__name__).warning(line)

    @staticmethod
    def _data_warning(share: float) -> str:
        return (
            f"warning: waiting for data costs {100 * share:.0f}% of the step time; raise --num-workers, or check the "
            "disk holding --data"
        )

    def _rank_warning(self, slowest: int, share: float) -> str:
        return (
            f"warning: rank {slowest} is slow: the others wait for it {100 * share:.0f}% of the step time; check that "
            "rank's device and host for other load"
        )


def _skew(local: list[float], wall_s: float) -> tuple[float, int, float]:
    """(slowest / median - 1, the slowest rank, (slowest - median) / wall_s) of per-rank local times."""
    median, slowest = statistics.median(local), max(range(len(local)), key=local.__getitem__)
    if median <= 0 or wall_s <= 0:
        return 0.0, slowest, 0.0
    return local[slowest] / median - 1, slowest, (local[slowest] - median) / wall_s
