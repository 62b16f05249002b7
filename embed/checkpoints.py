"""Checkpoints, exact resume and the resolved configuration of `bert-embed train`: pretraining's machinery on
OUTPUT/checkpoints.

    OUTPUT/checkpoints/step_00000040/   a pretraining checkpoint tag (pretrain/runtime/checkpoint.py): engine,
                                        optimizer and scheduler state, each rank's RNG, checksums, COMPLETE
    OUTPUT/checkpoints/latest, run.lock the newest complete tag; the run's lock (pretrain/runlock.py)

Design choices:
- Nothing here writes or reads a checkpoint file itself: saving is `pretrain.runtime.checkpoint.save` (checksums,
  fsync, COMPLETE last, loss marks, pruning by --keep-last) and loading `pretrain.runtime.resume.resume` (the
  newest tag every rank can read, verified against its checksums and loaded with weights_only=True unless
  --trust-checkpoint), so an embedding checkpoint is verified exactly as a pretraining one.
- The data position is the step: the order of an epoch is a seeded function of (epoch, --seed, batch, rank,
  world) (`finetune.run.epoch_order`), so step S resumes at batch S mod steps-per-epoch of epoch S div
  steps-per-epoch; dropout continues from the saved RNG states. A resumed run therefore logs the same losses
  and ends with the same weights as one never interrupted.
- What a run has learnt besides the weights (the --dev scores so far and the best epoch, which --best compares
  against) is `train_state.json`'s `config.progress`; the rest of `config` is the resolved configuration.
- A relaunch must be the same run: flags outside `RESUMABLE`, the DeepSpeed JSON's content, the training pairs
  (their count and SHA-256), the process count and the tokenizer (its fingerprint, pretrain.identity) are
  compared with the checkpoint's, and any difference is one line naming both sides, before any compute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from common.errors import UserError
from common.log import get_logger
from pretrain import identity
from pretrain.runtime import checkpoint, dist, resume
from pretrain.runtime.checkpoint import TrainState

log = get_logger(__name__)

DIRECTORY = "checkpoints"
# flags a relaunch may change: they take effect (the learning-rate schedule follows --epochs and --max-steps)
RESUMABLE = frozenset(
    {
        "epochs",
        "max_steps",
        "log_every",
        "save_every",
        "keep_last",
        "trust_checkpoint",
        "deepspeed_config",
        "allow_tokenizer_change",
        "print_recipe",
        "tokenizer",
    }
)  # fmt: skip  (--tokenizer: its path may change, its fingerprint is compared)


def pairs_fingerprint(pairs: list) -> dict:
    """What a resume compares the training data by: the pairs' count and the SHA-256 of their texts."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.query, p.positive, p.negatives]).encode())
    return {"pairs": len(pairs), "sha256": h.hexdigest()}


def resolved_config(cfg, config, ds: dict, tok_dir: str, pairs: list) -> dict:
    """What this run is, printed at start and saved with every checkpoint (as pretraining's recipe record): the
    flags (`embed`), the DeepSpeed JSON with --batch and --lr applied, the model config, the tokenizer entry with
    its fingerprint (pretrain.identity), the data's fingerprint and the provenance (code commit, versions)."""
    from pretrain import identity, recipe

    record = {
        "embed": dataclasses.asdict(cfg),
        "deepspeed": ds,
        "model": dataclasses.asdict(config),
        "tokenizer": identity.describe_tokenizer(tok_dir),
        "data": pairs_fingerprint(pairs),
        "world_size": dist.world_size(),
        "provenance": recipe.provenance(),
    }
    return json.loads(json.dumps(record))  # as a checkpoint's train_state.json gives it back (tuples are lists)


def directory(output: str) -> Path:
    return Path(output) / DIRECTORY


def starting_point(output: str, resolved: dict) -> tuple[str, TrainState] | None:
    """(tag, state) of the newest complete checkpoint of OUTPUT, checked against this launch's `resolved`
    configuration (see the module docstring); None for a fresh run."""
    save = directory(output)
    found = resume.starting_point(save) if save.is_dir() else None
    if found is None:
        return None
    tag, state = found
    saved, where = state.config, f"{save / tag}"
    refused = [
        f"--{k.replace('_', '-')} {v!r} -> {resolved['embed'].get(k)!r}"
        for k, v in saved.get("embed", {}).items()
        if k not in RESUMABLE and resolved["embed"].get(k) != v
    ]
    if saved.get("model") != resolved["model"]:
        refused.append("the model config (of --init-from)")
    if saved.get("deepspeed") != resolved["deepspeed"]:
        refused.append("the DeepSpeed JSON's content (with --batch and --lr applied)")
    if saved.get("data") != resolved["data"]:
        refused.append(f"the training pairs {saved.get('data')} -> {resolved['data']}")
    if state.world_size != resolved["world_size"]:
        refused.append(f"processes {state.world_size} -> {resolved['world_size']} (the contrastive batch spans them)")
    if refused:
        raise UserError(
            f"--output {output} holds a run ({where}) that differs: {'; '.join(refused)}; relaunch with its "
            "settings to resume, or pass a new --output"
        )
    identity.compare(
        saved.get("tokenizer"),
        resolved["tokenizer"],
        where,
        "this launch's tokenizer",
        resolved["embed"]["allow_tokenizer_change"],
    )
    return found


def load(engine, output: str, trust: bool) -> TrainState:
    """The newest good checkpoint of OUTPUT into `engine` (collective; falls back past damaged tags)."""
    got = resume.resume(engine, directory(output), trust)
    if got is None:
        raise UserError(f"no checkpoint in {directory(output)} could be loaded; pass a new --output to start afresh")
    tag, state = got
    log.info(f"resumed from {directory(output) / tag} at step {state.step}")
    return state


def save(engine, output: str, state: TrainState, keep: checkpoint.Retention, watch) -> None:
    """A checkpoint of the run now (collective; one of this step already there is rewritten)."""
    tag_dir = checkpoint.save(engine, directory(output), dataclasses.replace(state), keep=keep, watch=watch)
    if dist.is_rank0():
        log.info(f"saved {tag_dir}")


def progress(state: TrainState) -> dict:
    """The --dev history and best epoch kept in the checkpoint (created empty on a fresh run)."""
    return state.config.setdefault("progress", {"dev": [], "best": None, "done": False})


def finished_report(output: str) -> dict | None:
    """The report of a run that already finished in OUTPUT (a relaunch of the same command has nothing to do)."""
    path = Path(output) / "train_report.json"
    return json.loads(path.read_text()) if path.is_file() else None
