"""Raw text in: input discovery, formats, documents, sentences.

Formats. Each input file's format follows its extension (after a `.gz/.xz/.bz2/.zst` suffix); `--format`
overrides it for every input, a `FORMAT:` prefix (`jsonl:wiki/**/wiki_*`) for one `--input`:
- `txt` (`.txt`, `.text`, and any other or no extension): one paragraph per line.
- `jsonl` (`.jsonl`, `.ndjson`, `.json`): one JSON object per line; its text under `--text-key` is a row.
- `parquet` (`.parquet`, `.pq`): rows whose string column `--text-key` holds the text.
- `arrow` (`.arrow`, or a `datasets.save_to_disk` directory): Arrow IPC stream or file, same column rule.
The lines of a row's text are its paragraphs.

Document boundaries (`--doc-boundary`; the end of a file always ends a document):
- `blank` (default for txt): a blank line ends a document (in row formats also an empty row, or a blank line
  inside a row's text) - the original BERT convention;
- `row` (default for jsonl, parquet, arrow): each row is one document (in txt, each non-blank line);
- `file`: each file is one document (one book per file).

Design choices:
- Everything streams: text files are read line by line through the decompressor; Parquet with
  `ParquetFile.iter_batches` on the text column alone, in batches of about `max_bytes` of text (measured
  on the first rows) through a 1 MB read buffer; Arrow files are memory-mapped and sliced the same
  way. Documents longer than a chunk are cut into parts (flagged, so they are stored as one document) and
  parts are grouped into chunks of about `chunk_bytes` of text, so memory depends on neither the corpus nor
  the document size.
- Lines of any length: a line (of a txt file, or of a row's text) longer than `MAX_PIECE_CHARS` is cut into
  pieces of at most that many characters, each after its last space or tab (mid-word only where a whole
  piece holds none), and each piece is a paragraph of its own; `pieces` is the one rule, so txt and row
  formats cut a line alike. A txt file is read in blocks of at most `MAX_PIECE_CHARS` bytes, so a 50 MB
  line never sits whole in memory; a jsonl line or Parquet/Arrow value is held whole once (JSON must be
  parsed whole), then cut. Shorter lines, i.e. all ordinary text, are read exactly as before.
- Input bytes are decoded line by line; invalid UTF-8 is replaced with U+FFFD and counted (or is an
  error with `strict`), so one bad byte in a 100 GB crawl neither kills the run nor passes silently.
- A NUL byte in a text file means a binary file was passed by mistake: an error naming the file. A corrupt
  Parquet/Arrow file, a missing or non-string text column: an error naming the file and the column.
- In a directory, hidden entries and `_`-prefixed files (Spark's `_SUCCESS`) are skipped, and a
  `save_to_disk` directory inside it contributes its data files (`state.json`'s list). Files are read in
  sorted path order, whatever order `--input` names them in.
"""

from __future__ import annotations

import bz2
import ctypes
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

from common.errors import UserError
from data_prep.inputs import Input, ReadStats

_REPLACEMENT_UTF8 = "\ufffd".encode()
MAX_PIECE_CHARS = 1 << 20  # longest piece of a line handled at once (sentence splitter and tokenizer memory)


def pieces(line: str, limit: int | None = None) -> Iterator[str]:
    """`line` cut into pieces of at most `limit` characters, each ending after its last space or tab (a cut
    mid-word only where `limit` characters hold no space); the line itself when it is short enough.

    Greedy from the start, so a reader that sees the line `limit` characters at a time cuts it the same way."""
    limit = limit or MAX_PIECE_CHARS
    start, n = 0, len(line)
    while n - start > limit:
        cut = max(line.rfind(" ", start, start + limit), line.rfind("\t", start, start + limit)) + 1
        cut = cut if cut > start else start + limit
        yield line[start:cut]
        start = cut
    if start < n or n == 0:
        yield line[start:] if start else line


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


class _Documents:
    """Stripped non-blank lines -> `(paragraphs, ends)` parts, collected in `ready`."""

    __slots__ = ("blank_ends", "max_bytes", "doc", "size", "open", "ready", "line_text")

    def __init__(self, blank_ends: bool, max_bytes: int):
        self.blank_ends, self.max_bytes = blank_ends, max_bytes
        self.doc: list[str] = []
        self.size, self.open = 0, False  # open: parts of the current document were already handed out
        self.ready: list[tuple[list[str], bool]] = []
        self.line_text = False  # the current line had text in an earlier piece

    def add(self, piece: str, line_ends: bool = True) -> None:
        """One piece of a line (`pieces`); the line's last piece has `line_ends`. Only a blank line, not a
        blank piece of a long line, ends a document."""
        text = piece.strip()
        if text:
            self.doc.append(text)
            self.size += len(text)
            if self.max_bytes and self.size >= self.max_bytes:
                self.ready.append((self.doc, False))
                self.doc, self.size, self.open = [], 0, True
        elif line_ends and self.blank_ends and not self.line_text:
            self.end()
        self.line_text = bool(text or self.line_text) and not line_ends

    def add_line(self, line: str) -> None:
        """A whole line, cut into pieces when long."""
        for piece in pieces(line):
            self.add(piece, False)
        self.add("", True)

    def end(self) -> None:
        """End the current document (nothing when it is empty)."""
        if self.doc or self.open:
            self.ready.append((self.doc, True))
            self.doc, self.size, self.open = [], 0, False

    def take(self) -> list[tuple[list[str], bool]]:
        ready, self.ready = self.ready, []
        return ready


@dataclass
class TextReader:
    """Streams documents (lists of paragraphs) out of many inputs, in input order."""

    inputs: Sequence[Input]
    text_key: str = "text"
    strict: bool = False
    doc_boundary: str | None = None  # None: each format's convention (Input.boundary)
    stats: ReadStats = field(default_factory=ReadStats)

    @property
    def files(self) -> list[Path]:
        return [i.path for i in self.inputs]

    def documents(self) -> Iterator[list[str]]:
        """Every non-empty document of every input, as its list of non-blank paragraphs."""
        for paras, _ in self.parts():
            yield paras

    def paragraphs(self, max_bytes: int = 1 << 20) -> Iterator[str]:
        """Every paragraph, holding at most about `max_bytes` of text at a time."""
        for paras, _ in self.parts(max_bytes):
            yield from paras

    def parts(self, max_bytes: int = 0) -> Iterator[tuple[list[str], bool]]:
        """Documents as `(paragraphs, ends)`, in input order.

        With `max_bytes`, a document holding more text than that comes in several parts, all but the last
        with `ends=False` (the last may be empty), so no document, however long, is held whole in memory.
        """
        for inp in self.inputs:
            size = inp.path.stat().st_size
            boundary = inp.boundary(self.doc_boundary)
            self.stats.sources.append({"path": str(inp.path), "bytes": size, "format": inp.format})
            self.stats.sources[-1]["doc_boundary"] = boundary
            done = self.stats.bytes_read
            yield from self._file_parts(inp, boundary, done, max_bytes)
            self.stats.bytes_read = done + size

    def _file_parts(self, inp: Input, boundary: str, done: int, max_bytes: int) -> Iterator[tuple[list[str], bool]]:
        docs = _Documents(boundary == "blank", max_bytes)
        if inp.format == "txt":
            for piece, line_ends in self._line_pieces(inp.path, done):
                docs.add(piece, line_ends)
                if line_ends and boundary == "row":
                    docs.end()
                if docs.ready:
                    yield from docs.take()
        else:
            for row in self._rows(inp, done, max_bytes):
                for line in row.splitlines() or ("",):  # an empty row is a blank line
                    docs.add_line(line)
                if boundary == "row":
                    docs.end()
                if docs.ready:
                    yield from docs.take()
        docs.end()
        yield from docs.take()

    def _line_pieces(self, path: Path, done: int) -> Iterator[tuple[str, bool]]:
        """A txt file's lines as `(piece, ends the line)`: read in blocks of at most `MAX_PIECE_CHARS` bytes
        (a character cut by a block's end moves to the next block) and cut as `pieces` cuts the whole line,
        so no line is ever held whole."""
        stream, raw = open_binary(path)
        lineno, reads, text, carry = 1, 0, "", b""
        try:
            while block := carry + stream.readline(MAX_PIECE_CHARS - len(carry)):
                newline = block.endswith(b"\n")
                ends = newline or len(block) < MAX_PIECE_CHARS  # readline stops short only at a newline or EOF
                cut = 0 if ends else _partial_character(block)
                block, carry = (block[:-cut], block[-cut:]) if cut else (block, b"")
                self.stats.text_bytes += len(block)
                text += self._decode(block, path, lineno)
                if newline:
                    text = text[:-2] if text.endswith("\r\n") else text[:-1]
                start, known = 0, len(text) - (not ends and text.endswith("\r"))  # a "\r" may begin "\r\n"
                while known - start > MAX_PIECE_CHARS or (ends and start < len(text)):
                    piece = next(pieces(text[start : start + MAX_PIECE_CHARS + 1], MAX_PIECE_CHARS))
                    start += len(piece)
                    yield piece, ends and start == len(text)
                text = text[start:]
                if ends:
                    if start == 0:  # an empty line
                        yield "", True
                    lineno += 1
                reads += 1
                if reads % 256 == 0:
                    self.stats.bytes_read = done + raw.tell()
            if text:  # the file ended a block exactly where its last line ended, without a newline
                last = list(pieces(text, MAX_PIECE_CHARS))
                yield from ((piece, i == len(last) - 1) for i, piece in enumerate(last))
        except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as e:
            raise UserError(f"{path} could not be read or decompressed ({e}); check that the file is intact") from e
        finally:
            stream.close()
            raw.close()

    def _rows(self, inp: Input, done: int, max_bytes: int) -> Iterator[str]:
        """The texts of the rows of the row formats (jsonl, Parquet, Arrow)."""
        if inp.format == "jsonl":
            return self._jsonl_rows(inp.path, done)
        from data_prep import columnar  # pyarrow only for the formats that need it

        return columnar.rows(inp, self.text_key, self.stats, done, max_bytes)

    def _lines(self, path: Path, done: int) -> Iterator[tuple[int, str]]:
        stream, raw = open_binary(path)
        try:
            for lineno, line in enumerate(stream, 1):
                self.stats.text_bytes += len(line)
                yield lineno, self._decode(line, path, lineno)
                if lineno % 256 == 0:
                    self.stats.bytes_read = done + raw.tell()
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

    def _jsonl_rows(self, path: Path, done: int) -> Iterator[str]:
        for lineno, text in self._lines(path, done):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                raise UserError(f"{path} line {lineno} is not valid JSON ({e}); is it really --format jsonl?") from e
            if not isinstance(obj, dict) or not isinstance(obj.get(self.text_key), str):
                raise UserError(
                    f"{path} line {lineno} has no string field {self.text_key!r}; set --text-key to the text field"
                )
            yield obj[self.text_key]


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


def _partial_character(block: bytes) -> int:
    """How many bytes at the end of `block` begin a UTF-8 character that the block's end cuts (0 to 3)."""
    for back in range(1, min(4, len(block)) + 1):
        byte = block[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: the character's first byte
            size = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return back if back < size else 0
    return 0


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
