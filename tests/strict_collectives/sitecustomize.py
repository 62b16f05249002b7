"""Loaded by every Python process of a test launch (tests/fixtures_train.run_env puts this directory on
PYTHONPATH): each torch.distributed collective must get tensors on the accelerator's current device.

That is what NCCL demands (a CPU tensor in an NCCL group fails with "No backend type associated with device
type cpu"); gloo on CPU would accept anything, so without this check a CPU run could not see the mistake.
torch.distributed is patched when it is first imported, so processes that never use it pay nothing.
"""

import importlib.abc
import importlib.machinery
import os
import sys

COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all_single",
)


def _tensors(args, kwargs):
    for value in (*args, *kwargs.values()):
        if hasattr(value, "device") and hasattr(value, "dtype"):
            yield value
        elif isinstance(value, list | tuple):
            yield from (v for v in value if hasattr(v, "device"))


def _checked(name, fn):
    def collective(*args, **kwargs):
        import torch
        from deepspeed.accelerator import get_accelerator

        want = torch.device(get_accelerator().current_device_name())
        for t in _tensors(args, kwargs):
            if t.device.type != want.type or (want.index is not None and t.device.index != want.index):
                raise AssertionError(f"torch.distributed.{name} got a tensor on {t.device}; the accelerator is {want}")
        log = os.environ.get("BERT_COLLECTIVES_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {name}\n")
        return fn(*args, **kwargs)

    collective.__wrapped__ = fn
    return collective


def _patch(module) -> None:
    import torch.distributed.distributed_c10d as c10d

    for name in COLLECTIVES:
        original = getattr(c10d, name)
        checked = _checked(name, original)
        setattr(c10d, name, checked)
        if getattr(module, name, None) is original:
            setattr(module, name, checked)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch.distributed":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchOnImport())
