"""Which files an `--input` names and the format each is read in; what reading saw (`ReadStats`).

Shared by the readers (data_prep.text for txt/jsonl, data_prep.columnar for Parquet/Arrow), so neither imports
the other's module for them. Formats and document boundaries: data_prep.text's docstring.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from common.errors import UserError

InputFormat = Literal["txt", "jsonl", "parquet", "arrow"]
DocBoundary = Literal["blank", "row", "file"]
FORMATS: tuple[str, ...] = get_args(InputFormat)
BOUNDARIES: tuple[str, ...] = get_args(DocBoundary)
COMPRESSIONS = (".gz", ".xz", ".bz2", ".zst")
EXTENSIONS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
EXTENSIONS.update({".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow"})
_FORMAT_PREFIX = re.compile(rf"^({'|'.join(FORMATS)}):(.+)$")


@dataclass(frozen=True, order=True)
class Input:
    """One input file and the format it is read in."""

    path: Path
    format: str

    def boundary(self, override: str | None) -> str:
        """`--doc-boundary`, else the format's own convention."""
        return override or ("blank" if self.format == "txt" else "row")


def format_of(path: Path) -> str:
    """The format a file's extension names (`txt` for any other extension)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    fmt = EXTENSIONS.get(suffixes[-1] if suffixes else "", "txt")
    if fmt in ("parquet", "arrow") and path.suffix.lower() in COMPRESSIONS:
        raise UserError(f"{path}: Parquet and Arrow files carry their own compression; pass it uncompressed")
    if fmt == "txt" and not (suffixes and suffixes[-1] in EXTENSIONS) and path.suffix.lower() not in COMPRESSIONS:
        _refuse_binary_as_text(path)
    return fmt


_MAGIC = {b"PAR1": "parquet", b"ARROW1": "arrow"}


def _refuse_binary_as_text(path: Path) -> None:
    """A Parquet or Arrow file without its extension would be read as text (bytes as paragraphs): say so."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return  # the reader reports it
    for magic, fmt in _MAGIC.items():
        if head.startswith(magic):
            raise UserError(
                f"{path} is a {fmt.capitalize()} file (it starts with {magic.decode()}) without a .{fmt} extension, "
                f"so it would be read as text; rename it to .{fmt} or pass --format {fmt} (or {fmt}:{path})"
            )


def resolve_inputs(specs: Sequence[str], fmt: str | None = None) -> list[Input]:
    """Files named by `specs` (files; directories, recursively; globs; `FORMAT:` prefixes), sorted, unique,
    each with its format: the spec's prefix, else `fmt`, else its extension (arrow in save_to_disk dirs)."""
    found: dict[Path, str] = {}
    for spec in specs:
        spec_fmt, pattern = fmt, spec
        prefixed = _FORMAT_PREFIX.match(spec)
        if prefixed and not Path(spec).exists():
            spec_fmt, pattern = prefixed.groups()
        for path, dataset_fmt in _expand(pattern):
            if dataset_fmt and spec_fmt not in (None, dataset_fmt):
                raise UserError(f"{pattern} is a datasets.save_to_disk directory; read it as --format arrow")
            found.setdefault(path.resolve(), dataset_fmt or spec_fmt or format_of(path))
    if not found:
        raise UserError("no input files given; pass at least one file, directory or glob to --input")
    return [Input(p, f) for p, f in sorted(found.items())]


def _expand(pattern: str) -> list[tuple[Path, str | None]]:
    """(file, "arrow" for the data files of a save_to_disk directory else None) for one --input."""
    p = Path(pattern)
    if p.is_file():
        return [(p, None)]
    if p.is_dir():
        found = _walk(p)
        if not found:
            raise UserError(f"input directory {pattern} holds no files; check --input")
        return found
    found = []
    for q in sorted(Path(q) for q in glob.glob(pattern, recursive=True)):
        found += [(q, None)] if q.is_file() else _dataset_files(q) if _is_dataset_dir(q) else []
    if not found:
        raise UserError(f"input {pattern} does not exist (no file, directory or glob match); check --input")
    return found


def _walk(root: Path) -> list[tuple[Path, str | None]]:
    found: list[tuple[Path, str | None]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if _is_dataset_dir(here):
            found += _dataset_files(here)
            dirnames[:] = []
            continue
        if (here / "dataset_dict.json").is_file():
            raise UserError(f"{here} is a datasets.DatasetDict; pass one split's directory, e.g. {here}/train")
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [(here / f, None) for f in sorted(filenames) if not f.startswith((".", "_"))]
    return found


def _is_dataset_dir(path: Path) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk`."""
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _dataset_files(path: Path) -> list[tuple[Path, str | None]]:
    try:
        names = [f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}/state.json does not list the dataset's data files ({e}); save it again") from e
    return [(path / name, "arrow") for name in names]


@dataclass
class ReadStats:
    """What reading saw, for the manifest and the progress bar."""

    bytes_read: int = 0  # on-disk (compressed) bytes consumed so far
    text_bytes: int = 0  # decompressed bytes (for Parquet/Arrow: UTF-8 bytes of the text column)
    invalid_utf8_replaced: int = 0  # invalid byte sequences replaced with U+FFFD
    sources: list[dict] = field(default_factory=list)
