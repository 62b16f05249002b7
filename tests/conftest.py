"""Shared test setup: CPU DeepSpeed, quiet logs. Area-specific fixtures live in tests/fixtures_*.py."""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process training sets RANK/WORLD_SIZE/MASTER_PORT (DeepSpeed reads them from the environment);
    without this, a later test's subprocess would inherit them and rendezvous on a port this process holds."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
