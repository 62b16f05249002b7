"""`bert-prep corpus`: a built-in English corpus from the documentation already installed on this machine.

Every Python install carries megabytes of hand-written English: the docstrings of the standard library
and of the installed packages, and the READMEs bundled in their metadata. This module turns that into a
pretraining corpus in the txt convention (one paragraph per line, a blank line between documents), with
no download. Choices worth knowing:

- Docstrings come from `ast` (module, class and function docstrings in source order), never from importing
  a module: importing runs code, is slow, and differs between machines with and without a GPU.
- One document per source file, so NSP pairs come from one module's prose.
- Cleaning is conservative: a paragraph is kept only if it still reads as prose after markup is stripped
  (enough words, mostly plain words, sentence punctuation at the end, few code symbols). Code blocks,
  doctests, parameter/return sections, directives, headings, URLs and license text are dropped.
- Paragraphs are deduplicated across the whole corpus by an exact hash and by a normalized hash
  (lowercase, letters and digits only), so vendored copies and copied docstrings count once.
- Files are read in sorted path order (standard library first, then site-packages), and the ordered
  parallel map keeps that order, so the same machine always gives the same corpus.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import re
import site
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError, run_cli
from common.flags import add_command, option
from common.log import get_logger
from data_prep.pool import ordered_map
from data_prep.prose import clean_inline, is_prose, split_blocks

log = get_logger(__name__)

DOC_SUFFIXES = (".rst", ".md", ".txt")
SKIP_DIRS = {"__pycache__", "test", "tests", "testing", "site-packages", "dist-packages", "idle_test", "node_modules"}
SKIP_FILE_PREFIXES = ("license", "licence", "copying", "notice", "authors", "changelog", "changes", "history")
SKIP_FILE_NAMES = {
    "entry_points.txt",
    "top_level.txt",
    "requirements.txt",
    "dependency_links.txt",
    "namespace_packages.txt",
}


@dataclass
class CorpusStats:
    """What `build_corpus` wrote."""

    files: int = 0  # source files read
    documents: int = 0
    paragraphs: int = 0
    words: int = 0
    bytes: int = 0
    duplicates: int = 0  # paragraphs dropped as exact or normalized duplicates

    def summary(self, path: str | os.PathLike) -> str:
        return (
            f"corpus: {self.documents:,} documents, {self.paragraphs:,} paragraphs, {self.words:,} words, "
            f"{self.bytes / 1e6:.1f} MB -> {path} (from {self.files:,} files; {self.duplicates:,} duplicate "
            "paragraphs dropped)"
        )


def default_roots() -> list[Path]:
    """The standard library of the running interpreter, then its site-packages."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]:
        if Path(p).is_dir() and Path(p).resolve() not in [r.resolve() for r in roots]:
            roots.append(Path(p))
    return roots


def iter_sources(roots: Sequence[Path]) -> Iterator[Path]:
    """Documentation-bearing files under each root in sorted order; each root's own subtree only."""
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
            in_dist_info = dirpath.endswith((".dist-info", ".egg-info"))
            for name in sorted(filenames):
                low = name.lower()
                if in_dist_info:
                    if name in ("METADATA", "PKG-INFO"):
                        yield Path(dirpath, name)
                elif low.startswith(SKIP_FILE_PREFIXES) or low in SKIP_FILE_NAMES:
                    continue
                elif low.endswith(".py") or low.endswith(DOC_SUFFIXES):
                    yield Path(dirpath, name)


def docstrings(source: str) -> list[str]:
    """Module, class and function docstrings of a Python source, in source order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old sources
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return []
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            out.append(doc)
        for child in getattr(node, "body", []):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child)

    visit(tree)
    return out


def metadata_description(text: str) -> str:
    """The long description of a METADATA/PKG-INFO file: the body after the header block."""
    _, _, body = text.partition("\n\n")
    return body


def document_paragraphs(path: Path) -> list[str]:
    """The prose paragraphs of one source file (a module's docstrings, a README), cleaned, in order."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    if path.suffix == ".py":
        if '"""' not in text and "'''" not in text:
            return []
        parts = docstrings(text)
    elif path.name in ("METADATA", "PKG-INFO"):
        parts = [metadata_description(text)]
    else:
        parts = [text]
    out = []
    for part in parts:
        for block in split_blocks(part):
            para = clean_inline(block)
            if para and is_prose(para):
                out.append(para)
    return out


def _hashes(para: str) -> tuple[bytes, bytes]:
    norm = " ".join(re.findall(r"[a-z0-9]+", para.lower()))
    return (
        hashlib.blake2b(para.encode(), digest_size=8).digest(),
        hashlib.blake2b(norm.encode(), digest_size=8).digest(),
    )


def build_corpus(
    output: str | os.PathLike,
    roots: Sequence[str | os.PathLike] | None = None,
    max_mb: float | None = None,
    workers: int = 1,
    progress: bool = True,
) -> CorpusStats:
    """Write the corpus to `output` and return its size; stops after the document that passes `max_mb`."""
    from tqdm import tqdm

    root_paths = [Path(r) for r in roots] if roots else default_roots()
    for r in root_paths:
        if not r.is_dir():
            raise UserError(f"corpus source {r} is not a directory; pass existing directories to --roots")
    paths = list(iter_sources(root_paths))
    stats = CorpusStats()
    seen: set[bytes] = set()
    limit = None if max_mb is None else int(max_mb * 1e6)
    results = ordered_map(document_paragraphs, paths, workers)
    try:
        with open(output, "w", encoding="utf-8") as f:
            for paras in tqdm(results, total=len(paths), desc="corpus", unit="file", disable=not progress):
                stats.files += 1
                kept = []
                for para in paras:
                    exact, norm = _hashes(para)
                    if exact in seen or norm in seen:
                        stats.duplicates += 1
                        continue
                    seen.update((exact, norm))
                    kept.append(para)
                if not kept:
                    continue
                doc = ("\n" if stats.documents else "") + "\n".join(kept) + "\n"
                f.write(doc)
                stats.documents += 1
                stats.paragraphs += len(kept)
                stats.words += sum(len(p.split()) for p in kept)
                stats.bytes += len(doc.encode())
                if limit is not None and stats.bytes >= limit:
                    break
    finally:
        results.close()  # stops the workers at once after --max-mb or an error
    return stats


@dataclass
class CorpusConfig:
    """Build an English corpus from the documentation installed on this machine (no download).

    Write the docstrings of the Python standard library and installed packages, and the READMEs bundled with
    them, as a cleaned, deduplicated prose corpus: one paragraph per line, a blank line between documents (one
    document per source file). Same machine, same corpus.

    Each field is a command-line flag of `bert-prep corpus` (common.flags).
    """

    output: str = option(metavar="FILE")
    """Text file to write (txt convention)."""
    max_mb: float | None = option(None, metavar="MB")
    """Stop once the corpus reaches this many MB."""
    roots: list[str] | None = option(None, metavar="DIR")
    """Directories to read instead of this interpreter's standard library and site-packages."""
    workers: int = option(default_factory=lambda: min(4, os.cpu_count() or 1), metavar="N")
    """Parallel file readers."""
    progress: bool = True
    """Show the progress bar (--no-progress: none)."""

    def validate(self) -> None:
        """Raise UserError naming the flag to change."""
        if self.max_mb is not None and self.max_mb <= 0:
            raise UserError(f"--max-mb must be positive, got {self.max_mb}")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        out_dir = Path(self.output).resolve().parent
        if not out_dir.is_dir():
            raise UserError(f"output directory {out_dir} does not exist; create it or change --output")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bert-prep corpus`."""
    return add_command(subparsers, "corpus", CorpusConfig, run)


def run(cfg: CorpusConfig) -> int:
    cfg.validate()
    stats = build_corpus(cfg.output, cfg.roots, cfg.max_mb, cfg.workers, cfg.progress)
    log.info(stats.summary(cfg.output))
    if stats.documents == 0:
        raise UserError("no prose found under the given --roots; point it at directories with .py or .md files")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bert-prep")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
