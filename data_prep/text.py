"""Raw text in: input discovery, streaming decompression, documents, sentences.

Conventions (those of the original BERT data tools):
- `txt`: one paragraph per line; a blank line (or the end of a file) ends a document.
- `jsonl`: one JSON object per line; its text under `--jsonl-key` is one document, its lines paragraphs.

Design choices:
- Everything streams: files are read line by line through the decompressor, documents longer than a
  chunk are cut into parts (flagged, so they are stored as one document), and parts are grouped into
  chunks of about `chunk_bytes` of text, so memory depends on neither the corpus nor the document size
  (only a single line must fit in memory).
- Input bytes are decoded line by line; invalid UTF-8 is replaced with U+FFFD and counted (or is an
  error with `strict`), so one bad byte in a 100 GB crawl neither kills the run nor passes silently.
- A NUL byte means a binary file was passed by mistake: that is an error naming the file, never text.
"""

from __future__ import annotations

import bz2
import ctypes
import glob
import gzip
import io
import json
import lzma
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import blingfire
import zstandard

from data_prep.errors import UserError

FORMATS = ("txt", "jsonl")
_REPLACEMENT_UTF8 = "\ufffd".encode()


def resolve_inputs(specs: Sequence[str]) -> list[Path]:
    """Files named by `specs` (files; directories, recursively, skipping hidden entries; globs), sorted, unique."""
    files: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = sorted(
                q for q in p.rglob("*") if q.is_file() and not any(s.startswith(".") for s in q.relative_to(p).parts)
            )
        else:
            found = sorted(Path(q) for q in glob.glob(spec, recursive=True) if Path(q).is_file())
            if not found:
                raise UserError(f"input {spec} does not exist (no file, directory or glob match); check --input")
        if not found:
            raise UserError(f"input directory {spec} holds no files; check --input")
        files.extend(found)
    unique = sorted({f.resolve() for f in files})
    if not unique:
        raise UserError("no input files given; pass at least one file, directory or glob to --input")
    return unique


def open_binary(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """`(decompressed stream, raw file)`: the raw file's position tells how far along the file we are."""
    raw = open(path, "rb")
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.GzipFile(fileobj=raw), raw
    if suffix == ".xz":
        return lzma.LZMAFile(raw), raw
    if suffix == ".bz2":
        return bz2.BZ2File(raw), raw
    if suffix == ".zst":
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)), raw
    return raw, raw


@dataclass
class ReadStats:
    """What reading saw, for the manifest and the progress bar."""

    bytes_read: int = 0  # on-disk (compressed) bytes consumed so far
    text_bytes: int = 0  # decompressed bytes
    invalid_utf8_replaced: int = 0  # invalid byte sequences replaced with U+FFFD
    sources: list[dict] = field(default_factory=list)


@dataclass
class TextReader:
    """Streams documents (lists of paragraphs) out of many files, in file order."""

    files: Sequence[Path]
    fmt: str = "txt"
    jsonl_key: str = "text"
    strict: bool = False
    stats: ReadStats = field(default_factory=ReadStats)

    def documents(self) -> Iterator[list[str]]:
        """Every non-empty document of every file, as its list of non-blank paragraphs."""
        for paras, _ in self.parts():
            yield paras

    def parts(self, max_bytes: int = 0) -> Iterator[tuple[list[str], bool]]:
        """Documents as `(paragraphs, ends)`, in file order.

        With `max_bytes`, a document holding more text than that comes in several parts, all but the last
        with `ends=False` (the last may be empty), so no document, however long, is held whole in memory.
        """
        for path in self.files:
            size = path.stat().st_size
            self.stats.sources.append({"path": str(path), "bytes": size})
            done = self.stats.bytes_read
            yield from self._file_parts(path, done, max_bytes)
            self.stats.bytes_read = done + size

    def _file_parts(self, path: Path, done: int, max_bytes: int) -> Iterator[tuple[list[str], bool]]:
        stream, raw = open_binary(path)
        doc: list[str] = []
        size, is_open = 0, False  # is_open: parts of the current document were already yielded
        try:
            for lineno, line in enumerate(stream, 1):
                self.stats.text_bytes += len(line)
                text = self._decode(line, path, lineno)
                if self.fmt == "jsonl":
                    yield from _split_parts(self._jsonl_paragraphs(text, path, lineno), max_bytes)
                elif text.strip():
                    doc.append(text.strip())
                    size += len(doc[-1])
                    if max_bytes and size >= max_bytes:
                        yield doc, False
                        doc, size, is_open = [], 0, True
                elif doc or is_open:
                    yield doc, True
                    doc, size, is_open = [], 0, False
                if lineno % 256 == 0:
                    self.stats.bytes_read = done + raw.tell()
            if doc or is_open:
                yield doc, True
        except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as e:
            raise UserError(f"{path} could not be read or decompressed ({e}); check that the file is intact") from e
        finally:
            stream.close()
            raw.close()

    def _decode(self, line: bytes, path: Path, lineno: int) -> str:
        if b"\x00" in line:
            raise UserError(f"{path} looks binary (NUL byte on line {lineno}); pass only text files to --input")
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.strict:
                raise UserError(
                    f"{path} line {lineno} is not valid UTF-8 ({e.reason}); fix the file or drop --strict "
                    "to replace bad bytes"
                ) from e
            text = line.decode("utf-8", errors="replace")
            self.stats.invalid_utf8_replaced += text.count("\ufffd") - line.count(_REPLACEMENT_UTF8)
            return text

    def _jsonl_paragraphs(self, text: str, path: Path, lineno: int) -> list[str]:
        if not text.strip():
            return []
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise UserError(f"{path} line {lineno} is not valid JSON ({e}); is it really --format jsonl?") from e
        if not isinstance(obj, dict) or not isinstance(obj.get(self.jsonl_key), str):
            raise UserError(
                f"{path} line {lineno} has no string field {self.jsonl_key!r}; set --jsonl-key to the text field"
            )
        return [p.strip() for p in obj[self.jsonl_key].splitlines() if p.strip()]


def _split_parts(paras: list[str], max_bytes: int) -> Iterator[tuple[list[str], bool]]:
    """One document's paragraphs as parts of about `max_bytes` (one part when 0)."""
    part: list[str] = []
    size = 0
    for i, para in enumerate(paras):
        part.append(para)
        size += len(para)
        if max_bytes and size >= max_bytes and i < len(paras) - 1:
            yield part, False
            part, size = [], 0
    if part:
        yield part, True


def chunked(parts: Iterator[tuple[list[str], bool]], chunk_bytes: int) -> Iterator[list[tuple[list[str], bool]]]:
    """Group document parts into lists holding about `chunk_bytes` characters of text (at least one part)."""
    chunk: list[tuple[list[str], bool]] = []
    size = 0
    for part in parts:
        chunk.append(part)
        size += sum(len(p) for p in part[0])
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class SentenceSplitter:
    """blingfire's `text_to_sentences`, paragraph by paragraph, with one reused output buffer.

    Same C call and same result as `blingfire.text_to_sentences`; reusing the buffer instead of allocating
    one per call makes splitting about twice as fast, which matters because it runs next to the tokenizer.
    """

    def __init__(self, split: bool = True):
        self.split = split
        self._buf = ctypes.create_string_buffer(1 << 16)

    def __call__(self, paragraph: str) -> list[str]:
        """The non-blank sentences of one paragraph (the paragraph itself when not splitting)."""
        if not self.split:
            return [paragraph]
        raw = paragraph.encode("utf-8")
        if 2 * len(raw) + 1 > len(self._buf):
            self._buf = ctypes.create_string_buffer(4 * len(raw) + 1024)
        n = blingfire.blingfire.TextToSentences(raw, len(raw), self._buf, len(self._buf))
        if n <= 0 or n > len(self._buf):  # blingfire failed: keep the paragraph whole rather than lose it
            return [paragraph] if paragraph.strip() else []
        return [s for s in ctypes.string_at(self._buf, n - 1).decode("utf-8").split("\n") if s.strip()]
