"""Our learning-rate schedules, named by the DeepSpeed JSON's `"scheduler"` (pretrain.runtime.engine builds them).

- `"WarmupPolyDecay"` (params `warmup_proportion`, `power`): linear warmup, then polynomial decay to zero at the
  last step, as in NVIDIA's BERT recipe.
- `"WarmupStableDecay"` (params `warmup_proportion`, `decay_proportion`, `decay`: linear or 1-sqrt,
  `min_lr_ratio`): linear warmup, a constant rate, then a decay over the last share of the run, ModernBERT's
  trapezoid.
Both follow the step count or a wall-clock budget (`progress`). Any other scheduler type goes to DeepSpeed
unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from common.errors import UserError
from pretrain.runtime.ds_config import known_params


class ProgressSchedule:
    """lr = peak * shape(p), p = progress in [0, 1]: step / total_steps, or the elapsed fraction of a wall-clock
    budget when `progress` is given and ahead (academic-budget-bert's time-driven schedule)."""

    PARAMS: frozenset[str] = frozenset()

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_proportion: float = 0.01,
        progress: Callable[[int], float] | None = None,
    ):
        if not 0.0 <= warmup_proportion <= 1.0:
            raise UserError(f"DeepSpeed config: warmup_proportion {warmup_proportion} must be in [0, 1]")
        self.optimizer = optimizer
        self.total_steps, self.warmup, self.progress = max(total_steps, 1), warmup_proportion, progress
        self.base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.last_step = 0

    def shape(self, p: float) -> float:
        raise NotImplementedError

    def factor(self, step: int) -> float:
        p = step / self.total_steps
        if self.progress is not None:
            p = max(p, self.progress(step))
        p = min(p, 1.0)
        return p / self.warmup if p < self.warmup else self.shape(p)

    @classmethod
    def from_config(cls, optimizer, total_steps: int, params: dict, progress=None) -> ProgressSchedule:
        """The JSON's `"scheduler": {"type": cls.__name__, "params": params}`; unknown keys are one-line errors."""
        return cls(optimizer, total_steps, progress=progress, **known_params(dict(params), cls.PARAMS, cls.__name__))

    def _apply(self) -> None:
        f = self.factor(self.last_step)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    def step(self, **_unused) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        return self.get_last_lr()

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lrs": self.base_lrs}

    def load_state_dict(self, state: dict) -> None:
        """The step count of the checkpoint; the peak rates stay this run's (the JSON's "lr"), so a relaunch
        with a lower rate after a divergence takes effect instead of the saved one."""
        self.last_step = state["last_step"]
        self._apply()


class WarmupPolyDecay(ProgressSchedule):
    """Linear warmup over `warmup_proportion` of the run, then peak * ((1 - p) / (1 - w)) ** power: zero at the end."""

    PARAMS = frozenset({"warmup_proportion", "power"})

    def __init__(self, optimizer, total_steps: int, warmup_proportion: float = 0.01, power: float = 1.0, progress=None):
        super().__init__(optimizer, total_steps, warmup_proportion, progress)
        self.power = power
        self._apply()

    def shape(self, p: float) -> float:
        return ((1.0 - p) / (1.0 - self.warmup)) ** self.power if self.warmup < 1 else 0.0


DECAYS = ("linear", "1-sqrt")


class WarmupStableDecay(ProgressSchedule):
    """Warmup-stable-decay (ModernBERT's trapezoid): linear warmup over `warmup_proportion` of the run, the peak
    rate, then over the last `decay_proportion` a decay to `min_lr_ratio` x peak at the end: `linear`, or
    `1-sqrt` (factor 1 - sqrt(q) at the decay's fraction q, as ModernBERT's final phase); no decay when 0."""

    PARAMS = frozenset({"warmup_proportion", "decay_proportion", "decay", "min_lr_ratio"})

    def __init__(
        self,
        optimizer,
        total_steps: int,
        warmup_proportion: float = 0.0,
        decay_proportion: float = 0.0,
        decay: str = "1-sqrt",
        min_lr_ratio: float = 0.0,
        progress=None,
    ):
        super().__init__(optimizer, total_steps, warmup_proportion, progress)
        if decay not in DECAYS:
            raise UserError(f"DeepSpeed config: WarmupStableDecay decay {decay!r} is unknown; use one of {DECAYS}")
        if not 0.0 <= decay_proportion <= 1.0 - warmup_proportion or not 0.0 <= min_lr_ratio <= 1.0:
            raise UserError(
                f"DeepSpeed config: WarmupStableDecay needs warmup_proportion + decay_proportion <= 1 and "
                f"min_lr_ratio in [0, 1] (got {warmup_proportion}, {decay_proportion}, {min_lr_ratio})"
            )
        self.decay_proportion, self.decay, self.min_lr_ratio = decay_proportion, decay, min_lr_ratio
        self._apply()

    def shape(self, p: float) -> float:
        into = p - (1.0 - self.decay_proportion)
        if into <= 0 or not self.decay_proportion:
            return 1.0
        q = min(into / self.decay_proportion, 1.0)
        return 1.0 - (1.0 - self.min_lr_ratio) * (q if self.decay == "linear" else q**0.5)


SCHEDULES = {cls.__name__: cls for cls in (WarmupPolyDecay, WarmupStableDecay)}
