"""LAMB (You et al. 2019) in plain PyTorch, with per-tensor trust ratios that survive ZeRO flattening.

The math is DeepSpeed's fused LAMB (`deepspeed/ops/csrc/lamb/fused_lamb_cuda_kernel.cu`), so a run can move
between the CUDA kernel and this optimizer without changing its hyperparameters:

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    u = m / (sqrt(v) + eps) + wd p    (eps inside the sqrt with `eps_inside_sqrt`)
    r = clamp(|p| / |u|, min_coeff, max_coeff), or 1 when either norm is 0
    p = p - lr * sqrt(1 - b2^t) / (1 - b1^t) * r * u      (bias correction folded into the step size)

Design choice that differs from the textbook: ZeRO 1/2/3 (and DeepSpeed's bf16 optimizer) replace each param
group by one flat fp32 partition per rank, so an optimizer that takes norms over the tensor it is given
computes ONE trust ratio for many layers (DeepSpeed issues #88, #490). `set_layout` tells this optimizer which
slices of a flat partition belong to which original tensor; `step` then sums squared norms per original
tensor, all-reduces the partial sums across the ranks that share a split tensor, and applies each tensor's
own ratio. `FlatLayout` and `PerTensorOptimizer` are that machinery, shared with pretrain.runtime.optim.StableAdamW
(whose update clipping is per tensor too). Weight decay exclusions (biases, LayerNorm) are param groups with
`weight_decay=0`, built in `pretrain.runtime.engine.param_groups`.
"""

from __future__ import annotations

import torch

from pretrain.runtime.pertensor import PerTensorOptimizer


class Lamb(PerTensorOptimizer):
    """LAMB with DeepSpeed FusedLamb's hyperparameters; per-tensor trust ratios even on flat ZeRO partitions."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        eps_inside_sqrt: bool = False,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            max_coeff=max_coeff,
            min_coeff=min_coeff,
        )
        super().__init__(params, defaults)
        self.eps_inside_sqrt = eps_inside_sqrt

    def _update(self, p: torch.Tensor, grad: torch.Tensor, t: int, m: torch.Tensor, v: torch.Tensor, group: dict):
        b1, b2 = group["betas"]
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v + group["eps"]).sqrt_() if self.eps_inside_sqrt else v.sqrt().add_(group["eps"])
        update = (m / denom).add_(p, alpha=group["weight_decay"])

        ratio = self._trust_ratios(p, update, group)  # (numel,) or scalar
        step_size = group["lr"]
        if group["bias_correction"]:
            step_size *= (1 - b2**t) ** 0.5 / (1 - b1**t)
        p.view(-1).addcmul_(ratio, update.view(-1), value=-step_size)

    def _trust_ratios(self, p: torch.Tensor, update: torch.Tensor, group: dict) -> torch.Tensor:
        """Per-element trust ratio: each element gets the ratio of the original tensor it belongs to
        (a 0-d tensor when `p` is a whole tensor)."""
        layout = self._layout(p)
        if layout is None:
            w_norm, u_norm = p.detach().float().norm(), update.float().norm()
            ratio = (w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"])
            return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio)).to(p.dtype)
        flat_p, flat_u = p.detach().float(), update.float()
        w_norm, u_norm = layout.tensor_sums([flat_p * flat_p, flat_u * flat_u]).sqrt()  # per original tensor
        ratio = (w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"])
        ratio = torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
        ratio[layout.num_tensors] = 1.0  # padding
        return layout.spread(ratio).to(p.dtype)
