"""Safe loading: no checkpoint file is unpickled with arbitrary code before it passes `torch.load(weights_only=True)`.

`torch.load(weights_only=False)` (DeepSpeed's `engine.load_checkpoint`, `zero_to_fp32`, `ds_to_universal`) runs
whatever a pickle names: a planted object's `__reduce__` executes on load. So before any of them opens a file,
`check` loads it with `weights_only=True`, memory-mapped (only the pickle is read, not the tensor data), with
`ALLOWED` as the only classes and functions beyond torch's own tensors and Python's containers; our own loads go
through `load`, which is that same safe load. A file that needs anything else is refused with one line naming
`--trust-checkpoint`, which the user who knows the file's origin passes to load it the old, unchecked way.

`ALLOWED` was found by saving real checkpoints (fp32 and bf16; ZeRO 0, 1, 2 and 3; LAMB, StableAdamW and AdamW;
their universal conversions) and listing `torch.serialization.get_unsafe_globals_in_checkpoint` of every file
(tests/test_safe_load.py repeats that for the regimes that run on CPU); DeepSpeed's fp16 loss scaler is added by
name, as fp16 does not run on CPU. None of these builds anything but data: an enum, a dataclass of two integers,
a loss-scale holder and numpy's array constructor (the RNG state of `numpy.random`).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError

TRUST_HINT = "pass --trust-checkpoint only if you know where this checkpoint comes from"


def allowed() -> list:
    """The non-torch globals our checkpoints and DeepSpeed's hold (imported lazily: deepspeed is slow to import)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    numpy = [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, *numpy]


def _safe_load(path: Path, mmap: bool, map_location="cpu"):
    with torch.serialization.safe_globals(allowed()):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


class UntrustedCheckpoint(UserError):
    """A checkpoint file that needs more than tensors, containers and `allowed()` to load."""


def check(path: str | os.PathLike) -> None:
    """Raise UntrustedCheckpoint (one line) when `path` needs more than tensors, containers and `allowed()`;
    a damaged file raises what torch raises (the caller's to report as unreadable)."""
    load(path, mmap=True)


def load(path: str | os.PathLike, trust: bool = False, map_location="cpu", mmap: bool = False):
    """torch.load of one checkpoint file, safely unless `trust`."""
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    try:
        return _safe_load(Path(path), mmap=mmap, map_location=map_location)
    except pickle.UnpicklingError as e:
        if not any(marker in str(e) for marker in _REFUSED):
            raise  # damage (random bytes make unknown opcodes), not a refused class or call
        raise UntrustedCheckpoint(f"refusing to load {path}: {_why(e)}; {TRUST_HINT}") from None


def check_all(files, trust: bool = False) -> None:
    """`check` each of `files` unless `trust` (before a loader that unpickles them unchecked opens them)."""
    if not trust:
        for f in files:
            check(f)


_REFUSED = ("Unsupported global: GLOBAL ", "Trying to call reduce for ", "Trying to call ")


def _why(e: Exception) -> str:
    """The global torch refused, from its long 'Weights only load failed' message, in a few words."""
    text, what = str(e), ""
    for marker in _REFUSED:
        if marker in text:
            what = " (" + text.split(marker, 1)[1].split(" ", 1)[0].rstrip(".,") + ")"
            break
    return "it holds pickled code or a class outside the allow-list" + what
