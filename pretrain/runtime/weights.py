"""Weights out of a checkpoint: `load_weights` (a --save directory, a tag, or a transformers directory of either
family) through the fp32 master weights, and `to_universal` (DeepSpeed's universal format, to resume on another
process count). Which file holds the fp32 weights, per ZeRO stage and precision: docs/DESIGN.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from common.errors import UserError
from common.files import write_text_atomic
from pretrain.runtime import integrity, safe_load
from pretrain.runtime.checkpoint import (
    COMPLETE,
    STATE_FILE,
    complete_tags,
    newest_good,
    problem,
    read_state,
    tags,
    warn_unverified,
)
from pretrain.runtime.resume import partitioned, rank_files


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
    safe_load.check_all(rank_files(src, None), trust)  # ds_to_universal unpickles them unchecked
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
    config = config_from_dict(read_state(p).config["model"])
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

        safe_load.check_all(rank_files(tag_dir, None), trust)  # zero_to_fp32 unpickles them unchecked
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
