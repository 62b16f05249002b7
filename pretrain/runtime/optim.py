"""StableAdamW (Wortsman et al. 2023; ModernBERT's optimizer) in plain PyTorch, per tensor under ZeRO flattening.

The math is torch-optimi's `StableAdamW` (the implementation ModernBERT trained with), step t:

    b1' = b1 (1 - b1^(t-1)) / (1 - b1^t)     b2' likewise     (Adam's bias correction folded into the betas)
    m = b1' m + (1 - b1') g                  v = b2' v + (1 - b2') g^2
    rms = sqrt(mean over the tensor of g^2 / max(v, eps^2))
    lr' = lr / max(1, rms)                                    (update clipping, per tensor)
    p = p * (1 - lr' wd)   or, with `decouple_lr`, p * (1 - lr' / max_lr * wd)   (fully decoupled weight decay)
    p = p - lr' m / (sqrt(v) + eps)

With `update_clipping=False` this is AdamW (the folded bias correction is Adam's exactly), which is how a
DeepSpeed JSON's `"AdamW"` with `"decouple_lr": true` runs (pretrain.runtime.engine).

Design choice that differs from optimi: ZeRO 1/2/3 (and DeepSpeed's bf16 optimizer) hand the optimizer flat
partitions, whose mean would mix many tensors into one rms. As pretrain.runtime.lamb's LAMB, the engine declares each
partition's `FlatLayout`; the per-tensor sums of g^2 / max(v, eps^2) and element counts are then summed over the
ranks that hold pieces of a tensor, so every stage clips each tensor's update as stage 0 does. No Kahan summation:
DeepSpeed steps fp32 master weights under bf16 and fp16.
"""

from __future__ import annotations

import torch

from pretrain.runtime.pertensor import PerTensorOptimizer


class StableAdamW(PerTensorOptimizer):
    """StableAdamW with optimi's hyperparameters; per-tensor update clipping even on flat ZeRO partitions."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        update_clipping: bool = True,
    ):
        """`max_lr`: the schedule's peak rate, for `decouple_lr` (default: `lr`, the JSON's peak rate)."""
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0) or eps < 0 or lr < 0 or weight_decay < 0:
            raise ValueError(f"invalid StableAdamW hyperparameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            decouple_lr=decouple_lr,
            max_lr=lr if max_lr is None else max_lr,
        )
        super().__init__(params, defaults)
        self.update_clipping = update_clipping

    def _update(self, p: torch.Tensor, grad: torch.Tensor, t: int, m: torch.Tensor, v: torch.Tensor, group: dict):
        b1, b2 = (_debiased(beta, t) for beta in group["betas"])
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        lr = self._clipped_lr(p, grad, v, group)  # scalar or (numel,): per original tensor
        if group["weight_decay"]:
            scale = lr / group["max_lr"] if group["decouple_lr"] else lr
            p.view(-1).mul_(1 - scale * group["weight_decay"])
        p.view(-1).sub_(lr * (m / v.sqrt().add_(group["eps"])).view(-1))

    def _clipped_lr(self, p: torch.Tensor, grad: torch.Tensor, v: torch.Tensor, group: dict) -> torch.Tensor | float:
        """lr / max(1, rms) of each original tensor: a float for a whole tensor, (numel,) on a flat partition."""
        if not self.update_clipping:
            return group["lr"]
        ratio = grad.float().square() / v.float().clamp(min=group["eps"] ** 2)
        layout = self._layout(p)
        if layout is None:
            return group["lr"] / max(1.0, ratio.mean().sqrt().item())
        total, count = layout.tensor_sums([ratio, torch.ones_like(ratio)])
        rms = (total / count.clamp(min=1)).sqrt()  # padding: 0, so its rate is lr (its update is 0 anyway)
        return layout.spread(group["lr"] / rms.clamp(min=1.0)).to(p.dtype)


def _debiased(beta: float, step: int) -> float:
    """Adam's bias correction folded into the decay rate: the EMA with it is the bias-corrected EMA (optimi's)."""
    return (beta**step - beta) / (beta**step - 1)
