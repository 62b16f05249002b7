"""The accelerator choice of tests/conftest.py, with CUDA present or not (faked: this suite runs on CPU)."""

import os
import types

import conftest
import pytest
import torch


class _Config:
    def __init__(self, markexpr: str):
        self.markexpr = markexpr

    def getoption(self, name: str):
        assert name == "markexpr"
        return self.markexpr


def _item(*marks: str):
    item = types.SimpleNamespace(keywords=set(marks), markers=[])
    item.add_marker = item.markers.append
    return item


@pytest.mark.parametrize(
    ("cuda", "markexpr", "accelerator", "gpu_skipped"),
    [
        (False, "", "cpu", False),  # CPU machine: gpu tests skip themselves (they need CUDA)
        (False, "gpu", "cpu", False),
        (True, "", "cpu", True),  # GPU workstation, plain run: the CPU suite, gpu tests skipped
        (True, "not slow", "cpu", True),
        (True, "gpu", None, False),  # scripts/gpu_check.sh: DeepSpeed picks CUDA, gpu tests run
    ],
)
def test_accelerator_and_gpu_skips(monkeypatch, cuda, markexpr, accelerator, gpu_skipped):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    config = _Config(markexpr)
    conftest.pytest_configure(config)
    gpu, cpu = _item("gpu"), _item("slow")
    conftest.pytest_collection_modifyitems(config, [gpu, cpu])
    assert os.environ.get("DS_ACCELERATOR") == accelerator
    assert [m.name for m in gpu.markers] == (["skip"] if gpu_skipped else [])
    assert cpu.markers == []
