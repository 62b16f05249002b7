"""Files that are either absent or complete: written through a temporary file, fsynced, then renamed."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through `path.tmp` and a rename: a crash leaves the old file or the new one."""
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: dict) -> None:
    """`obj` as indented JSON, atomically (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
