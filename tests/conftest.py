"""Shared test setup: CPU DeepSpeed where there is no GPU, quiet logs. Area fixtures: tests/fixtures_*.py."""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # on a GPU box the gpu-marked tests run DeepSpeed on CUDA
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
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
