"""The DeepSpeed JSON: read it, check its keys, and read back what Python needs from it (precision, batch).

Design choices:
- The DeepSpeed JSON is the single source of truth for batch sizes, optimizer, precision, ZeRO stage and the
  learning-rate schedule. Python reads them back from it; nothing is duplicated as a flag.
- Its keys are checked before anything computes (pretrain.runtime.ds_schema): an unknown top-level key names
  the nearest valid one, and DeepSpeed's own validation errors become one line.
- A shipped config (`ds_configs/NAME.json`) is found from any directory, a wheel install included
  (ds_configs.shipped).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import torch

import ds_configs
from common.errors import UserError
from pretrain.runtime import ds_schema
from pretrain.runtime.dist import on_gpu


def load_ds_config(spec: str | os.PathLike | dict, name: str = "the DeepSpeed config") -> dict:
    """Read a DeepSpeed JSON (a path or an already-parsed dict, called `name` in errors) and check what can be
    checked before compute."""
    if isinstance(spec, dict):
        cfg = copy.deepcopy(spec)
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


def known_params(params: dict, allowed: set[str], name: str) -> dict:
    """`params` (an optimizer's or scheduler's), or a one-line error naming the unknown ones and the allowed."""
    unknown = set(params) - allowed
    if unknown:
        raise UserError(f"DeepSpeed config: unknown {name} parameter(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return params
