"""Checkpoints: save, resume from the newest good one, prune, convert to universal, load weights only.

Layout of a `--save DIR`:

    DIR/step_00000100/            one DeepSpeed tag per save (engine, optimizer and scheduler state)
        train_state.json          TrainState + the resolved configuration (model, data, DeepSpeed JSON)
        rng_rank{R}.pt            each rank's RNG states (dropout), so a resume replays the same masks
        checksums_rank{R}.json    XXH3-128 of every file rank R wrote; rank 0's also holds the step's loss and
                                  its mark (non-finite or spiking loss) (pretrain.runtime.integrity)
        COMPLETE                  written after every rank has finished writing and fsyncing: marks the tag usable
    DIR/step_00000100_universal/  the same after `python -m pretrain.checkpoint to-universal DIR`
    DIR/latest                    name of the newest complete tag; written last, atomically (rename)
    DIR/metrics.jsonl             (pretrain.train)

Design choices:
- DeepSpeed's own `latest` file is not used (`save_latest=False`): it is written before the other ranks are
  known to be done, so a crash can leave it pointing at half a checkpoint. Resume takes the newest *good* tag:
  COMPLETE, not marked as saved at a bad loss, matching its checksums and passing the safe-load check
  (pretrain.runtime.safe_load); it falls back to an older tag with one warning per skipped one. A tag older than
  checksums is accepted with a warning. `--resume-from TAG` pins the tag and sets the newer ones aside.
- Pruning (--keep-last K) keeps the newest K good tags, every --keep-every milestone, and the tag the run
  resumed from; it deletes only tags older than the oldest kept good one, so a damaged or marked newest tag
  never makes it delete the good ones. Each tag is hashed at most once per launch (`Retention.verified`).
- A full disk during a save is one line ("no space left on device: ..."); the partial tag is removed and the
  previous checkpoint, written and fsynced before, stays the one a relaunch resumes from.
- Nothing is unpickled unchecked: every file is loaded with `weights_only=True` first (pretrain.runtime.safe_load),
  also before DeepSpeed's own loaders open it; `trust=True` (--trust-checkpoint) skips that check.
- Samples are a pure function of the global sample index (pretrain.data), so the data-pipeline position
  is just `consumed_samples`; no loader state is saved.
- `load_weights` reads any checkpoint, whatever its ZeRO stage, through the fp32 master weights
  (`deepspeed.utils.zero_to_fp32`) when the optimizer was partitioned, else the module state.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.files import write_text_atomic
from common.log import get_logger
from pretrain.runtime import dist, integrity

log = get_logger(__name__)

TAG_RE = re.compile(r"^step_(\d{8})(_universal)?$")
COMPLETE = "COMPLETE"
STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    """Everything the loop needs to continue exactly where it stopped (beyond the engine's own state)."""

    step: int = 0
    """Optimizer steps done."""
    consumed_samples: int = 0
    """Global training samples consumed: the data pipeline's position."""
    elapsed_s: float = 0.0
    """Training wall-clock seconds so far, summed over resumes (drives --time-budget)."""
    world_size: int = 1
    """Processes that wrote the checkpoint (a different count needs the universal conversion)."""
    config: dict = field(default_factory=dict)
    """The resolved configuration: train flags, model config, DeepSpeed JSON."""


@dataclass
class Retention:
    """What `prune` keeps; the run holds one, so that each older tag is verified at most once per launch."""

    keep_last: int = 0
    """--keep-last: the newest K good checkpoints (0: keep all)."""
    keep_every: int = 0
    """--keep-every: also every checkpoint whose step is a multiple of N (0: none)."""
    protect: set[str] = field(default_factory=set)
    """Tags this launch never deletes: the one it resumed from."""
    verified: dict[str, bool] = field(default_factory=dict)
    """tag -> whether it is good (`problem` is None), as found once."""


def tag_name(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def tags(save_dir: str | os.PathLike) -> list[str]:
    """Tag directories in `save_dir`, newest step first (a universal copy before its original)."""
    found = []
    d = Path(save_dir)
    if d.is_dir():
        for p in d.iterdir():
            m = TAG_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), bool(m.group(2)), p.name))
    return [name for _, _, name in sorted(found, reverse=True)]


def complete_tags(save_dir: str | os.PathLike, warn: bool = True) -> list[str]:
    """Complete tags, newest first; incomplete ones are named in a warning."""
    good = []
    for tag in tags(save_dir):
        tag_dir = Path(save_dir) / tag
        if (tag_dir / COMPLETE).is_file() and (tag_dir / STATE_FILE).is_file():
            good.append(tag)
        elif warn:
            warnings.warn(f"skipping incomplete checkpoint {tag_dir} (no {COMPLETE} marker)", stacklevel=2)
    return good


def is_complete(save_dir: str | os.PathLike, step: int) -> bool:
    """Whether the checkpoint of `step` in `save_dir` is complete (every rank wrote it)."""
    tag_dir = Path(save_dir) / tag_name(step)
    return (tag_dir / COMPLETE).is_file() and (tag_dir / STATE_FILE).is_file()


def read_state(tag_dir: str | os.PathLike) -> TrainState:
    path = Path(tag_dir) / STATE_FILE
    try:
        return TrainState(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{path} is unreadable ({e}); delete that checkpoint directory") from e


def save(
    engine,
    save_dir: str | os.PathLike,
    state: TrainState,
    keep_last: int | None = None,
    *,
    keep: Retention | None = None,
    watch: integrity.LossWatch | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the tag directory. `watch`: the run's recent losses, which mark
    the checkpoint when its step's loss was non-finite or a spike; `keep` (or just `keep_last`): pruning."""
    rank = dist.rank()
    tag = tag_name(state.step)
    save_dir = Path(save_dir)
    tag_dir = save_dir / tag
    keep = keep if keep is not None else Retention(keep_last=keep_last or 0)
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a leftover of a crash at this very step
    dist.barrier()
    from deepspeed.checkpoint import constants as ds

    # what ds_to_universal needs to know about the model (no tensor parallelism here: the version only)
    client = {"train_step": state.step, ds.UNIVERSAL_CHECKPOINT_INFO: {ds.UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.4}}
    mark = watch.mark() if watch is not None else None
    try:
        engine.save_checkpoint(str(save_dir), tag=tag, client_state=client, save_latest=False)
        torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
        if rank == 0:
            write_text_atomic(tag_dir / STATE_FILE, json.dumps(dataclasses.asdict(state), indent=2))
        integrity.write_checksums(tag_dir, rank, dist.world_size(), watch.last if watch else None, mark)
        dist.barrier()
        if rank == 0:
            write_text_atomic(tag_dir / COMPLETE, "")
            integrity.fsync_dir(tag_dir)
            write_text_atomic(save_dir / "latest", tag)
            integrity.fsync_dir(save_dir)
    except Exception as e:
        if not _disk_full(e, save_dir):
            raise
        full = True
    else:
        full = False
    if full:  # outside the handler: the failed writer (held by the traceback's frames) has closed its file
        gc.collect()
        raise _full_disk_error(save_dir, tag_dir, rank)
    if rank == 0:
        keep.verified[tag] = mark is None
        if mark:
            warnings.warn(f"{tag_dir} is {mark}: resume and --keep-last will not count it as good", stacklevel=2)
        if keep.keep_last:
            prune(save_dir, keep)
        low = low_disk_warning(save_dir, tag_dir)
        if low:
            warnings.warn(low, stacklevel=2)
    dist.barrier()
    return tag_dir


def _disk_full(e: BaseException, save_dir: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC, or (torch.save's RuntimeError carries no errno) a file
    system with less than 1 MiB left after the failure."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(save_dir).free < 2**20
    except OSError:
        return False


def _full_disk_error(save_dir: Path, tag_dir: Path, rank: int) -> UserError:
    """The one-line error of a save that filled the disk; rank 0 removes the partial tag first (the previous
    checkpoint is untouched: it was complete and fsynced before this save began)."""
    written = size_on_disk(tag_dir) if tag_dir.is_dir() else 0
    previous = next((t for t in complete_tags(save_dir, warn=False) if t != tag_dir.name), None)
    need = max(size_on_disk(save_dir / previous) if previous else 0, written)
    if rank == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)
    free = shutil.disk_usage(save_dir).free
    kept = f"{save_dir / previous} is intact and a relaunch resumes from it" if previous else "no earlier checkpoint"
    return UserError(
        f"no space left on device: the checkpoint needs {integrity.human_bytes(need)}, "
        f"{integrity.human_bytes(free)} free under {save_dir}; free space there or lower --keep-last ({kept})"
    )


def low_disk_warning(save_dir: str | os.PathLike, tag_dir: Path) -> str | None:
    """A warning when the file system of `save_dir` lacks room for one more checkpoint like `tag_dir`.

    A new checkpoint is written before older ones are pruned, so the next save needs a checkpoint's size free;
    saying so at the save before, and not when the disk is full days into a run, leaves time to act.
    """
    size = size_on_disk(tag_dir)
    free = shutil.disk_usage(save_dir).free
    if free >= size:
        return None
    return (
        f"{integrity.human_bytes(free)} free under {save_dir} but a checkpoint takes {integrity.human_bytes(size)}: "
        "the next save is likely to fail; free space there or lower --keep-last (the newest good checkpoint stays "
        "usable)"
    )


def size_on_disk(tag_dir: Path) -> int:
    """Bytes of every file of one checkpoint tag."""
    return sum(f.stat().st_size for f in tag_dir.rglob("*") if f.is_file())


def prune(save_dir: str | os.PathLike, keep: Retention | int) -> None:
    """Delete the tags older than the newest `keep.keep_last` good ones, except milestones (--keep-every) and
    the protected ones (the tag the run resumed from). Tags newer than the oldest kept good one stay, damaged
    or not: a bad newest tag never costs a good one."""
    keep = keep if isinstance(keep, Retention) else Retention(keep_last=keep)
    if not keep.keep_last:
        return
    good = []
    for tag in tags(save_dir):
        if tag not in keep.verified:
            keep.verified[tag] = problem(Path(save_dir) / tag) is None
        if keep.verified[tag]:
            good.append(tag)
            if len(good) == keep.keep_last:
                break
    if not good:
        return
    oldest_kept = tag_step(good[-1])
    for tag in tags(save_dir):
        step = tag_step(tag)
        milestone = keep.keep_every and step % keep.keep_every == 0
        if tag in good or tag in keep.protect or milestone or step >= oldest_kept:
            continue
        shutil.rmtree(Path(save_dir) / tag, ignore_errors=True)
        keep.verified.pop(tag, None)


def newest(save_dir: str | os.PathLike, warn: bool = True) -> tuple[str, TrainState] | None:
    """(tag, state) of the newest complete, unmarked checkpoint in `save_dir`, or None (files not hashed)."""
    for tag in complete_tags(save_dir, warn=warn):
        if integrity.mark(Path(save_dir) / tag):
            continue
        try:
            return tag, read_state(Path(save_dir) / tag)
        except UserError as e:
            if warn:
                warnings.warn(f"skipping unreadable checkpoint {Path(save_dir) / tag}: {e}", stacklevel=2)
    return None


def problem(tag_dir: Path, rank: int | None = None) -> str | None:
    """Why `tag_dir` is not a good checkpoint (incomplete, marked, unreadable state, damaged files), or None.
    `rank`: check only the files that rank reads; None: all of them."""
    tag_dir = Path(tag_dir)
    if not ((tag_dir / COMPLETE).is_file() and (tag_dir / STATE_FILE).is_file()):
        return f"incomplete (no {COMPLETE} marker)"
    why = integrity.mark(tag_dir)
    if why:
        return why
    try:
        read_state(tag_dir)
    except UserError as e:
        return str(e)
    return integrity.verify(tag_dir, rank)


def newest_good(save_dir: str | os.PathLike, warn: bool = True) -> str | None:
    """The newest tag of `save_dir` that is good (every file hashed), with one warning per skipped tag; None if
    there is none."""
    for tag in tags(save_dir):
        why = problem(Path(save_dir) / tag)
        if why is None:
            return tag
        if warn:
            warnings.warn(f"skipping checkpoint {Path(save_dir) / tag}: {why}", stacklevel=2)
    return None


def warn_unverified(tag_dir: Path) -> None:
    """One warning when `tag_dir` was written before checksums existed (loaded unverified)."""
    if not integrity.has_checksums(tag_dir):
        warnings.warn(f"{tag_dir} has no checksums (written by an older version); loading it unverified", stacklevel=3)
