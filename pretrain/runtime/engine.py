"""The one module that imports DeepSpeed at the top: optimizer choice, initialize, step, the whole state dict.

The DeepSpeed JSON (pretrain.runtime.ds_config) says what to build; the schedules are pretrain.runtime.schedules,
the process group's lifetime pretrain.runtime.dist.

Design choices:
- Optimizer: `"type": "Lamb"` runs DeepSpeed's fused CUDA LAMB only where it sees whole tensors (CUDA, ZeRO
  stage 0, no bf16 flattening); everywhere else (CPU, ZeRO 1/2/3, bf16) it runs `pretrain.runtime.lamb.Lamb` with the
  same hyperparameters, and `_attach_layouts` tells it which slice of each flat partition belongs to
  which parameter, so trust ratios stay per tensor under every ZeRO stage. `"type": "StableAdamW"` (ModernBERT's
  optimizer, torch-optimi's math) is always `pretrain.runtime.optim.StableAdamW`, per tensor under every stage the same
  way. Adam/AdamW: DeepSpeed's on CUDA, torch's on CPU, both with decoupled weight decay scaled by the learning
  rate (p -= lr * wd * p); `"decouple_lr": true` in AdamW's params gives fully decoupled weight decay (p -=
  lr / max_lr * wd * p, optimi's `decouple_lr`), run by our StableAdamW without its update clipping.

DeepSpeed internals relied on here, each behind a function that says what it does and guarded by a test that
fails when an upgrade changes it (tests/test_engine.py unless named):
- ZeRO/bf16/fp16 optimizer wrappers' flat groups and partitions (`_attach_layouts`): LAMB and StableAdamW at
  every stage make stage 0's updates;
- the wrappers' `_global_grad_norm` (`step`): every stage reports torch's gradient norm;
- ZeRO-3's `_zero3_consolidated_16bit_state_dict` (`full_state_dict`): the whole model at every stage;
- the CPU comm op's shared-memory name (pretrain.runtime.dist.shm_buffer_name): the buffer exists under it during a run;
- checkpoint files and their fp32 groups (pretrain.runtime.weights.master_weights): the optimizer's own masters;
- `launch.py`'s exit lines and DS_ENV_FILE (pretrain.launcher): tests/test_launch_ssh.py.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

from common.errors import UserError
from common.log import get_logger
from pretrain.runtime.dist import init_distributed, on_gpu
from pretrain.runtime.ds_config import known_params, load_ds_config, resolve_batch
from pretrain.runtime.lamb import Lamb
from pretrain.runtime.optim import StableAdamW
from pretrain.runtime.pertensor import FlatLayout, PerTensorOptimizer
from pretrain.runtime.schedules import SCHEDULES

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402  (DS_ACCELERATOR must be set first)
import deepspeed.comm as ds_dist  # noqa: E402

log = get_logger(__name__)

LAMB_KEYS = {"lr", "betas", "eps", "weight_decay", "bias_correction", "eps_inside_sqrt", "max_coeff", "min_coeff"}
ADAMW_KEYS = {"lr", "betas", "eps", "weight_decay", "max_lr"}  # AdamW with "decouple_lr": true
STABLE_ADAMW_KEYS = ADAMW_KEYS | {"decouple_lr"}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay, biases and LayerNorm weights (every tensor below 2-D) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _uses_fused_lamb(cfg: dict) -> bool:
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    return on_gpu() and stage == 0 and not cfg.get("bf16", {}).get("enabled") and fused_lamb_loads()


@functools.cache
def fused_lamb_loads() -> bool:
    """Whether DeepSpeed's fused LAMB kernel loads (it is built just in time, which needs nvcc and ninja);
    where it does not, `pretrain.runtime.lamb.Lamb` runs the same update instead, with a warning that says why."""
    try:
        from deepspeed.ops.op_builder import FusedLambBuilder

        FusedLambBuilder().load(verbose=False)
        return True
    except Exception as e:  # a failed JIT build raises anything from RuntimeError to ImportError
        warnings.warn(
            f"DeepSpeed's fused LAMB did not load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "using pretrain.runtime.lamb.Lamb, the same update in plain PyTorch",
            stacklevel=2,
        )
        return False


def build_optimizer(model: torch.nn.Module, cfg: dict) -> tuple[torch.optim.Optimizer | None, list[dict]]:
    """Our optimizer where DeepSpeed's cannot serve (it is then removed from `cfg`), and the param groups."""
    opt_cfg = cfg.get("optimizer")
    if opt_cfg is None:
        raise UserError('DeepSpeed config has no "optimizer" section; add one (see ds_configs/cpu_small.json)')
    kind, params = opt_cfg.get("type", "").lower(), dict(opt_cfg.get("params", {}))
    groups = param_groups(model, params.get("weight_decay", 0.0))
    if kind == "lamb":
        if _uses_fused_lamb(cfg):
            return None, groups
        if params.pop("max_grad_norm", 0.0):
            raise UserError("DeepSpeed config: LAMB max_grad_norm is not supported; use top-level gradient_clipping")
        opt = Lamb(groups, **known_params(params, LAMB_KEYS, "LAMB"))
    elif kind == "stableadamw":
        opt = StableAdamW(groups, **known_params(params, STABLE_ADAMW_KEYS, "StableAdamW"))
    elif kind in ("adam", "adamw"):
        adam_w = params.pop("adam_w_mode", kind == "adamw")
        if params.pop("decouple_lr", False):
            if not adam_w:
                raise UserError('DeepSpeed config: "decouple_lr" is a weight decay of AdamW; use "type": "AdamW"')
            params.pop("torch_adam", None)
            opt = StableAdamW(
                groups, decouple_lr=True, update_clipping=False, **known_params(params, ADAMW_KEYS, "AdamW")
            )
        elif on_gpu():
            return None, groups
        else:
            params.pop("torch_adam", None)
            opt = (torch.optim.AdamW if adam_w else torch.optim.Adam)(groups, **params)
    else:
        raise UserError(
            f"DeepSpeed config: optimizer type {opt_cfg.get('type')!r} is not supported; "
            "use Lamb, StableAdamW, Adam or AdamW"
        )
    del cfg["optimizer"]
    cfg["zero_allow_untested_optimizer"] = True
    return opt, groups


def initialize(
    model: torch.nn.Module,
    ds_config: str | os.PathLike | dict,
    total_steps: int | None = None,
    progress: Callable[[int], float] | None = None,
):
    """Wrap `model` in a DeepSpeed engine with the optimizer and schedule the JSON asks for.

    `total_steps` is needed by our schedules (SCHEDULES: the run ends there); `progress` optionally drives them
    by wall-clock time. Returns the engine; `engine.optimizer`, `engine.lr_scheduler` as usual.
    """
    cfg = load_ds_config(ds_config)
    if cfg.get("zero_optimization", {}).get("stage") == 3 and hasattr(model, "set_weights_partitioned"):
        model.set_weights_partitioned(True)  # ZeRO-3 gathers a module's weights only while it is called
    init_distributed()
    resolve_batch(cfg, ds_dist.get_world_size())
    optimizer, groups = build_optimizer(model, cfg)
    sched_cfg = cfg.get("scheduler")
    scheduler = None
    if sched_cfg and sched_cfg.get("type") in SCHEDULES:
        del cfg["scheduler"]
        if total_steps is None:
            raise ValueError(f"the {sched_cfg['type']} schedule needs total_steps")

        def scheduler(opt):
            return SCHEDULES[sched_cfg["type"]].from_config(opt, total_steps, sched_cfg.get("params", {}), progress)

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=groups,
        lr_scheduler=scheduler,
        config=cfg,
        dist_init_required=False,
    )
    ours = engine.basic_optimizer
    if isinstance(ours, PerTensorOptimizer):
        _attach_layouts(engine, ours, {id(p): i for i, p in enumerate(model.parameters())})
    return engine


def step(engine) -> float | None:
    """`engine.step()` after a micro-batch's backward; at the accumulation boundary it returns the global gradient
    norm before clipping: DeepSpeed's own where its optimizer wrapper computes one (ZeRO, fp16, bf16), else the
    norm of the whole, already averaged gradients, taken here first (stage 0 in fp32). None between boundaries."""
    if not engine.is_gradient_accumulation_boundary():
        engine.step()
        return None
    norm = None
    if not hasattr(engine.optimizer, "_global_grad_norm"):
        grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
        norm = (
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            if grads
            else None
        )
    engine.step()
    if norm is None and engine.get_global_grad_norm() is not None:
        norm = float(engine.get_global_grad_norm())
    return norm


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The model's whole state dict, whatever the ZeRO stage. Collective under ZeRO-3 (every rank calls it;
    rank 0 gets the gathered weights, in the training precision, the others None); elsewhere each rank's own."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def _pieces_to_layout(pieces: list[tuple[int, int, int]], numel: int, num_tensors: int, group) -> FlatLayout:
    """Sorted (offset, length, tensor id) pieces of a flat tensor -> a layout with the gaps marked as padding."""
    ids, lengths, pos = [], [], 0
    for off, length, tid in sorted(pieces):
        if off > pos:
            ids.append(num_tensors)
            lengths.append(off - pos)
        ids.append(tid)
        lengths.append(length)
        pos = off + length
    if pos < numel:
        ids.append(num_tensors)
        lengths.append(numel - pos)
    return FlatLayout(torch.tensor(ids), torch.tensor(lengths), num_tensors, group)


def _attach_layouts(engine, lamb: PerTensorOptimizer, tensor_id: dict[int, int]) -> None:
    """Map every flat partition our optimizer (LAMB, StableAdamW) will step back to the parameter tensors it is
    made of."""
    zopt, n = engine.optimizer, len(tensor_id)
    if hasattr(zopt, "fp32_partitioned_groups_flat"):  # ZeRO-3: each parameter is split evenly over ranks
        for i, params in enumerate(zopt.fp16_groups):
            group = zopt.sub_group_process_groups[i]
            rank = ds_dist.get_rank(group=group)
            pieces, off = [], 0
            for p in params:
                part = p.partition_numel()
                valid = max(0, min(part, p.ds_numel - rank * part))
                if valid:
                    pieces.append((off, valid, tensor_id[id(p)]))
                off += part
            flat = zopt.fp32_partitioned_groups_flat[i]
            lamb.set_layout(flat, _pieces_to_layout(pieces, flat.numel(), n, group))
        return
    if hasattr(zopt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        lp_groups, lp_flats, hp_flats = zopt.bit16_groups, zopt.bit16_groups_flat, zopt.single_partition_of_fp32_groups
    elif hasattr(zopt, "fp32_groups_flat_partition"):  # DeepSpeed's bf16 optimizer (ZeRO-1 style)
        lp_groups, lp_flats, hp_flats = zopt.bf16_groups, zopt.bf16_groups_flat, zopt.fp32_groups_flat_partition
    elif zopt is lamb or getattr(zopt, "optimizer", None) is lamb:
        if all(id(p) in tensor_id for g in lamb.param_groups for p in g["params"]):
            return  # whole tensors: nothing flattened
        lp, hp = getattr(zopt, "fp16_groups", None), getattr(zopt, "fp32_groups", None)
        if lp and hp and all(a.shape == b.shape for x, y in zip(lp, hp) for a, b in zip(x, y)):
            return  # FP16_UnfusedOptimizer (fp16/bf16 at stage 0): one fp32 copy per tensor
        raise RuntimeError(
            f"{type(zopt).__name__} flattened the parameters in a way pretrain.runtime.engine cannot map"
        )
    else:
        raise RuntimeError(f"unsupported DeepSpeed optimizer wrapper {type(zopt).__name__} for per-tensor updates")
    for i, (params, flat, hp) in enumerate(zip(lp_groups, lp_flats, hp_flats)):
        group = zopt.real_dp_process_group[i]
        world, rank = ds_dist.get_world_size(group=group), ds_dist.get_rank(group=group)
        size = flat.numel() // world
        start, pieces = rank * size, []
        for p in params:
            off = (p.data_ptr() - flat.data_ptr()) // p.element_size()
            lo, hi = max(off, start), min(off + p.numel(), start + size)
            if hi > lo:
                pieces.append((lo - start, hi - lo, tensor_id[id(p)]))
        lamb.set_layout(hp, _pieces_to_layout(pieces, hp.numel(), n, group))
