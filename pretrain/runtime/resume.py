"""Resume: the newest good checkpoint every rank can open, `--resume-from`, and loading it into the engine.

Resume is collective: the ranks take the newest tag every rank has and can open (its shared files and each rank's
own shards are checked and opened memory-mapped before anyone enters DeepSpeed's loading collectives), so they
never resume at different steps. `--resume-from TAG` pins the tag and sets the newer ones aside
(`ROLLBACK_FILE`). Layout and the rules for a good tag: pretrain/runtime/checkpoint.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

from common.errors import UserError
from common.files import write_text_atomic
from common.log import get_logger
from pretrain.runtime import dist, integrity, safe_load
from pretrain.runtime.checkpoint import (
    COMPLETE,
    STATE_FILE,
    TAG_RE,
    TrainState,
    complete_tags,
    newest,
    read_state,
    set_rng_state,
    tag_step,
    tags,
    warn_unverified,
)

log = get_logger(__name__)

_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)")


ROLLBACK_FILE = "rollback.json"


def _tag_key(tag: str) -> int:
    """Order of preference among tags, the same on every rank: newer first, a universal copy before its original."""
    m = TAG_RE.match(tag)
    return 2 * int(m.group(1)) + bool(m.group(2))


def rank_files(tag_dir: Path, rank: int | None) -> list[Path]:
    """The .pt files of `tag_dir` that `rank` opens (its own and the shared ones); None: all of them."""
    out = []
    for f in sorted(tag_dir.rglob("*.pt")):
        m = _RANK_FILE.search(f.name)
        if rank is None or m is None or int(m.group(1)) == rank:
            out.append(f)
    return out


def _readable(tag_dir: Path, rank: int, trust: bool) -> tuple[str | None, str | None]:
    """(why this rank cannot read its part of `tag_dir`, why it refuses to) or (None, None).

    The state and this rank's files are checked against their checksums; then each file is opened as DeepSpeed
    will open it, memory-mapped so that only its structure is read, and with `weights_only=True` unless `trust`:
    a damaged file fails here, before any rank enters the loading collectives, and a planted one before anything
    unpickles it unchecked."""
    try:
        read_state(tag_dir)
        why = integrity.verify(tag_dir, rank)
        if why:
            return why, None
        for f in rank_files(tag_dir, rank):
            safe_load.load(f, trust=trust, mmap=True)
    except safe_load.UntrustedCheckpoint as e:
        return None, str(e)
    except Exception as e:  # whatever a damaged file raises (zip, unpickling, I/O)
        return f"{type(e).__name__}: {e}".splitlines()[0], None
    return None, None


def rollback_target(save_dir: str | os.PathLike, resume_from: str | None) -> str | None:
    """The tag --resume-from pins, or None: also when this run already rolled back to it and has saved since
    (a supervisor relaunching the same command must not roll back again)."""
    if not resume_from:
        return None
    tag = Path(resume_from).name
    if not TAG_RE.match(tag) or not (Path(save_dir) / tag).is_dir():
        raise UserError(f"--resume-from {resume_from}: no checkpoint {tag} in --save {save_dir}; pass one of its tags")
    record = Path(save_dir) / ROLLBACK_FILE
    done = record.is_file() and json.loads(record.read_text()).get("tag") == tag
    if done and any(_tag_key(t) > _tag_key(tag) for t in complete_tags(save_dir, warn=False)):
        log.info(f"--resume-from {tag}: rolled back already ({record}); resuming from the newest good checkpoint")
        return None
    return tag


def _set_aside_newer(save_dir: Path, tag: str) -> None:
    """After a rollback to `tag`: move the newer tags into SAVE/abandoned/ (nothing is deleted) and record it."""
    newer = [t for t in tags(save_dir) if tag_step(t) > tag_step(tag)]
    if newer:
        aside = save_dir / "abandoned"
        aside.mkdir(exist_ok=True)
        for t in newer:
            dst, n = aside / t, 1
            while dst.exists():
                dst, n = aside / f"{t}.{n}", n + 1
            os.replace(save_dir / t, dst)
        log.info(f"rolled back to {tag}: moved {', '.join(newer)} into {aside}")
    write_text_atomic(save_dir / ROLLBACK_FILE, json.dumps({"tag": tag}))
    write_text_atomic(save_dir / "latest", tag)


def resume(
    engine, save_dir: str | os.PathLike, trust: bool = False, only: str | None = None
) -> tuple[str, TrainState] | None:
    """Load the newest good checkpoint that every rank can read: (its tag, state), or None when there is none.
    Collective. `only`: that tag (or its universal copy) and no other (--resume-from); `trust`: skip the
    weights_only check (--trust-checkpoint).

    The ranks agree on one tag: they propose their newest complete, unmarked tag, take the oldest proposal (the
    newest every rank has), and load it only when every rank can read its part of it (checksums, safe load);
    otherwise all of them pass it over. One damaged shard therefore sends every rank back to the same older
    checkpoint, never some ranks. A file that fails the safe-load check stops every rank with one line.
    """
    rank, save_dir = dist.rank(), Path(save_dir)
    keys = {}
    for tag in tags(save_dir):
        if only and tag not in (only, f"{only}_universal"):
            continue
        why = problem_before_hashing(save_dir / tag)
        if why and not (only and why.startswith("saved at")):
            if rank == 0:
                warnings.warn(f"skipping checkpoint {save_dir / tag}: {why}", stacklevel=2)
            continue
        keys[_tag_key(tag)] = tag
    bound, tried = math.inf, []
    while True:
        agreed = int(dist.all_reduce([max((k for k in keys if k < bound), default=-1)], op="min")[0])
        if agreed < 0:
            break
        tag = keys.get(agreed)
        why, refused = _readable(save_dir / tag, rank, trust) if tag else ("missing on this rank", None)
        failed, untrusted = dist.all_reduce([float(why is not None), float(refused is not None)])
        if untrusted:
            raise UserError(refused or f"another rank refused to load {save_dir / str(tag)}; {safe_load.TRUST_HINT}")
        if not failed:
            if rank == 0:
                warn_unverified(save_dir / tag)
                if integrity.mark(save_dir / tag):
                    warnings.warn(
                        f"--resume-from {tag}: {integrity.mark(save_dir / tag)}; loading it as asked", stacklevel=2
                    )
            state = _load(engine, save_dir / tag, rank, trust)
            if rank == 0 and only:
                _set_aside_newer(save_dir, only)
            return tag, state
        if why is not None and rank != 0:
            warnings.warn(f"rank {rank} cannot read checkpoint {save_dir}/{tag or agreed // 2}: {why}", stacklevel=2)
        if rank == 0:
            warnings.warn(
                f"skipping checkpoint {save_dir}/{tag}: {why or f'{int(failed)} rank(s) cannot read it'}", stacklevel=2
            )
        tried.append(tag or str(agreed // 2))
        bound = agreed
    if only:
        raise UserError(f"--resume-from {only}: that checkpoint in {save_dir} cannot be loaded; see the warning above")
    if tried:
        raise UserError(
            f"no checkpoint in {save_dir} could be loaded (tried {', '.join(tried)}); "
            "move the damaged ones away to start afresh, or pass a new --save directory"
        )
    return None


def problem_before_hashing(tag_dir: Path) -> str | None:
    """Why a tag is passed over before its files are read: incomplete or marked."""
    if not ((tag_dir / COMPLETE).is_file() and (tag_dir / STATE_FILE).is_file()):
        return f"incomplete (no {COMPLETE} marker)"
    return integrity.mark(tag_dir)


def starting_point(save_dir: str | os.PathLike, resume_from: str | None = None) -> tuple[str, TrainState] | None:
    """(tag, state) a launch resumes from as far as the JSON files tell (`resume` then reads and hashes the
    files, and may fall back further): --resume-from's tag, else the newest complete, unmarked one."""
    only = rollback_target(save_dir, resume_from)
    if only is None:
        return newest(save_dir, warn=False)
    tag_dir = Path(save_dir) / only
    if not ((tag_dir / COMPLETE).is_file() and (tag_dir / STATE_FILE).is_file()):
        raise UserError(f"--resume-from {only}: {tag_dir} is incomplete (no {COMPLETE} marker); pick another tag")
    return only, read_state(tag_dir)


def _load(engine, tag_dir: Path, rank: int, trust: bool = False) -> TrainState:
    """Every rank loads `tag_dir` (which every rank can read) into the engine; the RNG states when they fit."""
    state = read_state(tag_dir)
    path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None:
        raise UserError(f"DeepSpeed found nothing to load in {tag_dir}; move it away and relaunch")
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if state.world_size == dist.world_size() and rng_file.is_file():
        set_rng_state(safe_load.load(rng_file, trust=trust))
    return state


def partitioned(tag_dir: Path) -> bool:
    """Whether a checkpoint's optimizer state is split over its ranks (ZeRO 1-3, and bf16 at any stage: DeepSpeed's
    bf16 optimizer partitions like ZeRO-1), so that another process count needs the universal format."""
    return any(Path(tag_dir).glob("*_optim_states.pt"))


def load_optimizer_state(engine, tag_dir: Path, trust: bool = False) -> None:
    """The optimizer state of `tag_dir` into `engine` (--init-optimizer), keeping this run's hyperparameters
    (learning rate, betas, weight decay: the JSON's) and its fresh schedule. Collective."""
    why = integrity.verify(tag_dir, dist.rank())
    if why:
        raise UserError(f"--init-optimizer: {tag_dir} fails verification ({why}); pass another --init-from tag")
    safe_load.check_all(rank_files(tag_dir, dist.rank()), trust)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    path, _ = engine.load_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise UserError(f"--init-optimizer: DeepSpeed found nothing to load in {tag_dir}")
    for group, values in zip(engine.optimizer.param_groups, hyper):
        group.update(values)
