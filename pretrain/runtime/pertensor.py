"""Per-tensor optimizer math on ZeRO's flat partitions: what LAMB and StableAdamW share.

ZeRO 1/2/3 (and DeepSpeed's bf16 optimizer) replace each param group by one flat fp32 partition per rank, so
an optimizer that takes norms over the tensor it is given mixes many layers into one (DeepSpeed issues #88,
#490). `FlatLayout` says which slices of a flat partition belong to which original tensor (the engine declares
it: pretrain.runtime.engine); `PerTensorOptimizer` sums per original tensor and all-reduces the partial sums
across the ranks that share a split tensor. pretrain.runtime.lamb (trust ratios) and pretrain.runtime.optim
(update clipping) build on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.runtime import dist


@dataclass
class FlatLayout:
    """How a flat tensor splits into pieces of original tensors.

    `lengths[k]` consecutive elements belong to original tensor `tensor_ids[k]`; the pieces cover the flat
    tensor in order. Padding belongs to the id `num_tensors` (ratio 1, and it is zero anyway). Squared norms
    are summed over `group` (the data-parallel group) when the pieces of one tensor live on several ranks.
    """

    tensor_ids: torch.Tensor  # (K,) long
    lengths: torch.Tensor  # (K,) long, sums to the flat tensor's numel
    num_tensors: int
    group: object | None = None

    def tensor_sums(self, values: list[torch.Tensor]) -> torch.Tensor:
        """(len(values), num_tensors + 1) float32: each flat tensor of `values` summed over each original tensor's
        elements, on every rank that holds a piece of it (the last column: padding)."""
        device = values[0].device
        tids, lengths = self.tensor_ids.to(device), self.lengths.to(device)
        pieces = torch.stack([torch.segment_reduce(v.view(-1).float(), "sum", lengths=lengths) for v in values])
        sums = torch.zeros(len(values), self.num_tensors + 1, dtype=torch.float32, device=device)
        sums.index_add_(1, tids, pieces)
        if self.group is not None:
            dist.all_reduce_tensor(sums, group=self.group)
        return sums

    def spread(self, per_tensor: torch.Tensor) -> torch.Tensor:
        """(num_tensors + 1,) values -> (numel,): each element gets the value of the original tensor it belongs to."""
        tids, lengths = self.tensor_ids.to(per_tensor.device), self.lengths.to(per_tensor.device)
        return torch.repeat_interleave(per_tensor[tids], lengths)


class PerTensorOptimizer(torch.optim.Optimizer):
    """An optimizer whose update uses per-tensor statistics, kept per tensor on flat ZeRO partitions: the engine
    declares each flat tensor's `FlatLayout` (`set_layout`), `_layout(p)` returns it (None: a whole tensor)."""

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        self._layouts: dict[int, tuple[torch.Tensor, FlatLayout]] = {}

    def set_layout(self, flat: torch.Tensor, layout: FlatLayout) -> None:
        """Declare that `flat` (a tensor this optimizer will step) is a concatenation of pieces of tensors."""
        if int(layout.lengths.sum()) != flat.numel():
            raise ValueError(f"layout covers {int(layout.lengths.sum())} elements, flat tensor has {flat.numel()}")
        self._layouts[id(flat)] = (flat, layout)

    def _layout(self, p: torch.Tensor) -> FlatLayout | None:
        held = self._layouts.get(id(p))
        return held[1] if held is not None and held[0] is p else None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad.to(p.dtype), *self._moments(p), group)
        return loss

    def _moments(self, p: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Adam's state of `p` with its step count advanced: (step, exp_avg, exp_avg_sq), zeros at first."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        return state["step"], state["exp_avg"], state["exp_avg_sq"]

    def _update(self, p: torch.Tensor, grad: torch.Tensor, t: int, m: torch.Tensor, v: torch.Tensor, group: dict):
        """Step `p` in place with its gradient (in `p`'s dtype), step count `t` and moments `m`, `v`."""
        raise NotImplementedError
