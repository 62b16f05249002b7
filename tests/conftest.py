"""Shared test setup: which accelerator DeepSpeed gets, quiet logs. Area fixtures: tests/fixtures_*.py.

DeepSpeed picks its accelerator once per process. The CPU suite needs its CPU one (gloo, CPU tensors) even on a
GPU workstation; the gpu-marked tests need CUDA. So a run that selects exactly the gpu tests (`-m gpu`, as
scripts/gpu_check.sh does) on a CUDA machine gets CUDA, every other run gets CPU and skips the gpu tests.
"""

import os
import sys

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# DeepSpeed JIT-builds its CPU comm op into one cache shared by every virtualenv, rebuilding it whenever another
# venv used it last; a build per venv keeps test launches from loading a library another checkout is rewriting.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process training sets RANK/WORLD_SIZE/MASTER_PORT (DeepSpeed reads them from the environment);
    without this, a later test's subprocess would inherit them and rendezvous on a port this process holds."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _gpu_run(config) -> bool:
    return torch.cuda.is_available() and config.getoption("markexpr") == "gpu"


def pytest_configure(config):
    if not _gpu_run(config):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and not _gpu_run(config):
        skip = pytest.mark.skip(reason="gpu test: run `pytest -m gpu` (scripts/gpu_check.sh) for DeepSpeed on CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
