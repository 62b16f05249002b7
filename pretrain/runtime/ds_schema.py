"""Strict reading of a DeepSpeed JSON: what DeepSpeed itself would ignore or raise as a traceback, refused in one line.

Design choices:
- DeepSpeed ignores a top-level key it does not read (`zero_optimisation` silently means ZeRO stage 0). The
  valid set is not a list kept here: `pretrain.runtime.ds_config.deepspeed_top_level_keys` records which keys
  DeepSpeed's own config parser looks up, and this module refuses any other key with the nearest valid one (difflib).
- Nested sections are DeepSpeed's pydantic models (`extra="forbid"`), which raise a multi-line ValidationError
  deep inside `deepspeed.initialize`; `one_line` turns it into one line that names the section and the field,
  with the nearest valid field name where the field is unknown.
- This module imports neither DeepSpeed nor pydantic (engine.py is the one place that imports DeepSpeed); it
  takes the key set and the error object from there.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from common.errors import UserError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def nearest(key: str, valid: Iterable[str]) -> str | None:
    """The valid key closest to `key` (difflib), or None when none is close."""
    found = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return found[0] if found else None


def check_top_level(cfg: dict, valid: set[str], name: str) -> None:
    """Refuse a top-level key DeepSpeed does not read, naming the nearest valid one."""
    for key in cfg:
        if key in valid:
            continue
        close = nearest(key, valid)
        hint = f"did you mean {close}?" if close else "remove it"
        raise UserError(f'{name}: unknown top-level key "{key}" (DeepSpeed would ignore it); {hint}')


def one_line(error, cfg: dict, name: str, fields: list[str]) -> str:
    """A pydantic ValidationError from one of DeepSpeed's config sections as one line: section, field, reason;
    `fields`: the valid field names of the section's model (for the nearest one to an unknown field)."""
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "?"
    head = str(first.get("loc", ("",))[0]) if first.get("loc") else ""
    section = next((k for k, v in cfg.items() if isinstance(v, dict) and head in v), None)
    where = f"{section}.{loc}" if section else f"{loc} ({error.title})"
    hint = ""
    if first.get("type") == "extra_forbidden" and section is not None:
        close = nearest(head, fields) if fields else None
        hint = f"; did you mean {section}.{close}?" if close else "; remove it"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{name}: {where}: {first.get('msg', 'invalid')}{more}{hint}"


def missing_batch_message(name: str) -> str:
    return (
        f"{name}: set train_batch_size and/or train_micro_batch_size_per_gpu (accepted batch keys: "
        f"{', '.join(BATCH_KEYS)}; any two of them fix the third with the process count)"
    )
