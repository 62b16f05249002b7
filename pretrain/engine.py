"""The one module that imports DeepSpeed: config loading, optimizer choice, learning-rate schedule, initialize.

Design choices:
- The DeepSpeed JSON is the single source of truth for batch sizes, optimizer, precision, ZeRO stage and the
  learning-rate schedule. Python reads them back from it; nothing is duplicated as a flag.
- Optimizer: `"type": "Lamb"` runs DeepSpeed's fused CUDA LAMB only where it sees whole tensors (CUDA, ZeRO
  stage 0, no bf16 flattening); everywhere else (CPU, ZeRO 1/2/3, bf16) it runs `pretrain.lamb.Lamb` with the
  same hyperparameters, and `_attach_layouts` tells it which slice of each flat partition belongs to
  which parameter, so trust ratios stay per tensor under every ZeRO stage. `"type": "StableAdamW"` (ModernBERT's
  optimizer, torch-optimi's math) is always `pretrain.optim.StableAdamW`, per tensor under every stage the same
  way. Adam/AdamW: DeepSpeed's on CUDA, torch's on CPU, both with decoupled weight decay scaled by the learning
  rate (p -= lr * wd * p); `"decouple_lr": true` in AdamW's params gives fully decoupled weight decay (p -=
  lr / max_lr * wd * p, optimi's `decouple_lr`), run by our StableAdamW without its update clipping.
- Schedules (ours): `"WarmupPolyDecay"` (params `warmup_proportion`, `power`: linear warmup, then polynomial
  decay to zero at the last step, as in NVIDIA's BERT recipe) and `"WarmupStableDecay"` (params
  `warmup_proportion`, `decay_proportion`, `decay`: linear or 1-sqrt, `min_lr_ratio`: linear warmup, a constant
  rate, then a decay over the last share of the run, ModernBERT's trapezoid). Both follow the step count or a
  wall-clock budget (`progress`). Any other scheduler type goes to DeepSpeed unchanged.

DeepSpeed internals relied on here, each behind a function that says what it does and guarded by a test that
fails when an upgrade changes it (tests/test_engine.py unless named):
- ZeRO/bf16/fp16 optimizer wrappers' flat groups and partitions (`_attach_layouts`): LAMB and StableAdamW at
  every stage make stage 0's updates;
- the wrappers' `_global_grad_norm` (`step`): every stage reports torch's gradient norm;
- ZeRO-3's `_zero3_consolidated_16bit_state_dict` (`full_state_dict`): the whole model at every stage;
- the CPU comm op's shared-memory name (`shm_buffer_name`): the buffer exists under it during a run;
- checkpoint files and their fp32 groups (pretrain.checkpoint.master_weights): the optimizer's own masters;
- `launch.py`'s exit lines and DS_ENV_FILE (pretrain.launcher): tests/test_launch_ssh.py.
"""

from __future__ import annotations

import copy
import datetime
import faulthandler
import functools
import json
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import ds_configs
from common.errors import UserError
from common.log import get_logger
from pretrain import dist, ds_schema
from pretrain.lamb import FlatLayout, Lamb, PerTensorOptimizer
from pretrain.optim import StableAdamW

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402  (DS_ACCELERATOR must be set first)
import deepspeed.comm as ds_dist  # noqa: E402

log = get_logger(__name__)

LAMB_KEYS = {"lr", "betas", "eps", "weight_decay", "bias_correction", "eps_inside_sqrt", "max_coeff", "min_coeff"}
ADAMW_KEYS = {"lr", "betas", "eps", "weight_decay", "max_lr"}  # AdamW with "decouple_lr": true
STABLE_ADAMW_KEYS = ADAMW_KEYS | {"decouple_lr"}


def on_gpu() -> bool:
    return torch.cuda.is_available()


def load_ds_config(spec: str | os.PathLike | dict) -> dict:
    """Read a DeepSpeed JSON (a path or an already-parsed dict) and check what can be checked before compute."""
    if isinstance(spec, dict):
        cfg = copy.deepcopy(spec)
        name = "the DeepSpeed config"
    else:
        path = ds_configs.shipped(spec) or Path(spec)  # `ds_configs/demo.json` works from any directory
        name = str(spec)
        if not path.is_file():
            raise UserError(f"{path} does not exist; pass --deepspeed_config with a file from ds_configs/")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}); fix the file or pick one from ds_configs/") from None
    check_deepspeed_keys(cfg, name)
    if cfg.get("fp16", {}).get("enabled") and not on_gpu():
        raise UserError(f"{name} enables fp16, which needs a GPU; use bf16 or fp32 on CPU (ds_configs/cpu_small.json)")
    if cfg.get("bf16", {}).get("enabled") and cfg.get("fp16", {}).get("enabled"):
        raise UserError(f"{name} enables both fp16 and bf16; enable at most one")
    return cfg


# keys DeepSpeed reads outside DeepSpeedConfig._initialize_params (deepspeed.initialize, DeepSpeedConfig.__init__)
_OTHER_TOP_LEVEL_KEYS = frozenset({"sequence_parallel_size", "data_parallel_size"})


@functools.cache
def deepspeed_top_level_keys() -> frozenset[str]:
    """Every top-level key DeepSpeed's config parser looks up, recorded by running it on a dict that notes each
    lookup (DeepSpeedConfig._initialize_params, a DeepSpeed internal: tests/test_ds_schema.py fails if it stops
    reading the keys of ds_configs/)."""
    from collections.abc import KeysView

    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Recording(dict):
        def __getitem__(self, k):
            seen.add(k)
            return super().__getitem__(k)

        def get(self, k, default=None):
            seen.add(k)
            return super().get(k, default)

        def __contains__(self, k):
            seen.add(k)
            return super().__contains__(k)

        def keys(self):
            return RecordingKeys(self)

    class RecordingKeys(KeysView):
        def __contains__(self, k):
            seen.add(k)
            return k in self._mapping

    parser = DeepSpeedConfig.__new__(DeepSpeedConfig)
    parser.world_size, parser.global_rank = 1, 0
    parser._initialize_params(Recording(train_batch_size=1))
    return frozenset(seen) | _OTHER_TOP_LEVEL_KEYS


def check_deepspeed_keys(cfg: dict, name: str) -> None:
    """Refuse what DeepSpeed would ignore (an unknown top-level key) or raise as a traceback (a bad nested field),
    in one line; parses a copy with DeepSpeed's own section models, without a process group."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError, _reject_removed_config_keys
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    try:
        _reject_removed_config_keys(cfg)  # a key DeepSpeed removed: its own message says what replaces it
    except DeepSpeedConfigError as e:
        raise UserError(f"{name}: {str(e).splitlines()[0]}") from None
    ds_schema.check_top_level(cfg, deepspeed_top_level_keys(), name)
    parser = DeepSpeedConfig.__new__(DeepSpeedConfig)
    parser.world_size, parser.global_rank = 1, 0
    try:
        parser._initialize_params(copy.deepcopy(cfg))
    except pydantic.ValidationError as e:
        models = [c for c in _subclasses(DeepSpeedConfigModel) if c.__name__ == e.title]
        fields = [n for c in models for f_name, f in c.model_fields.items() for n in (f_name, f.alias) if n]
        raise UserError(ds_schema.one_line(e, cfg, name, fields)) from None
    except (DeepSpeedConfigError, ValueError, TypeError, KeyError) as e:
        raise UserError(
            f"{name}: DeepSpeed refuses it: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def compute_dtype(cfg: dict) -> torch.dtype:
    """The dtype the model computes in under this DeepSpeed config (bf16, fp16 or fp32)."""
    if cfg.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if cfg.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def resolve_batch(cfg: dict, world_size: int) -> tuple[int, int, int]:
    """(train_batch_size, micro_batch_per_gpu, grad_accum) from the JSON, checked the way DeepSpeed checks them."""
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    tbs, mb, ga = (cfg.get(k) for k in keys)
    if tbs is None and mb is not None:
        ga = ga or 1
        tbs = mb * ga * world_size
    elif tbs is not None and (mb is None) != (ga is None):  # the missing one is train_batch_size / the rest
        name, given = (keys[1], mb) if ga is None else (keys[2], ga)
        if given >= 1 and tbs % (given * world_size):
            raise UserError(
                f"DeepSpeed config: train_batch_size {tbs} is not divisible by {name} {given} x {world_size} "
                f"processes; change train_batch_size or {name}"
            )
        missing = tbs // (given * world_size) if given >= 1 else 0
        mb, ga = (mb, missing) if ga is None else (missing, ga)
    if tbs is None or mb is None or ga is None:
        raise UserError(ds_schema.missing_batch_message("DeepSpeed config"))
    if tbs != mb * ga * world_size or min(tbs, mb, ga) < 1:
        raise UserError(
            f"DeepSpeed config: train_batch_size {tbs} != micro batch {mb} x accumulation {ga} x {world_size} "
            "processes; fix the three batch settings so they agree"
        )
    return tbs, mb, ga


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
    where it does not, `pretrain.lamb.Lamb` runs the same update instead, with a warning that says why."""
    try:
        from deepspeed.ops.op_builder import FusedLambBuilder

        FusedLambBuilder().load(verbose=False)
        return True
    except Exception as e:  # a failed JIT build raises anything from RuntimeError to ImportError
        warnings.warn(
            f"DeepSpeed's fused LAMB did not load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "using pretrain.lamb.Lamb, the same update in plain PyTorch",
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
        opt = Lamb(groups, **_known(params, LAMB_KEYS, "LAMB"))
    elif kind == "stableadamw":
        opt = StableAdamW(groups, **_known(params, STABLE_ADAMW_KEYS, "StableAdamW"))
    elif kind in ("adam", "adamw"):
        adam_w = params.pop("adam_w_mode", kind == "adamw")
        if params.pop("decouple_lr", False):
            if not adam_w:
                raise UserError('DeepSpeed config: "decouple_lr" is a weight decay of AdamW; use "type": "AdamW"')
            params.pop("torch_adam", None)
            opt = StableAdamW(groups, decouple_lr=True, update_clipping=False, **_known(params, ADAMW_KEYS, "AdamW"))
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


def _known(params: dict, allowed: set[str], name: str) -> dict:
    unknown = set(params) - allowed
    if unknown:
        raise UserError(f"DeepSpeed config: unknown {name} parameter(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return params


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
        return cls(optimizer, total_steps, progress=progress, **_known(dict(params), cls.PARAMS, cls.__name__))

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


def _ensure_dist_env() -> None:
    """A plain `python -m pretrain.train` (no launcher) is a world of one: give DeepSpeed what a launcher would."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


SHUTDOWN_TIMEOUT_S = 120.0


def shutdown(timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Leave the process group cleanly once a run succeeded: every rank meets, then tears the group down.

    A rank that exits with the group alive can abort in the backend's destructor ("terminate called without
    an active exception") while a peer is still talking to it, turning a finished run into a failed launch.
    A peer that never arrives (it died after the last step) must not keep this rank alive: after `timeout_s`
    the process dumps every thread's stack and exits with code 1 (faulthandler's watchdog thread, which fires
    even while this thread waits inside the backend).
    """
    if not ds_dist.is_initialized():
        return
    faulthandler.dump_traceback_later(timeout_s, exit=True)
    try:
        dist.barrier()
        if not on_gpu():
            _unlink_shm_buffer(ds_dist.get_rank())
        ds_dist.destroy_process_group()
    finally:
        faulthandler.cancel_dump_traceback_later()


def shm_buffer_name(rank: int) -> str:
    """The `/dev/shm` name of the 69 MB buffer DeepSpeed's CPU comm op makes for each rank (as in its shm.cpp)."""
    env = os.environ
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"


def _unlink_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU comm op never removes its buffer; after the barrier every peer has mapped it, so the name
    can go and the memory with it."""
    Path("/dev/shm", shm_buffer_name(rank)).unlink(missing_ok=True)


def share_cpu_cores() -> None:
    """Several CPU ranks on one machine: each gets its share of the cores, unless `OMP_NUM_THREADS` is set.

    torch gives every process a thread per core, so N ranks on C cores would run N x C threads that wait on
    one another at every op: two ranks on two cores fine-tuned 4.6x slower so (docs/PERFORMANCE.md).
    The rank count comes from the `deepspeed` launcher (`LOCAL_SIZE`) or torchrun (`LOCAL_WORLD_SIZE`).
    """
    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if on_gpu() or local < 2 or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // local)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        if os.environ.get("LOCAL_RANK", "0") == "0":
            log.info(f"{local} CPU ranks on {cores} cores: {threads} torch thread(s) each (OMP_NUM_THREADS overrides)")


DIST_TIMEOUT_MIN = 10.0


def init_distributed(timeout_min: float = DIST_TIMEOUT_MIN) -> None:
    """Join the process group (a world of one without a launcher). `timeout_min`: how long a collective waits
    for a missing peer before it fails (the process-group timeout)."""
    if "LOCAL_RANK" in os.environ:  # started by a launcher (deepspeed, torchrun): end with it
        dist.die_with_parent()
        dist.die_with_launch()
    _ensure_dist_env()
    share_cpu_cores()
    if not ds_dist.is_initialized():
        backend = "gloo" if not on_gpu() else "nccl"
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_min))


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
        raise RuntimeError(f"{type(zopt).__name__} flattened the parameters in a way pretrain.engine cannot map")
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
