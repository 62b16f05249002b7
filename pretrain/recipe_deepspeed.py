"""The recipe's DeepSpeed-side values (optimizer, schedule, precision, batch) merged into the DeepSpeed JSON
the engine gets (`apply_to_deepspeed`), so a JSON may leave them out.

Design choices:
- One value, one place: a value that the recipe (file or command line) and the JSON both set to different
  values stops the run with one line naming both; a value only one of them sets is taken as it is.
- The model family's optimizer and schedule (pretrain.recipe.FAMILY_RECIPES; ModernBERT: StableAdamW with
  WarmupStableDecay) are a preset's defaults, not a user's choice: they fill a JSON without that section, and
  give way to a section the JSON has, with one note when its type is another (a JSON chosen on purpose is
  not an error; name the optimizer in a --recipe file to make the mismatch one).
- The recipe writes a section flat (`optimizer: {type, lr, betas, ...}`); the JSON nests it (`{"type": ...,
  "params": {...}}`). Precision is `bf16`, `fp16` or `fp32`: the JSON sets one when it has a bf16 or fp16
  section.
"""

from __future__ import annotations

from typing import Any

from common.errors import UserError
from pretrain.recipe import SECTIONS, SHORTCUTS, from_family

# recipe fields that are one JSON key: field -> (JSON path, what the JSON calls it)
BATCH_FIELDS = {
    "global_batch": (("train_batch_size",), "train_batch_size"),
    "micro_batch": (("train_micro_batch_size_per_gpu",), "train_micro_batch_size_per_gpu"),
}
OUR_SCHEDULES = ("WarmupPolyDecay", "WarmupStableDecay")  # pretrain.runtime.schedules.SCHEDULES: warmup_proportion


def apply_to_deepspeed(values: dict[str, Any], origin: dict[str, str], ds_cfg: dict, ds_name: str) -> list[str]:
    """Write the recipe's DeepSpeed-side values (`values`: pretrain.recipe.flat of the config; None: unset) into
    `ds_cfg`; a disagreement with the JSON is a one-line error naming both. Returns the notes to print."""
    notes = [note for name in SECTIONS if (note := _section(name, values, origin, ds_cfg, ds_name))]
    if "optimizer" not in ds_cfg:
        raise UserError(
            f"{ds_name} has no optimizer section and the recipe names none; add optimizer: {{type: ..., lr: ...}} "
            "to a --recipe file (docs/RECIPES.md) or an optimizer section to the JSON (ds_configs/cpu_small.json)"
        )
    _precision(values.get("precision"), origin.get("precision", "recipe"), ds_cfg, ds_name)
    for name, (path, key) in BATCH_FIELDS.items():
        value = values.get(name)
        if value is None:
            continue
        have = ds_cfg.get(path[0])
        if have is not None and have != value:
            raise UserError(
                f"--{name.replace('_', '-')} {value} ({origin.get(name, 'recipe')}) but {ds_name} sets {key} {have}; "
                "set it in one place: remove it from the JSON or from the recipe"
            )
        ds_cfg[path[0]] = value
    scheduler = ds_cfg.get("scheduler", {}).get("type")
    if values.get("warmup") is not None and scheduler not in OUR_SCHEDULES:
        raise UserError(
            f"--warmup sets the warmup_proportion of our schedules ({', '.join(OUR_SCHEDULES)}); {ds_name} has "
            f"scheduler {scheduler!r}: set its warmup in the JSON"
        )
    return notes


def _section(name: str, values: dict, origin: dict[str, str], ds_cfg: dict, ds_name: str) -> str | None:
    """Merge the recipe's `optimizer` or `schedule` into the JSON's section; a note when the family's gives way."""
    section, recipe = SECTIONS[name], values.get(name) or {}
    if not recipe:
        return None

    def where(key: str) -> str:
        return origin.get(f"{name}.{key}", origin.get(name, "recipe"))

    have = ds_cfg.get(section)
    if have is None:
        if "type" not in recipe:
            raise UserError(
                f"{ds_name} has no {section} section and the recipe's {name} names no type; add {name}: {{type: "
                f"...}} to the recipe (docs/RECIPES.md) or a {section} section to the JSON"
            )
        ds_cfg[section] = {"type": recipe["type"], "params": {k: v for k, v in recipe.items() if k != "type"}}
        return None
    chosen = {k: v for k, v in recipe.items() if not from_family(where(k))}
    params = have.setdefault("params", {})
    for key, value in chosen.items():
        current = have.get("type") if key == "type" else params.get(key)
        if current is None:
            (have if key == "type" else params)[key] = value
        elif not _same(current, value, key):
            shortcut = next((s for s, target in SHORTCUTS.items() if target == (name, key)), None)
            label = f"--{shortcut}" if shortcut and where(key) == "command line" else f"{name}.{key}"
            json_key = f"{section}.{'type' if key == 'type' else 'params.' + key}"
            raise UserError(
                f"{label} {value} ({where(key)}) but {ds_name} sets {json_key} {current}; set it in one place: "
                "remove it from the JSON or from the recipe"
            )
    family_type = recipe.get("type") if "type" not in chosen else None
    if family_type and not _same(have.get("type", ""), family_type, "type"):
        return (
            f"note: {ds_name} sets {section} {have.get('type')!r}, which runs instead of the {where('type')}'s "
            f"{family_type} (a JSON section wins over a preset's; name {name}: in a --recipe file to be held to it)"
        )
    return None


def _same(a: Any, b: Any, key: str) -> bool:
    if key == "type":
        return str(a).lower() == str(b).lower()  # DeepSpeed reads optimizer types in any case
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y, "") for x, y in zip(a, b))
    return a == b


PRECISIONS = ("bf16", "fp16", "fp32")


def precision_of(ds_cfg: dict) -> str:
    """The precision a DeepSpeed JSON runs: bf16 or fp16 where its section is enabled, else fp32."""
    return next((p for p in ("bf16", "fp16") if ds_cfg.get(p, {}).get("enabled")), "fp32")


def _precision(want: str | None, where: str, ds_cfg: dict, ds_name: str) -> None:
    """The recipe's precision into a JSON without bf16/fp16 sections; another one there is an error."""
    if want is None:
        return
    if "bf16" not in ds_cfg and "fp16" not in ds_cfg:
        if want != "fp32":
            ds_cfg[want] = {"enabled": True}
        return
    have = precision_of(ds_cfg)
    if have != want:
        raise UserError(
            f"--precision {want} ({where}) but {ds_name} runs {have} (its bf16/fp16 sections); set it in one place: "
            "remove them from the JSON or precision from the recipe"
        )
