"""The shipped DeepSpeed configs, one JSON per regime: the user-facing copy in the source tree and package data
in a wheel (setup.py lists this directory as a package), so an installed `bert-finetune` or `bert-pretrain`
finds them without the source tree.

`shipped(spec)` resolves a `--deepspeed_config` value that names a shipped config (`demo.json` or
`ds_configs/demo.json`) through `importlib.resources`; a file that exists at the path given always wins.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path


def path(name: str) -> Path:
    """The shipped config `name` (e.g. `finetune_cpu.json`), wherever the package is installed."""
    return Path(str(files(__name__) / name))


def names() -> list[str]:
    """Every shipped config's file name."""
    return sorted(p.name for p in files(__name__).iterdir() if p.name.endswith(".json"))


def shipped(spec: str | os.PathLike) -> Path | None:
    """The shipped config a missing `--deepspeed_config` path names (`NAME.json`, `ds_configs/NAME.json`), or None."""
    given = Path(spec)
    if given.is_file() or given.parent not in (Path("."), Path("ds_configs")) or given.name not in names():
        return None
    return path(given.name)
