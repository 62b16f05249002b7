"""The recipe: what decides a pretraining run, resolved once (preset < recipe file < command line), printed,
saved in every checkpoint's train_state.json, and compared on resume.

Design choices:
- The recipe is `TrainConfig` itself (its fields are the flags, common.flags) plus the model config and
  the DeepSpeed JSON; this module adds the layers above the dataclass defaults, not a second config tree.
  Batch, optimizer, schedule and precision stay in the DeepSpeed JSON (one source of truth, STYLE habit 2).
- A model preset brings its family's objective (`FAMILY_RECIPES`): ModernBERT MLM-only, packed, 30% masking
  (as released); BERT NSP, unpacked, 15% (as today). The family's optimizer and schedule (ModernBERT:
  StableAdamW, warmup-stable-decay) are the DeepSpeed JSON's; a JSON with others gets one note.
- `--recipe FILE` (YAML through yaml.safe_load, or JSON) maps field names (the flags' names with
  underscores) to values; its `phases:` mapping holds named overrides (`--phase NAME`: phase 2, context
  extension). Unknown keys are one-line errors naming the nearest field.
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
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.errors import UserError

FAMILY_RECIPES: dict[str, dict[str, Any]] = {
    "bert": {"pair_task": "nsp", "packing": False, "mask_prob": 0.15},
    "modernbert": {"pair_task": "none", "packing": True, "mask_prob": 0.30},
}
FAMILY_OPTIMIZERS = {"modernbert": ("stableadamw", "WarmupStableDecay")}

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

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError or json.JSONDecodeError: both are the file's fault
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"--recipe {path} is not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({first})") from None
    if not isinstance(data, dict):
        raise UserError(f"--recipe {path} must hold a mapping of field: value (docs/RECIPES.md)")
    return data


def add_recipe_arguments(parser) -> None:
    """`--recipe` and `--phase` for a command whose config dataclass does not declare them (bert-bench,
    bert-finetune, bert-glue); bert-pretrain's are TrainConfig fields."""
    parser.add_argument(
        "--recipe", metavar="FILE", help="recipe file (YAML or JSON of field: value) under the command line"
    )
    parser.add_argument("--phase", metavar="NAME", help="apply this entry of the --recipe file's phases:")


def parse_with_recipe(cls: type, parser, argv):
    """`parser.parse_args(argv)` as a `cls`, with the model family's recipe and `--recipe FILE [--phase NAME]`
    (see add_recipe_arguments) between the defaults and the command line, as bert-pretrain resolves them."""
    from common.flags import from_args

    args = parser.parse_args(argv)
    cfg = from_args(cls, args)
    file = read_file(args.recipe) if args.recipe else None
    cfg, origin = resolve(cfg, given_on_command_line(parser, argv), file, args.phase, args.recipe or "")
    from common.log import get_logger

    chosen = {k: v for k, v in origin.items() if v not in ("default", "command line")}
    if chosen:
        values = flat(cfg)
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


def resolve(cfg, given: set[str], recipe: dict[str, Any] | None, phase: str | None, source: str):
    """(cfg with the layers applied, field -> where its value came from). Layers, lowest first: the dataclass
    defaults, the model family's recipe, the recipe file (then its phase), the command line (`given`)."""
    fields = flat(cfg)
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
    for where, values in layers:
        for name, value in values.items():
            if name not in fields:
                close = difflib.get_close_matches(name, list(fields), n=1)
                hint = f"did you mean {close[0]}?" if close else "see bert-pretrain --help for the fields"
                raise UserError(f"{where}: unknown recipe field {name!r}; {hint}")
            if name in given:
                continue
            cfg = _set(cfg, name, value)
            origin[name] = where
    values = flat(cfg)
    if values.get("packing") and values["pair_task"] != "none" and origin["packing"].endswith(f"(--model {model})"):
        # the family packs only for its MLM-only objective: a pair task asked for above it takes unpacked samples
        cfg, origin["packing"] = _set(cfg, "packing", False), f"off for pair_task {values['pair_task']}"
    return cfg, origin


# recipe fields that live in the DeepSpeed JSON: field -> (JSON path, what the JSON calls it)
DEEPSPEED_FIELDS = {
    "lr": (("optimizer", "params", "lr"), "optimizer.params.lr"),
    "global_batch": (("train_batch_size",), "train_batch_size"),
    "micro_batch": (("train_micro_batch_size_per_gpu",), "train_micro_batch_size_per_gpu"),
    "warmup": (("scheduler", "params", "warmup_proportion"), "scheduler.params.warmup_proportion"),
}


OUR_SCHEDULES = ("WarmupPolyDecay", "WarmupStableDecay")  # pretrain.runtime.schedules.SCHEDULES: warmup_proportion


def apply_to_deepspeed(values: dict[str, Any], origin: dict[str, str], ds_cfg: dict, ds_name: str) -> None:
    """Write the recipe's DeepSpeed-side values (`DEEPSPEED_FIELDS`, None: unset) into `ds_cfg` where the JSON
    leaves them out; where the JSON sets one to another value, a one-line error naming both."""
    for name, (path, key) in DEEPSPEED_FIELDS.items():
        value = values.get(name)
        if value is None:
            continue
        if name == "warmup" and ds_cfg.get("scheduler", {}).get("type") not in OUR_SCHEDULES:
            raise UserError(
                f"--warmup sets the warmup_proportion of our schedules ({', '.join(OUR_SCHEDULES)}); {ds_name} has "
                f"scheduler {ds_cfg.get('scheduler', {}).get('type')!r}: set its warmup in the JSON"
            )
        node = ds_cfg
        for part in path[:-1]:
            node = node.setdefault(part, {})
        have = node.get(path[-1])
        if have is not None and have != value:
            raise UserError(
                f"--{name.replace('_', '-')} {value} ({origin.get(name, 'recipe')}) but {ds_name} sets {key} {have}; "
                "set it in one place: remove it from the JSON or from the recipe"
            )
        node[path[-1]] = value


def family_optimizer_note(family: str, ds_cfg: dict, ds_name: str) -> str | None:
    """One line when the DeepSpeed JSON's optimizer or schedule is not the family's recipe's."""
    want = FAMILY_OPTIMIZERS.get(family)
    if not want:
        return None
    opt = str(ds_cfg.get("optimizer", {}).get("type", "")).lower()
    sched = ds_cfg.get("scheduler", {}).get("type")
    if opt == want[0] and sched == want[1]:
        return None
    return (
        f"note: {ds_name} runs {opt or 'no optimizer'} with {sched or 'no schedule'}; the {family} recipe is "
        f"StableAdamW with {want[1]} (ds_configs/modernbert_*.json)"
    )


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
