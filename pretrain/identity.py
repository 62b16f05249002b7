"""Which tokenizer a run is: the dataset manifest's special-token ids and fingerprint carried into the model
config and every checkpoint, and compared wherever a checkpoint meets a tokenizer (resume, export, fine-tuning).

Design choices:
- The manifest (`PREFIX.json`, `tokenizer`) is the source of truth for token ids. A model preset's ids
  (ModernBERT's 50281/50282/50283) are defaults that the data's replace; an id the user set (`--model-set`,
  or a field present in a `--model` JSON) that contradicts the data is a one-line error naming both sides,
  never silently kept (it would reach the exported config.json and every fine-tuning run).
- bos/eos: the families use them as cls/sep (ModernBERT's config sets bos = [CLS], eos = [SEP]); a manifest
  without its own bos/eos roles gives cls/sep.
- The fingerprint is the manifest's `tokenizer.sha256` (data_prep.tokenizer.describe). A checkpoint records
  the manifest's tokenizer entry under `config.tokenizer`; one written before that existed is accepted with one
  warning. `--allow-tokenizer-change` lets the intended case through (a vocabulary swap for further training).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from common.errors import UserError

ROLES = {  # model config field -> the manifest's special-token roles, first present wins
    "pad_token_id": ("pad",),
    "unk_token_id": ("unk",),
    "mask_token_id": ("mask",),
    "cls_token_id": ("cls",),
    "sep_token_id": ("sep",),
    "bos_token_id": ("bos", "cls"),
    "eos_token_id": ("eos", "sep"),
}
ALLOW_FLAG = "--allow-tokenizer-change"


def data_ids(config_cls: type, special_tokens: dict[str, int]) -> dict[str, int]:
    """The id fields `config_cls` has, as the data's manifest sets them."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    out = {}
    for name, roles in ROLES.items():
        role = next((r for r in roles if r in special_tokens), None)
        if name in fields and role is not None:
            out[name] = int(special_tokens[role])
    return out


def model_config(spec: str, model_set: Sequence[str], tokenizer: dict, manifest: str):
    """`--model spec --model-set ...` with the data's special-token ids filled in where the user set none; an id
    set against the data (`--model-set` or a field of the model JSON) is a one-line error naming both."""
    from pretrain.models import config_from_json, load_config, presets

    is_json = spec.endswith(".json") or os.path.sep in spec
    if is_json:
        cls, written = type(config_from_json(spec)), set(json.loads(_read(spec)))
    elif spec in presets():
        cls, written = presets()[spec], set()
    else:
        return load_config(spec, model_set)  # the unknown preset's own error
    given = dict(item.partition("=")[::2] for item in model_set if "=" in item)
    sets = []
    for name, want in data_ids(cls, tokenizer["special_tokens"]).items():
        if name in given:
            if _as_int(given[name]) != want:
                raise UserError(
                    f"--model-set {name}={given[name]} contradicts the data's id {want} ({manifest}); drop the "
                    f"--model-set or rebuild the data with the tokenizer whose id is {given[name]}"
                )
        elif name in written:
            have = getattr(config_from_json(spec), name)
            if have != want:
                raise UserError(
                    f"--model {spec} sets {name} {have} but the data's id is {want} ({manifest}); pass "
                    f"--model-set {name}={want} or a model JSON made for this tokenizer"
                )
        else:
            sets.append(f"{name}={want}")
    return load_config(spec, [*sets, *model_set])


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"--model {path}: {e.strerror}") from None


def _as_int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def fingerprint(entry: dict | None) -> str | None:
    """The tokenizer fingerprint of a manifest's or a checkpoint's tokenizer entry (None: not recorded)."""
    return (entry or {}).get("sha256")


def compare(saved: dict | None, current: dict, saved_name: str, current_name: str, allow: bool) -> None:
    """Refuse a checkpoint whose recorded tokenizer is not `current` (one line naming both) unless `allow`;
    a checkpoint without a record passes with one warning."""
    old, new = fingerprint(saved), fingerprint(current)
    if old is None:
        warnings.warn(
            f"{saved_name} records no tokenizer fingerprint (written before they were saved); cannot check that "
            f"{current_name} is its tokenizer",
            stacklevel=2,
        )
        return
    if old == new or new is None:
        return
    if allow:
        warnings.warn(f"{ALLOW_FLAG}: {saved_name} was trained with tokenizer {old[:12]}, now {new[:12]}", stacklevel=2)
        return
    raise UserError(
        f"{saved_name} was trained with tokenizer {old[:12]} ({(saved or {}).get('path', '?')}) but {current_name} "
        f"is tokenizer {new[:12]} ({current.get('path', '?')}); use the matching tokenizer or pass {ALLOW_FLAG}"
    )


def describe_tokenizer(path: str, special_tokens: dict[str, str] | None = None) -> dict:
    """A tokenizer directory's (or tokenizer.json's) manifest entry, fingerprint included, as bert-prep makes it."""
    from data_prep.tokenizer import describe, load

    return describe(load(path, special_tokens or None), path).to_json()


def recorded_config(source: str | os.PathLike) -> dict | None:
    """The resolved configuration a training run saved with a checkpoint (a --save directory's newest, or a tag);
    None for a Hugging Face directory or a directory without checkpoints."""
    from pretrain.runtime import checkpoint

    source = Path(source)
    if (source / checkpoint.STATE_FILE).is_file():
        return checkpoint.read_state(source).config
    found = checkpoint.newest(source) if source.is_dir() else None
    return found[1].config if found is not None else None


def check_init_from(init_from: str, current: dict, current_name: str, allow: bool) -> None:
    """--init-from one of our checkpoints: its tokenizer must be `current` (an HF directory records none)."""
    recorded = recorded_config(init_from)
    if recorded is not None:
        compare(recorded.get("tokenizer"), current, f"--init-from {init_from}", current_name, allow)
