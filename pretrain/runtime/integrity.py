"""Checkpoint integrity: per-file content checksums, fsync before COMPLETE, and marks for diverged saves.

Each rank writes `checksums_rank{R}.json` into the tag after its own files (docs/CHECKPOINTS.md):

    {"format": "bert-ckpt-checksums", "version": 1, "hash": "xxh3_128", "world_size": W,
     "files": {"mp_rank_00_model_states.pt": {"size": 123, "xxh3_128": "..."}, ...},
     "loss": 7.9, "mark": null}                       (rank 0 only: the saved step's loss and its mark)

Design choices:
- The hash is xxHash's XXH3-128 (the `xxhash` package): over 10x hashlib's blake2b and sha256 on this project's
  CPU test machine (docs/PERFORMANCE.md), so verifying a checkpoint costs far less than reading it. It detects
  damage (flipped bits, a cut file, a foreign file), not an attacker, who can rewrite the checksums as easily:
  pretrain.runtime.safe_load is the defence against planted code.
- A rank hashes the files it wrote: those named after its rank (`zero_pp_rank_R_*`, `rng_rankR.pt`) and, on
  rank 0, the shared ones. No file crosses ranks, so a node-local --save works like a shared one.
- Every file is fsynced as it is hashed (the hash reads it anyway), then the checksum file and the tag directory;
  COMPLETE and `latest` come after, so a power cut cannot leave a COMPLETE tag whose data is still in a cache.
- A mark says why a checkpoint is not a good place to go back to: its step's loss was non-finite, or above
  `SPIKE_FACTOR` times the mean of the last `SPIKE_WINDOW` finite losses (with at least `SPIKE_MIN_HISTORY` of
  them). Resume, pruning and the divergence error count only unmarked checkpoints as good.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import deque
from pathlib import Path

from common.files import write_text_atomic, xxh3_file

CHECKSUM_FORMAT = "bert-ckpt-checksums"
HASH = "xxh3_128"

SPIKE_FACTOR = 4.0
SPIKE_WINDOW = 100
SPIKE_MIN_HISTORY = 10

_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)")
_CHECKSUMS = re.compile(r"^checksums_rank(\d+)\.json$")
_NOT_HASHED = {"COMPLETE"}


def checksum_file(rank: int) -> str:
    return f"checksums_rank{rank}.json"


def file_rank(name: str) -> int | None:
    """The rank a checkpoint file belongs to, or None for a file every rank reads (rank 0 writes it)."""
    m = _RANK_FILE.search(name)
    return int(m.group(1)) if m else None


def hash_file(path: Path, sync: bool = False) -> str:
    """XXH3-128 of a file's bytes; `sync` also fsyncs it (while its pages are at hand)."""
    return xxh3_file(path, sync=sync)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def own_files(tag_dir: Path, rank: int) -> list[Path]:
    """The files of `tag_dir` that `rank` wrote (and hashes), relative paths sorted."""
    out = []
    for f in sorted(tag_dir.rglob("*")):
        if not f.is_file() or f.name in _NOT_HASHED or _CHECKSUMS.match(f.name) or f.name.endswith(".tmp"):
            continue
        owner = file_rank(f.name)
        if owner == rank or (owner is None and rank == 0):
            out.append(f)
    return out


def write_checksums(tag_dir: Path, rank: int, world_size: int, loss: float | None = None, mark: str | None = None):
    """Hash and fsync this rank's files of `tag_dir`, then write its checksum file and fsync the directory."""
    files = {}
    for f in own_files(tag_dir, rank):
        files[str(f.relative_to(tag_dir))] = {"size": f.stat().st_size, HASH: hash_file(f, sync=True)}
    for d in sorted({f.parent for f in own_files(tag_dir, rank)} - {tag_dir}):
        fsync_dir(d)
    record = {"format": CHECKSUM_FORMAT, "version": 1, "hash": HASH, "world_size": world_size, "files": files}
    if rank == 0:
        record.update(loss=loss if loss is None or math.isfinite(loss) else str(loss), mark=mark)
    write_text_atomic(tag_dir / checksum_file(rank), json.dumps(record, indent=1))
    fsync_dir(tag_dir)


def has_checksums(tag_dir: Path) -> bool:
    """False for a checkpoint written before checksums existed (accepted, with a warning)."""
    return (Path(tag_dir) / checksum_file(0)).is_file()


def _read(path: Path) -> dict:
    record = json.loads(path.read_text())
    if record.get("format") != CHECKSUM_FORMAT or record.get("hash") != HASH:
        raise ValueError(f"{path.name} is not a {CHECKSUM_FORMAT} file with {HASH} sums")
    return record


def mark(tag_dir: Path) -> str | None:
    """Why the checkpoint is not a good one to go back to (its loss), or None."""
    try:
        return _read(Path(tag_dir) / checksum_file(0)).get("mark")
    except (OSError, ValueError):
        return None  # a missing or damaged checksum file is verify()'s to report


def verify(tag_dir: Path, rank: int | None = None) -> str | None:
    """None when the files of `tag_dir` match their checksums, else what is wrong (one line).

    `rank`: check only what that rank reads (its own files and the shared ones); None: every file. A
    checkpoint without checksums (older than them) passes: callers warn about it (`has_checksums`)."""
    tag_dir = Path(tag_dir)
    if not has_checksums(tag_dir):
        return None
    try:
        world = int(_read(tag_dir / checksum_file(0))["world_size"])
        for r in range(world):
            if rank is not None and r not in (0, rank):
                continue
            path = tag_dir / checksum_file(r)
            if not path.is_file():
                return f"{path.name} is missing"
            for name, want in _read(path)["files"].items():
                owner = file_rank(Path(name).name)
                if rank is not None and owner is not None and owner != rank:
                    continue
                if rank is not None and owner is None and r != 0:
                    continue
                f = tag_dir / name
                if not f.is_file():
                    return f"{name} is missing"
                if f.stat().st_size != want["size"]:
                    return f"{name} has {f.stat().st_size} bytes, its checksum file says {want['size']}"
                if hash_file(f) != want[HASH]:
                    return f"{name} does not match its checksum (its content changed after the save)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its checksum files are unreadable ({type(e).__name__}: {e})"
    return None


class LossWatch:
    """The recent training losses, to mark a checkpoint saved at a non-finite or spiking loss."""

    def __init__(self):
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW + 1)  # the window, and the newest loss
        self.last: float | None = None

    def add(self, loss: float) -> None:
        self.last = loss
        if math.isfinite(loss):
            self.recent.append(loss)

    def mark(self) -> str | None:
        """Why a checkpoint of the last logged step would be suspect, or None."""
        loss = self.last
        if loss is None:
            return None
        if not math.isfinite(loss):
            return f"saved at a non-finite loss ({loss})"
        history = list(self.recent)[:-1]  # the losses before this one
        if len(history) >= SPIKE_MIN_HISTORY:
            mean = sum(history) / len(history)
            if loss > SPIKE_FACTOR * mean:
                return f"saved at a loss spike ({loss:.4g} > {SPIKE_FACTOR:g} x the recent mean {mean:.4g})"
        return None


def human_bytes(n: float) -> str:
    """Decimal units that keep 3 significant digits: 512 B, 3.41 MB, 1.20 GB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"
