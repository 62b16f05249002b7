"""What a pretraining run settles before step 1: the resolved recipe, model config and data (`prepare`), what
a resume may change (`check_resume`), which checkpoint it can open (`loadable`, `optimizer_source`), the model
(`build_model`: fresh, or `--init-from` weights), and the record saved with every checkpoint
(`resolved_config`). Every check a user can get wrong fails here with one line, before any compute.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from common.errors import UserError
from common.log import get_logger
from pretrain import identity, recipe
from pretrain.data import PretrainingData
from pretrain.models import build_pretraining_model, pretraining_from_state, shape_mismatch
from pretrain.recipe_deepspeed import apply_to_deepspeed, precision_of
from pretrain.runtime import dist
from pretrain.train_config import TrainConfig

log = get_logger(__name__)


def prepare(cfg: TrainConfig, origin: dict | None = None):
    """All user-input checks, before any compute. Returns (model config, data, DeepSpeed config, checkpoint)."""
    from pretrain.runtime import resume
    from pretrain.runtime.ds_config import load_ds_config, resolve_batch

    cfg.validate()
    ds_cfg = load_ds_config(cfg.deepspeed_config)
    notes = apply_to_deepspeed(recipe.flat(cfg), origin or {}, ds_cfg, cfg.deepspeed_config)
    ds_cfg = load_ds_config(ds_cfg, cfg.deepspeed_config)  # checked again with the recipe's sections in
    resolve_batch(ds_cfg, int(os.environ.get("WORLD_SIZE", "1")))
    data = PretrainingData(cfg.data)  # names a missing dataset (shards and globs resolved), checks the data
    manifest = f"{data.sources[0].prefix}.json"  # the first dataset after shards and globs are resolved
    model_cfg = identity.model_config(cfg.model, cfg.model_set, data.tokenizer, manifest)  # the data's token ids
    if cfg.data.seq_len > model_cfg.max_position_embeddings:
        raise UserError(
            f"--seq-len {cfg.data.seq_len} exceeds the model's max_position_embeddings "
            f"{model_cfg.max_position_embeddings}; lower --seq-len or use a larger --model"
        )
    if data.vocab_size > model_cfg.vocab_size:
        raise UserError(
            f"the data's vocabulary ({data.vocab_size} ids, {manifest}) is larger than the model's "
            f"vocab_size {model_cfg.vocab_size}; pass --model-set vocab_size={data.vocab_size} (or more)"
        )
    for note in notes if not cfg.print_recipe else ():  # --print-recipe's stdout is the JSON alone
        log.info(note)
    found = resume.starting_point(cfg.save, cfg.resume_from)
    if found is not None:
        diff = shape_mismatch(found[1].config.get("model", {}), model_cfg)
        if diff:
            raise UserError(
                f"--save {cfg.save} holds a checkpoint of a different model shape ({', '.join(diff)} differ); "
                "use a new --save directory or the same --model"
            )
        saved = found[1].config
        identity.compare(
            saved.get("tokenizer"),
            data.tokenizer,
            f"{cfg.save}/{found[0]}",
            f"--data {manifest}",
            cfg.allow_tokenizer_change,
        )
        check_resume(cfg, saved, ds_cfg, found[1].world_size)
    elif cfg.init_from:
        identity.check_init_from(cfg.init_from, data.tokenizer, f"--data {manifest}", cfg.allow_tokenizer_change)
    return model_cfg, data, ds_cfg, found


def _training_math(old_ds: dict, ds_cfg: dict) -> list[tuple[str, object, object]]:
    """(name, checkpoint's, this launch's) of what a resume may not change in the DeepSpeed JSON besides the batch:
    the optimizer (type and every parameter but lr), the scheduler type and the precision."""
    opt = [d.get("optimizer", {}) for d in (old_ds, ds_cfg)]
    params = [{k: v for k, v in o.get("params", {}).items() if k != "lr"} for o in opt]
    kinds = [str(o.get("type", "")).lower() for o in opt]
    schedules = [str(d.get("scheduler", {}).get("type", "")).lower() for d in (old_ds, ds_cfg)]
    return [
        ("optimizer", *kinds),
        ("optimizer params", *params),
        ("scheduler", *schedules),
        ("precision", *(precision_of(d) for d in (old_ds, ds_cfg))),
    ]


def check_resume(cfg: TrainConfig, saved: dict, ds_cfg: dict, saved_world: int) -> None:
    """A resume keeps the recipe: what may change (recipe.RESUMABLE, the learning rate, the process count)
    takes effect and is printed; any other changed recipe field (or the global batch, the optimizer, its
    parameters, the scheduler type or the precision) refuses, naming it."""
    from pretrain.runtime.ds_config import resolve_batch

    taking, refused = recipe.resume_changes(saved.get("train", {}), recipe.flat(cfg))
    old_ds, world = saved.get("deepspeed"), int(os.environ.get("WORLD_SIZE", "1"))
    if old_ds:
        old_lr, new_lr = (d.get("optimizer", {}).get("params", {}).get("lr") for d in (old_ds, ds_cfg))
        if old_lr != new_lr:
            taking.append(f"lr {old_lr} -> {new_lr}")
        old_batch, new_batch = resolve_batch(old_ds, saved_world)[0], resolve_batch(ds_cfg, world)[0]
        if old_batch != new_batch:
            refused.append(f"global batch (train_batch_size) {old_batch} -> {new_batch}")
        for name, old, new in _training_math(old_ds, ds_cfg):
            if old != new:  # the saved optimizer state and schedule belong to the old ones
                refused.append(f"{name} {old} -> {new}")
    if saved_world != world:
        taking.append(f"processes {saved_world} -> {world} (gradient accumulation follows)")
    if refused:
        raise UserError(
            f"--save {cfg.save} holds a run whose recipe differs: {'; '.join(refused)}; a resume may change only "
            "--train-steps, the learning rate, --time-budget, the cadences and the process count: relaunch with "
            "the checkpoint's values or use a new --save directory"
        )
    if taking:
        log.info(f"resuming {cfg.save} with changes that take effect: {'; '.join(taking)}")


def loadable(save_dir: Path, found, world: int, ds_cfg: dict, trust: bool = False):
    """(tag, state) that `world` processes can load of a checkpoint found in `save_dir`: the tag itself when it was
    written by as many processes, is universal, or holds its optimizer state whole (stage 0); otherwise a
    universal copy that rank 0 makes once while the other ranks wait. Says which in one line."""
    from pretrain.runtime import resume, weights

    if found is None:
        return None
    tag, state = found
    tag_dir = save_dir / tag
    if not tag.endswith("_universal") and state.world_size != world and resume.partitioned(tag_dir):
        log.info(
            f"{tag_dir} was written by {state.world_size} processes with its optimizer state split over them; "
            f"converting it to the universal format to load it on {world} (once; the other ranks wait)"
        )
        if dist.is_rank0():
            weights.to_universal(save_dir, tag, trust)
        dist.barrier()
        tag = f"{tag}_universal"
    elif state.world_size != world and not tag.endswith("_universal"):
        log.info(
            f"{tag_dir} was written by {state.world_size} processes; {world} load it directly (its optimizer state "
            "is whole on every rank); the global batch stays the JSON's, accumulation adapts"
        )
    if tag.endswith("_universal"):
        ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
    return tag, state


def optimizer_source(init_from: str, world: int, ds_cfg: dict, trust: bool = False) -> Path:
    """The checkpoint tag whose optimizer state --init-optimizer takes: --init-from's newest, or that tag."""
    from pretrain.runtime import checkpoint

    path = Path(init_from)
    good = (
        checkpoint.newest_good(path, warn=False)
        if path.is_dir() and not (path / checkpoint.STATE_FILE).is_file()
        else None
    )
    found = (good, checkpoint.read_state(path / good)) if good else None  # the tag load_weights takes the weights of
    if (path / checkpoint.STATE_FILE).is_file():
        path, found = path.parent, (path.name, checkpoint.read_state(path))
    if found is None:
        raise UserError(
            f"--init-optimizer: --init-from {init_from} is not one of our checkpoints (a --save directory or a tag), "
            "so it has no optimizer state to take; drop --init-optimizer"
        )
    return path / loadable(path, found, world, ds_cfg, trust)[0]


def recipe_record(cfg: TrainConfig, origin: dict, model_cfg, ds_cfg: dict, data) -> dict:
    """The resolved recipe: the flags, the model config, the DeepSpeed JSON, where each flag's value came from
    (those not at their default), the data's tokenizer and the provenance (pretrain.recipe)."""
    return {
        "train": dataclasses.asdict(cfg),
        "model": dataclasses.asdict(model_cfg),
        "deepspeed": ds_cfg,
        "origin": {k: v for k, v in origin.items() if v != "default"},
        "provenance": recipe.provenance(),
        "tokenizer": data.tokenizer,  # the fingerprint that resume, export and fine-tuning compare (identity)
    }


def resolved_config(
    cfg: TrainConfig, model_cfg, ds_cfg: dict, data, world: int, fast_paths: dict, origin: dict
) -> dict:
    """What this run is, printed at start and saved with every checkpoint."""
    resolved = {
        **recipe_record(cfg, origin, model_cfg, ds_cfg, data),
        "fast_paths": fast_paths,
        "world_size": world,
        "data": {"vocab_size": data.vocab_size, "train_samples": data.num_samples("train")},
    }
    log.info("resolved configuration:\n" + json.dumps(resolved, indent=2))
    if model_cfg.vocab_size - data.vocab_size > 64:  # more than rounding up to a multiple of 64 (30522 -> 30528)
        log.info(
            f"note: the model's vocab_size {model_cfg.vocab_size} exceeds the data's {data.vocab_size} ids; the extra "
            f"rows are never a target but cost MLM-decoder compute: --model-set vocab_size={data.vocab_size}"
        )
    return resolved


def rounded(record: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items() if k not in ("step", "split")}


def build_model(cfg: TrainConfig, model_cfg, init: str | None):
    """A fresh model from `--seed`, or with the weights of `--init-from` (not when resuming)."""
    from pretrain.runtime.weights import load_weights

    torch.manual_seed(cfg.seed)
    if not init:
        return build_pretraining_model(model_cfg, cfg.kernel_options())
    _, weights = load_weights(init, cfg.trust_checkpoint)
    source = f"--init-from {init} (use the --model it was trained with)"
    model = pretraining_from_state(model_cfg, weights, source, cfg.kernel_options())
    log.info(f"initialized weights from {init}")
    return model
