"""Checkpoints: save, resume from the newest complete one, prune, convert to universal, load weights only.

Layout of a `--save DIR`:

    DIR/step_00000100/            one DeepSpeed tag per save (engine, optimizer and scheduler state)
        train_state.json          TrainState + the resolved configuration (model, data, DeepSpeed JSON)
        rng_rank{R}.pt            each rank's RNG states (dropout), so a resume replays the same masks
        COMPLETE                  written after every rank has finished writing: marks the tag as usable
    DIR/step_00000100_universal/  the same after `python -m pretrain.checkpoint to-universal DIR`
    DIR/latest                    name of the newest complete tag; written last, atomically (rename)
    DIR/metrics.jsonl             (pretrain.train)

Design choices:
- DeepSpeed's own `latest` file is not used (`save_latest=False`): it is written before the other ranks are
  known to be done, so a crash can leave it pointing at half a checkpoint. Resume trusts the COMPLETE marker,
  newest first, and falls back to an older tag (with a warning naming the skipped one) when a tag is
  incomplete or fails to load.
- Samples are a pure function of the global sample index (pretrain.data), so the data-pipeline position
  is just `consumed_samples`; no loader state is saved.
- `load_weights` reads any checkpoint, whatever its ZeRO stage, through the fp32 master weights
  (`deepspeed.utils.zero_to_fp32`) when the optimizer was partitioned, else the module state.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from data_prep.errors import UserError, run_cli
from data_prep.files import write_text_atomic
from data_prep.log import get_logger
from pretrain import dist

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


def tag_name(step: int) -> str:
    return f"step_{step:08d}"


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


def save(engine, save_dir: str | os.PathLike, state: TrainState, keep_last: int | None = None) -> Path:
    """Collective: every rank calls it. Returns the tag directory."""
    rank = dist.rank()
    tag = tag_name(state.step)
    tag_dir = Path(save_dir) / tag
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a leftover of a crash at this very step
    dist.barrier()
    from deepspeed.checkpoint import constants as ds

    # what ds_to_universal needs to know about the model (no tensor parallelism here: the version only)
    client = {"train_step": state.step, ds.UNIVERSAL_CHECKPOINT_INFO: {ds.UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.4}}
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client, save_latest=False)
    torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        write_text_atomic(tag_dir / STATE_FILE, json.dumps(dataclasses.asdict(state), indent=2))
        write_text_atomic(tag_dir / COMPLETE, "")
        write_text_atomic(Path(save_dir) / "latest", tag)
        if keep_last:
            prune(save_dir, keep_last)
        low = low_disk_warning(save_dir, tag_dir)
        if low:
            warnings.warn(low, stacklevel=2)
    dist.barrier()
    return tag_dir


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
        f"{free / 2**30:.2f} GiB free under {save_dir} but a checkpoint takes {size / 2**30:.2f} GiB: the next save "
        "is likely to fail; free space there or lower --keep-last (the newest complete checkpoint stays usable)"
    )


def size_on_disk(tag_dir: Path) -> int:
    """Bytes of every file of one checkpoint tag."""
    return sum(f.stat().st_size for f in tag_dir.rglob("*") if f.is_file())


def prune(save_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (and incomplete ones older than those)."""
    keep = complete_tags(save_dir, warn=False)[:keep_last]
    if not keep:
        return
    oldest_kept = int(TAG_RE.match(keep[-1]).group(1))
    for tag in tags(save_dir):
        if tag not in keep and int(TAG_RE.match(tag).group(1)) < oldest_kept:
            shutil.rmtree(Path(save_dir) / tag, ignore_errors=True)


def newest(save_dir: str | os.PathLike) -> tuple[str, TrainState] | None:
    """(tag, state) of the newest complete checkpoint in `save_dir`, or None."""
    for tag in complete_tags(save_dir):
        try:
            return tag, read_state(Path(save_dir) / tag)
        except UserError as e:
            warnings.warn(f"skipping unreadable checkpoint {Path(save_dir) / tag}: {e}", stacklevel=2)
    return None


_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)")


def _tag_key(tag: str) -> int:
    """Order of preference among tags, the same on every rank: newer first, a universal copy before its original."""
    m = TAG_RE.match(tag)
    return 2 * int(m.group(1)) + bool(m.group(2))


def _readable(tag_dir: Path, rank: int) -> str | None:
    """None when this rank can read its part of `tag_dir` (the shared files and its own shards), else why not.

    Each file is opened as DeepSpeed will open it, memory-mapped so that only its structure is read: a
    truncated or overwritten file fails here, before any rank enters the loading collectives."""
    try:
        read_state(tag_dir)
        for f in sorted(tag_dir.rglob("*.pt")):
            m = _RANK_FILE.search(f.name)
            if m is None or int(m.group(1)) == rank:
                torch.load(f, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # whatever a damaged file raises (zip, unpickling, I/O)
        return f"{type(e).__name__}: {e}"
    return None


def resume(engine, save_dir: str | os.PathLike) -> TrainState | None:
    """Load the newest checkpoint that every rank can read; None when there is none. Collective.

    The ranks agree on one tag: they propose their newest complete tag, take the oldest proposal (the newest
    every rank has), and load it only when every rank can read its part of it; otherwise all of them pass it
    over. One damaged shard therefore sends every rank back to the same older checkpoint, never some ranks.
    """
    rank = dist.rank()
    keys = {_tag_key(t): t for t in complete_tags(save_dir, warn=rank == 0)}
    bound, tried = math.inf, []
    while True:
        agreed = int(dist.all_reduce([max((k for k in keys if k < bound), default=-1)], op="min")[0])
        if agreed < 0:
            break
        tag = keys.get(agreed)
        problem = _readable(Path(save_dir) / tag, rank) if tag else "missing on this rank"
        failed = int(dist.all_reduce([float(problem is not None)])[0])
        if not failed:
            return _load(engine, Path(save_dir) / tag, rank)
        if problem is not None:
            warnings.warn(
                f"rank {rank} cannot read checkpoint {save_dir}/{tag or agreed // 2}: {problem}", stacklevel=2
            )
        if rank == 0:
            warnings.warn(
                f"skipping unreadable checkpoint {save_dir}/{tag} ({failed} rank(s) cannot read it)", stacklevel=2
            )
        tried.append(tag or str(agreed // 2))
        bound = agreed
    if tried:
        raise UserError(
            f"no checkpoint in {save_dir} could be loaded (tried {', '.join(tried)}); "
            "move the damaged ones away to start afresh, or pass a new --save directory"
        )
    return None


def _load(engine, tag_dir: Path, rank: int) -> TrainState:
    """Every rank loads `tag_dir` (which every rank can read) into the engine; the RNG states when they fit."""
    state = read_state(tag_dir)
    path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None:
        raise UserError(f"DeepSpeed found nothing to load in {tag_dir}; move it away and relaunch")
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if state.world_size == dist.world_size() and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def partitioned(tag_dir: Path) -> bool:
    """Whether a checkpoint's optimizer state is split over its ranks (ZeRO 1-3, and bf16 at any stage: DeepSpeed's
    bf16 optimizer partitions like ZeRO-1), so that another process count needs the universal format."""
    return any(Path(tag_dir).glob("*_optim_states.pt"))


def load_optimizer_state(engine, tag_dir: Path) -> None:
    """The optimizer state of `tag_dir` into `engine` (--init-optimizer), keeping this run's hyperparameters
    (learning rate, betas, weight decay: the JSON's) and its fresh schedule. Collective."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    path, _ = engine.load_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise UserError(f"--init-optimizer: DeepSpeed found nothing to load in {tag_dir}")
    for group, values in zip(engine.optimizer.param_groups, hyper):
        group.update(values)


def to_universal(save_dir: str | os.PathLike, tag: str | None = None) -> Path:
    """Convert a ZeRO checkpoint into DeepSpeed's universal format (loadable by any number of processes).

    Writes `DIR/<tag>_universal` with our train state and COMPLETE marker, and points `latest` at it, so the
    next launch (with any process count) resumes from it.
    """
    save_dir = Path(save_dir)
    if tag is None:
        found = [t for t in complete_tags(save_dir) if not t.endswith("_universal")]
        if not found:
            raise UserError(f"{save_dir} holds no complete checkpoint to convert; pass the --save directory of a run")
        tag = found[0]
    src, dst = save_dir / tag, save_dir / f"{tag}_universal"
    read_state(src)
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
    write_text_atomic(dst / COMPLETE, "")
    write_text_atomic(save_dir / "latest", dst.name)
    return dst


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")
    )


def load_weights(path: str | os.PathLike):
    """(model config, fp32 weights with transformers' names, the keys it stores once filled in) from a --save
    directory (newest complete checkpoint), one checkpoint tag directory, or a Hugging Face directory of
    either family.

    A checkpoint gives its fp32 master weights whatever its precision and ZeRO stage (`master_weights`); a
    checkpoint that holds nothing but 16-bit weights is refused with one line, never silently rounded."""
    from pretrain.models import config_from_dict, from_hf_pretrained

    p = Path(path)
    if _is_hf_dir(p):
        model = from_hf_pretrained(str(p))
        return model.config, {k: v.float() for k, v in model.state_dict().items()}
    if not (p / STATE_FILE).is_file():
        found = newest(p) if p.is_dir() else None
        if found is None:
            raise UserError(f"{p} is neither a checkpoint (--save directory or tag) nor a Hugging Face model directory")
        p = p / found[0]
    config = config_from_dict(read_state(p).config["model"], keep_switches=False)
    weights = {k: v.detach().float().clone() for k, v in master_weights(p).items()}
    return config, config.pretraining_class().with_tied(weights)


def master_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 copy of the weights in one checkpoint tag (transformers' names).

    - universal checkpoints: their per-parameter fp32 files;
    - optimizer states in `*_optim_states.pt` (ZeRO 1-3 in any precision, and bf16 at stage 0, whose
      DeepSpeed optimizer partitions like ZeRO-1 and names its files `bf16_zero_pp_rank_*`): DeepSpeed's own
      reconstruction, `zero_to_fp32`;
    - stage 0: the module's weights when they are fp32, else the fp16 optimizer's fp32 groups.
    """
    if tag_dir.name.endswith("_universal"):
        return _universal_weights(tag_dir)
    if partitioned(tag_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if not (tag_dir / "mp_rank_00_model_states.pt").is_file():
        raise UserError(
            f"{tag_dir} holds neither optimizer state nor whole model weights; is it a complete checkpoint?"
        )
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
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
    `pretrain.engine.param_groups` (matrices, then vectors), each in the module's parameter order, which is the
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


def _universal_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in (tag_dir / "zero").glob("*/fp32.pt"):
        t = torch.load(f, map_location="cpu", weights_only=False)
        out[f.parent.name] = t["param"] if isinstance(t, dict) else t
    return out


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.checkpoint",
        description="Checkpoint tools. to-universal: convert the newest ZeRO checkpoint of a --save directory "
        "into DeepSpeed's universal format, so the same run can resume on a different number of processes.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("to-universal", help="convert a ZeRO checkpoint to the universal format")
    conv.add_argument("save_dir", help="the run's --save directory")
    conv.add_argument("--tag", help="checkpoint tag to convert (default: newest complete)")
    args = parser.parse_args(argv)
    dst = to_universal(args.save_dir, args.tag)
    log.info(f"wrote {dst}; relaunch the run with any number of processes to resume from it")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(_main))
