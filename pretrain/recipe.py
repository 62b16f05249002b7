"""The recipe: what decides a pretraining run, resolved once (preset < recipe file < command line), printed,
saved in every checkpoint's train_state.json, and compared on resume.

Design choices:
- The recipe is `TrainConfig` itself (its fields are the flags, common.flags) plus the model config and
  the DeepSpeed JSON; this module adds the layers above the dataclass defaults, not a second config tree.
  The JSON keeps the batch and ZeRO stage; the optimizer, schedule and precision may come from either, and
  pretrain.recipe_deepspeed merges the recipe's into the JSON (a value set to two values is an error).
- A model preset brings its family's recipe (`FAMILY_RECIPES`): ModernBERT MLM-only, packed, 30% masking,
  StableAdamW with warmup-stable-decay (as released); BERT NSP, unpacked, 15%, the JSON's optimizer (as
  today). The family's optimizer and schedule fill a JSON without them and give way, with a note, to others.
- `--recipe FILE` (YAML through yaml.safe_load, or JSON) maps field names (or the flags' names with
  underscores: `data`, `data_weights`) to values; its `phases:` mapping holds named overrides (`--phase NAME`:
  phase 2, context extension). It can name every value, required ones (`deepspeed_config`, `data`, `save`)
  included. Unknown keys and values of the wrong type are one-line errors naming the field.
- `optimizer` and `schedule` are mappings merged key by key across the layers (a layer naming another type
  replaces the lower one's); `origin` holds each key's layer (`optimizer.lr`). `lr` and `warmup` set
  `optimizer.lr` and `schedule.warmup_proportion`: the higher layer wins.
- Which fields the user gave on the command line is read from argv (a parser whose defaults are suppressed),
  so `--mask-prob 0.15` with a ModernBERT preset means 0.15; a config built in Python (main(cfg)) counts a
  field as given when it differs from the dataclass default.
- On resume, `RESUMABLE` fields may change (they take effect and are printed); any other recipe field that
  differs from the checkpoint's refuses in one line naming it (`resume_changes`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.flags import checked_value, file_keys, typed_fields
from common.log import get_logger

FAMILY_RECIPES: dict[str, dict[str, Any]] = {
    "bert": {"pair_task": "nsp", "packing": False, "mask_prob": 0.15},  # optimizer, schedule: the JSON's
    "modernbert": {
        "pair_task": "none",
        "packing": True,
        "mask_prob": 0.30,
        # ds_configs/modernbert_demo.json's sections (tests/test_recipe_deepspeed.py keeps them equal); used where the
        # DeepSpeed JSON has no optimizer or scheduler section (pretrain.recipe_deepspeed)
        "optimizer": {
            "type": "StableAdamW",
            "lr": 0.002,
            "betas": [0.9, 0.98],
            "eps": 1e-6,
            "weight_decay": 1e-5,
            "decouple_lr": True,
        },
        "schedule": {
            "type": "WarmupStableDecay",
            "warmup_proportion": 0.06,
            "decay_proportion": 0.2,
            "decay": "1-sqrt",
        },
    },
}
SECTIONS = {"optimizer": "optimizer", "schedule": "scheduler"}  # recipe field -> its DeepSpeed JSON section
SHORTCUTS = {"lr": ("optimizer", "lr"), "warmup": ("schedule", "warmup_proportion")}  # flag -> (section, key)

# fields that may change on resume: they take effect and are printed
RESUMABLE = frozenset(
    {
        "train_steps",
        "time_budget",
        "log_every",
        "eval_every",
        "save_every",
        "keep_last",
        "eval_samples",
        "num_workers",
        "max_nonfinite",
        "wandb_project",
        "tensorboard",
        "dist_timeout",
        "compile",
        "deepspeed_config",  # the path; what of its content may change is checked on its own (lr, batch)
        "save",
        "init_from",
        "init_optimizer",
        "allow_tokenizer_change",
        "recipe",
        "phase",
        "print_recipe",
        "given",
        "lr",  # what the JSON becomes is compared on its own (the learning rate may change, the batch not)
        "global_batch",
        "micro_batch",
        "warmup",
    }
)
# recipe fields a resume must keep: a change reshapes the run
FIXED = ("seq_len", "mask_prob", "pair_task", "seed", "prefixes", "weights", "whole_word_mask", "packing")
FIXED += ("short_seq_prob", "eval_fraction", "model")


def flat(cfg) -> dict[str, Any]:
    """Field name -> value of a config and its nested dataclasses (flag names are unique within a command)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat(value))
        else:
            out[f.name] = value
    return out


def _set(cfg, name: str, value: Any):
    """`cfg` with field `name` (its own or a nested dataclass's) replaced."""
    names = {f.name for f in dataclasses.fields(cfg)}
    if name in names:
        return dataclasses.replace(cfg, **{name: value})
    for f in dataclasses.fields(cfg):
        inner = getattr(cfg, f.name)
        if dataclasses.is_dataclass(inner) and name in flat(inner):
            return dataclasses.replace(cfg, **{f.name: _set(inner, name, value)})
    raise KeyError(name)


def _merged(old: dict | None, value: Any, name: str, where: str, origin: dict[str, str]) -> dict:
    """A section (optimizer, schedule) over the lower layers': merged key by key when it names no other type,
    else in their place; `origin` gets each key's layer."""
    if not isinstance(value, dict):
        raise UserError(f"{where}: {name} takes a mapping ({name}: {{type: ..., ...}}), not {value!r}")
    old = old or {}
    if "type" in value and str(value["type"]).lower() != str(old.get("type", "")).lower():
        for k in [k for k in origin if k.startswith(f"{name}.")]:
            del origin[k]
        old = {}
    origin.update({f"{name}.{k}": where for k in value})
    return {**old, **value}


def _shortcuts(cfg, origin: dict[str, str], rank: dict[str, int]):
    """`lr` and `warmup` (flags and keys) set a key of the optimizer and the schedule: the higher layer wins;
    within one layer two different values are an error."""
    for short, (section, key) in SHORTCUTS.items():
        values = flat(cfg)
        if section not in values or values.get(short) is None:  # bert-bench: its warmup is its own
            continue
        merged = dict(values[section] or {})
        here, there = origin[short], origin.get(f"{section}.{key}", "default")
        if key in merged and merged[key] != values[short] and rank.get(here, 0) == rank.get(there, 0):
            raise UserError(f"{here}: {short} {values[short]} and {section}.{key} {merged[key]} disagree; give one")
        if key not in merged or rank.get(here, 0) >= rank.get(there, 0):
            merged[key], origin[f"{section}.{key}"] = values[short], here
            cfg = _set(cfg, section, merged)
    return cfg


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type in ("DataConfig",)):
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def given_on_command_line(parser, argv) -> set[str]:
    """The fields whose flags `argv` names: `parser` parsed again with every default suppressed."""
    import argparse

    defaults = [(a, a.default) for a in parser._actions]
    try:
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        names = set(vars(parser.parse_args(argv)))
    finally:
        for action, default in defaults:
            action.default = default
    return names - {"local_rank", "help"}


def given_in_python(cfg) -> set[str]:
    """Fields of a config built in Python that differ from their dataclass defaults."""
    defaults = {}
    stack = [cfg]
    while stack:
        c = stack.pop()
        defaults.update(_defaults(type(c)))
        stack += [getattr(c, f.name) for f in dataclasses.fields(c) if dataclasses.is_dataclass(getattr(c, f.name))]
    return {k for k, v in flat(cfg).items() if k not in defaults or defaults[k] != v}


SHIPPED = Path(__file__).resolve().parent / "recipes"
EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def shipped() -> list[str]:
    """Names of the recipes that come with the package (pretrain/recipes/NAME.yaml)."""
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def read_file(path: str) -> dict[str, Any]:
    """A recipe file: YAML (safe loader) or JSON, a mapping of field names to values (and `phases`); a name
    without a file of that name is one of the shipped recipes."""
    p = Path(path)
    if not p.is_file() and path in shipped():
        p = SHIPPED / f"{path}.yaml"
    if not p.is_file():
        raise UserError(
            f"--recipe {path} does not exist; pass a YAML or JSON recipe file or one of {', '.join(shipped())} "
            "(docs/RECIPES.md)"
        )
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            class Loader(yaml.SafeLoader):  # YAML 1.1 reads 1e-3 as a string; read it as YAML 1.2 does, a float
                pass

            Loader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT, list("-+0123456789."))
            data = yaml.load(text, Loader=Loader)  # a SafeLoader: no object tags
    except Exception as e:  # yaml.YAMLError or json.JSONDecodeError: both are the file's fault
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"--recipe {path} is not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({first})") from None
    if not isinstance(data, dict):
        raise UserError(f"--recipe {path} must hold a mapping of field: value (docs/RECIPES.md)")
    return data


def add_recipe_arguments(parser) -> None:
    """`--recipe` and `--phase` for a command whose config dataclass does not declare them (bert-bench,
    bert-finetune, bert-glue); bert-pretrain's are TrainConfig fields. A required flag becomes one that the
    command line or the recipe file gives (parse_with_recipe checks it after both)."""
    parser.add_argument(
        "--recipe", metavar="FILE", help="recipe file (YAML or JSON of field: value) under the command line"
    )
    parser.add_argument("--phase", metavar="NAME", help="apply this entry of the --recipe file's phases:")
    parser.recipe_required = [a for a in parser._actions if a.required]
    for action in parser.recipe_required:
        action.required = False
        action.help = f"{action.help or ''} (required: here or in the --recipe file)".strip()


def parse_with_recipe(cls: type, parser, argv, foreign: frozenset = frozenset()):
    """`parser.parse_args(argv)` as a `cls`, with the model family's recipe and `--recipe FILE [--phase NAME]`
    (see add_recipe_arguments) between the defaults and the command line, as bert-pretrain resolves them.
    Keys in `foreign` (a pretraining recipe's fields that are not this command's) are skipped."""
    from common.flags import from_args

    args = parser.parse_args(argv)
    cfg = from_args(cls, args)
    file = read_file(args.recipe) if args.recipe else None
    cfg, origin = resolve(cfg, given_on_command_line(parser, argv), file, args.phase, args.recipe or "", foreign)
    values = flat(cfg)
    for action in getattr(parser, "recipe_required", []):
        if values.get(action.dest) is None:
            flag = action.option_strings[0]
            value = action.metavar or action.dest.upper()
            raise UserError(f"{flag} is required: pass {flag} {value} or set {action.dest}: in a --recipe file")
    chosen = {k: v for k, v in origin.items() if v not in ("default", "command line") and k in values}
    if chosen:
        get_logger(__name__).info("recipe: " + ", ".join(f"{k}={values[k]} ({v})" for k, v in chosen.items()))
    return cfg


def model_family(model: str) -> str:
    """The family (model_type) of a --model value: a preset name or a model JSON."""
    from pretrain.models import config_from_json, presets

    if model in presets():
        return presets()[model].preset(model).model_type
    if model.endswith(".json") or os.path.sep in model:
        return config_from_json(model).model_type
    raise UserError(f"--model: unknown preset {model!r}; use one of {', '.join(presets())} or a JSON file")


def resolve(
    cfg, given: set[str], recipe: dict | None, phase: str | None, source: str, foreign: frozenset = frozenset()
):
    """(cfg with the layers applied, field -> where its value came from; `optimizer.lr` ... for the keys of a
    section). Layers, lowest first: the dataclass defaults, the model family's recipe, the recipe file (then its
    phase), the command line (`given`). Keys in `foreign` (fields of another command's recipe) are skipped and
    named in one line."""
    fields, keys, hints = flat(cfg), file_keys(cfg), {f.name: hint for f, hint in typed_fields(cfg)}
    origin = {name: "default" for name in fields}
    layers: list[tuple[str, dict]] = []
    if recipe is not None:
        recipe = dict(recipe)
        phases = recipe.pop("phases", None) or {}
        layers.append((f"recipe {source}", recipe))
        if phase is not None:
            if phase not in phases:
                raise UserError(f"--phase {phase}: {source} has phases {sorted(phases) or 'none'}; pass one of them")
            layers.append((f"recipe {source} phase {phase}", phases[phase]))
    elif phase is not None:
        raise UserError("--phase selects a phase of a --recipe file; pass --recipe FILE")
    model = getattr(cfg, "model", None)  # bert-finetune has no --model: no family layer
    if model is not None:
        if "model" not in given:
            model = next((values["model"] for _, values in reversed(layers) if "model" in values), model)
        family = model_family(model)
        objective = {k: v for k, v in FAMILY_RECIPES.get(family, {}).items() if k in fields}  # bench: mask_prob
        layers.insert(0, (f"{family} recipe (--model {model})", objective))
    for name in given:
        origin[name] = "command line"
    skipped = []
    for where, values in layers:
        for key, value in values.items():
            if key in foreign:
                skipped.append(key)
                continue
            name = keys.get(key)
            if name is None:
                close = difflib.get_close_matches(key, list(keys), n=1)
                hint = f"did you mean {close[0]}?" if close else "see the command's --help for the fields"
                raise UserError(f"{where}: unknown recipe field {key!r}; {hint}")
            if name in given:
                continue
            value = checked_value(hints[name], value, key, where)
            if name in SECTIONS:
                value = _merged(flat(cfg)[name], json.loads(json.dumps(value)), name, where, origin)
            cfg = _set(cfg, name, value)
            origin[name] = where
    if skipped:
        get_logger(__name__).info(f"recipe {source}: not this command's, skipped: {', '.join(sorted(set(skipped)))}")
    cfg = _shortcuts(cfg, origin, {where: i for i, (where, _) in enumerate(layers, 1)} | {"command line": 99})
    values = flat(cfg)
    if values.get("packing") and values["pair_task"] != "none" and origin["packing"].endswith(f"(--model {model})"):
        # the family packs only for its MLM-only objective: a pair task asked for above it takes unpacked samples
        cfg, origin["packing"] = _set(cfg, "packing", False), f"off for pair_task {values['pair_task']}"
    return cfg, origin


def from_family(where: str) -> bool:
    """Whether an origin is a model family's recipe (its optimizer and schedule give way to the JSON's)."""
    return " recipe (--model " in where


def resume_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(resumable fields that changed, as 'name old -> new'; fixed recipe fields that changed, likewise), from
    the `train` sections of a checkpoint's and this launch's resolved configs (flattened)."""
    saved_flat, now_flat = _flatten(saved), _flatten(now)
    taking, refused = [], []
    for name, value in now_flat.items():
        if name not in saved_flat or saved_flat[name] == value:
            continue
        line = f"{name} {saved_flat[name]!r} -> {value!r}"
        if name in FIXED:
            refused.append(line)
        elif name in RESUMABLE:
            taking.append(line)
    return taking, refused


def _flatten(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k == "data":
            out.update(_flatten(v))
        else:
            out[k] = v
    return out


def provenance() -> dict[str, Any]:
    """Where this run comes from: the git commit of the code (when it is a git checkout), the library
    versions, the command line."""
    import deepspeed
    import torch
    import transformers

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return {
        "git_commit": (commit + ("+dirty" if dirty else "")) if commit else None,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
    }
