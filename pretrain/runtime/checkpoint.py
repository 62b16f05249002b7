"""Checkpoints: save, resume from the newest good one, prune, convert to universal, load weights only.

Layout of a `--save DIR`:

    DIR/step_00000100/            one DeepSpeed tag per save (engine, optimizer and scheduler state)
        train_state.json          TrainState + the resolved configuration (model, data, DeepSpeed JSON)
        rng_rank{R}.pt            each rank's RNG states (dropout), so a resume replays the same masks
        checksums_rank{R}.json    XXH3-128 of every file rank R wrote; rank 0's also holds the step's loss and
                                  its mark (non-finite or spiking loss) (pretrain.runtime.integrity)
        COMPLETE                  written after every rank has finished writing and fsyncing: marks the tag usable
    DIR/step_00000100_universal/  the same after `python -m pretrain.runtime.checkpoint to-universal DIR`
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

import argparse
import dataclasses
import errno
import gc
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError, run_cli
from common.files import write_text_atomic
from common.log import get_logger
from pretrain.runtime import dist, integrity, safe_load

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


_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)")
ROLLBACK_FILE = "rollback.json"


def _tag_key(tag: str) -> int:
    """Order of preference among tags, the same on every rank: newer first, a universal copy before its original."""
    m = TAG_RE.match(tag)
    return 2 * int(m.group(1)) + bool(m.group(2))


def _rank_files(tag_dir: Path, rank: int | None) -> list[Path]:
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
        for f in _rank_files(tag_dir, rank):
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
    safe_load.check_all(_rank_files(tag_dir, dist.rank()), trust)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    path, _ = engine.load_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise UserError(f"--init-optimizer: DeepSpeed found nothing to load in {tag_dir}")
    for group, values in zip(engine.optimizer.param_groups, hyper):
        group.update(values)


def to_universal(save_dir: str | os.PathLike, tag: str | None = None, trust: bool = False) -> Path:
    """Convert a ZeRO checkpoint into DeepSpeed's universal format (loadable by any number of processes).

    Writes `DIR/<tag>_universal` with our train state and COMPLETE marker, and points `latest` at it, so the
    next launch (with any process count) resumes from it.
    """
    save_dir = Path(save_dir)
    if tag is None:
        found = [t for t in complete_tags(save_dir) if not t.endswith("_universal") and not problem(save_dir / t)]
        if not found:
            raise UserError(f"{save_dir} holds no good checkpoint to convert; pass the --save directory of a run")
        tag = found[0]
    src, dst = save_dir / tag, save_dir / f"{tag}_universal"
    read_state(src)
    why = problem(src)
    if why:
        raise UserError(f"cannot convert {src}: {why}")
    safe_load.check_all(_rank_files(src, None), trust)  # ds_to_universal unpickles them unchecked
    if not partitioned(src):
        raise UserError(
            f"{src} holds its optimizer state whole (ZeRO stage 0 in fp32): any number of processes loads it as "
            "it is, nothing to convert"
        )
    if dst.exists():
        shutil.rmtree(dst)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src)]
    cmd += ["--output_folder", str(dst), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"ds_to_universal failed on {src}: {proc.stderr.strip().splitlines()[-1:]}")
    shutil.copy(src / STATE_FILE, dst / STATE_FILE)
    integrity.write_checksums(dst, 0, 1)
    write_text_atomic(dst / COMPLETE, "")
    integrity.fsync_dir(dst)
    write_text_atomic(save_dir / "latest", dst.name)
    integrity.fsync_dir(save_dir)
    return dst


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")
    )


def load_weights(path: str | os.PathLike, trust: bool = False):
    """(model config, fp32 weights with transformers' names, the keys it stores once filled in) from a --save
    directory (its newest good checkpoint, one warning per skipped one), one checkpoint tag directory (refused
    with one line when it fails verification), or a Hugging Face directory of either family. `trust`: skip the
    weights_only check of the checkpoint's files (--trust-checkpoint).

    A checkpoint gives its fp32 master weights whatever its precision and ZeRO stage (`master_weights`); a
    checkpoint that holds nothing but 16-bit weights is refused with one line, never silently rounded."""
    from pretrain.models import config_from_dict, from_hf_pretrained

    p = Path(path)
    if _is_hf_dir(p):
        model = from_hf_pretrained(str(p))
        return model.config, {k: v.float() for k, v in model.state_dict().items()}
    if not (p / STATE_FILE).is_file():
        found = newest_good(p) if p.is_dir() else None
        if found is None:
            if p.is_dir() and tags(p):
                raise UserError(f"{p} holds no good checkpoint (see the warnings above); pass one tag directory")
            raise UserError(f"{p} is neither a checkpoint (--save directory or tag) nor a Hugging Face model directory")
        p = p / found
    else:
        why = problem(p)
        if why and why == integrity.mark(p):
            warnings.warn(f"{p} is {why}; loading it as asked", stacklevel=2)
        elif why:
            raise UserError(f"checkpoint {p} fails verification: {why}; pass another tag or the --save directory")
    warn_unverified(p)
    config = config_from_dict(read_state(p).config["model"], keep_switches=False)
    weights = {k: v.detach().float().clone() for k, v in master_weights(p, trust).items()}
    return config, config.pretraining_class().with_tied(weights)


def master_weights(tag_dir: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 copy of the weights in one checkpoint tag (transformers' names).

    - universal checkpoints: their per-parameter fp32 files;
    - optimizer states in `*_optim_states.pt` (ZeRO 1-3 in any precision, and bf16 at stage 0, whose
      DeepSpeed optimizer partitions like ZeRO-1 and names its files `bf16_zero_pp_rank_*`): DeepSpeed's own
      reconstruction, `zero_to_fp32`;
    - stage 0: the module's weights when they are fp32, else the fp16 optimizer's fp32 groups.
    """
    if tag_dir.name.endswith("_universal"):
        return _universal_weights(tag_dir, trust)
    if partitioned(tag_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        safe_load.check_all(_rank_files(tag_dir, None), trust)  # zero_to_fp32 unpickles them unchecked
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if not (tag_dir / "mp_rank_00_model_states.pt").is_file():
        raise UserError(
            f"{tag_dir} holds neither optimizer state nor whole model weights; is it a complete checkpoint?"
        )
    states = safe_load.load(tag_dir / "mp_rank_00_model_states.pt", trust=trust)
    module = states["module"]
    low = {v.dtype for v in module.values() if v.is_floating_point() and v.dtype != torch.float32}
    if not low:
        return module
    masters = _fp16_optimizer_masters(states)
    if masters is None:
        raise UserError(
            f"{tag_dir} holds only {', '.join(sorted(map(str, low)))} weights and no fp32 master copy (the optimizer "
            "state is missing); restore the checkpoint's optimizer files, which hold the fp32 weights"
        )
    return masters


def _fp16_optimizer_masters(states: dict) -> dict[str, torch.Tensor] | None:
    """Stage 0 in fp16/bf16: DeepSpeed's fp16 optimizers keep the fp32 masters per param group, one tensor each
    (`fp32_groups`) or one flat tensor per group (`fp32_groups_flat`). The groups are those of
    `pretrain.runtime.engine.param_groups` (matrices, then vectors), each in the module's parameter order, which is the
    order of the saved state dict without its buffers and without the second name of a tied weight."""
    optimizer, module = states.get("optimizer") or {}, states["module"]
    if "fp32_groups" in optimizer:
        flats = [torch.cat([t.flatten() for t in group]) for group in optimizer["fp32_groups"]]
    elif "fp32_groups_flat" in optimizer:
        flats = list(optimizer["fp32_groups_flat"])
    else:
        return None
    buffers, seen, params = set(states.get("buffer_names") or ()), set(), []
    for name, t in module.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if name not in buffers and key not in seen:
            seen.add(key)
            params.append((name, t.shape))
    groups = [[p for p in params if len(p[1]) >= 2], [p for p in params if len(p[1]) < 2]]
    out = {}
    for group, flat in zip(groups, flats):
        offset = 0
        for name, shape in group:
            out[name] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
    return out


def _universal_weights(tag_dir: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for f in (tag_dir / "zero").glob("*/fp32.pt"):
        t = safe_load.load(f, trust=trust)
        out[f.parent.name] = t["param"] if isinstance(t, dict) else t
    return out


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.runtime.checkpoint",
        description="Checkpoint tools. to-universal: convert the newest ZeRO checkpoint of a --save directory "
        "into DeepSpeed's universal format, so the same run can resume on a different number of processes.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("to-universal", help="convert a ZeRO checkpoint to the universal format")
    conv.add_argument("save_dir", help="the run's --save directory")
    conv.add_argument("--tag", help="checkpoint tag to convert (default: newest good)")
    conv.add_argument(
        "--trust-checkpoint", action="store_true", help="skip the safe-load check (pretrain.runtime.safe_load)"
    )
    args = parser.parse_args(argv)
    dst = to_universal(args.save_dir, args.tag, args.trust_checkpoint)
    log.info(f"wrote {dst}; relaunch the run with any number of processes to resume from it")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(_main))
