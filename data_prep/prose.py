"""Prose out of documentation text: markup stripped, code, doctests, parameter sections, directives, headings,
URLs and license text dropped, and a paragraph kept only if it still reads as prose (`is_prose`: enough words,
mostly plain words, sentence punctuation at the end, few code symbols). Used by `bert-prep corpus`
(data_prep.corpus) and the embedding tasks (embed.tasks).
"""

from __future__ import annotations

import inspect
import re

# Sections of numpy/Google-style docstrings whose content is tables or code, not prose.
DROP_SECTIONS = {
    "args", "arguments", "parameters", "params", "other parameters", "keyword args", "keyword arguments",
    "kwargs", "returns", "return", "return type", "yields", "yield", "raises", "raise", "warns", "attributes",
    "methods", "example", "examples", "see also", "references", "shape", "shapes", "inputs", "outputs",
    "usage", "type", "todo", "installation", "install", "license", "copyright", "citation", "contributors",
}  # fmt: skip


LICENSE_RE = re.compile(
    r"copyright|licen[cs]e|warrant|hereby granted|all rights reserved|redistribut|liabilit|spdx|merchantab",
    re.IGNORECASE,
)


URL_RE = re.compile(r"<?\b(?:https?|ftp)://\S+|\bwww\.\S+|\S+@\S+\.(?:com|org|net)\b")


BULLET_RE = re.compile(r"^(?:[-*+\u2022]|\d+[.)]|#\.|\([a-z0-9]\))\s+")


UNDERLINE_RE = re.compile(r"^\s*([=\-~^\"'`#*+_:.])\1{2,}\s*$")


DIRECTIVE_RE = re.compile(r"^\s*\.\.\s")


FIELD_RE = re.compile(r"^\s*:[\w\s.-]+:")  # ":param x:", ":returns:", ":type x:"


NUMPY_PARAM_RE = re.compile(r"^\s*\**[\w.,\s]+ : \S")  # "x : int"


GOOGLE_SECTION_RE = re.compile(r"^\s*([A-Za-z][A-Za-z ]{1,30}):\s*$")


SIGNATURE_RE = re.compile(r"^\s*[\w.]+\(.*\)\s*(?:->.*)?$")


WORD_RE = re.compile(r"^[\"'(\[]*[A-Za-z][a-z]*(?:['\u2019-][a-z]+)*[\"')\],.;:!?]*$")


CODE_CHARS = set("{}[]=<>|\\_#@$`;~^")


# Inline markup, applied in order; each keeps the human-readable part.
INLINE_SUBS = [
    (re.compile(r"!\[[^\]]*\]\([^)]*\)"), ""),  # markdown image
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # markdown link
    (re.compile(r"\[([^\]]+)\]\[[^\]]*\]"), r"\1"),  # markdown reference link
    (re.compile(r":[\w:.-]+:`~?(?:([^`<]+?)\s*<[^`>]+>|([^`]+))`"), r"\1\2"),  # :role:`text <target>`
    (re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?"), r"\1"),  # `text <url>`_
    (re.compile(r"``([^`]+)``"), r"\1"),
    (re.compile(r"`([^`]+)`_{0,2}"), r"\1"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])"), r"\1"),
    (re.compile(r"(?<!\w)__([^_]+)__(?!\w)"), r"\1"),
    (re.compile(r"\|[\w\s-]+\|_?"), ""),  # reST substitution
    (re.compile(r"\[\d+\]_|\[#\w*\]_"), ""),  # reST citation marks
    (re.compile(r"</?[a-zA-Z][^>]*>"), ""),  # html tags
]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


class _Blocks:
    """The state of `split_blocks` as it walks the lines: the blocks so far, the current one, what to drop."""

    def __init__(self):
        self.blocks: list[list[str]] = []
        self.cur: list[str] = []
        self.skip_deeper_than: int | None = None  # drop lines indented more than this (literal blocks, directives)
        self.numpy_skip = False  # inside a dropped numpy-style section, until the next section header
        self.fence = False

    def flush(self) -> None:
        if self.cur:
            self.blocks.append(self.cur.copy())
            self.cur.clear()

    def skipped(self, line: str, stripped: str) -> bool:
        """Fenced code, or the indented body of a dropped block: lines to drop."""
        if stripped.startswith(("```", "~~~")):
            self.fence = not self.fence
            self.flush()
            return True
        if self.fence:
            return True
        if self.skip_deeper_than is not None:
            if not stripped or _indent(line) > self.skip_deeper_than:
                return True
            self.skip_deeper_than = None
        return False

    def heading(self, line: str, stripped: str, nxt: str) -> bool:
        """A reST title (underlined) or a Markdown heading: ends the block and may open a dropped section."""
        if UNDERLINE_RE.match(nxt) and stripped and not UNDERLINE_RE.match(line):  # a section title
            self.flush()
            self.numpy_skip = stripped.lower().rstrip(":") in DROP_SECTIONS
            return True
        if UNDERLINE_RE.match(line) or stripped.startswith("#"):  # title rule or Markdown heading
            self.flush()
            if stripped.startswith("#"):
                self.numpy_skip = stripped.lstrip("#").strip().lower().rstrip(":") in DROP_SECTIONS
            return True
        return False

    def dropped_block(self, line: str, stripped: str) -> bool:
        """A Google section to drop, a directive, a field list, a doctest, a prompt or a table starts here:
        drop it and what is indented under it."""
        google = GOOGLE_SECTION_RE.match(line)
        if (
            (google and google.group(1).strip().lower() in DROP_SECTIONS)
            or DIRECTIVE_RE.match(line)
            or FIELD_RE.match(line)
        ):
            self.flush()
            self.skip_deeper_than = _indent(line)
            return True
        if stripped.startswith((">>>", "...", "$ ", "%", "In [", "Out[")) or stripped.startswith("|"):
            self.flush()
            self.skip_deeper_than = _indent(line)  # doctest output follows at the same indent: drop the block
            self.cur.append("\0")  # poison the block so its prose part is dropped too
            return True
        return False

    def add(self, line: str, stripped: str, prev: str) -> None:
        """A prose line: a bullet starts a block, an indented block under a paragraph is dropped, `::` ends one."""
        if BULLET_RE.match(stripped):
            self.flush()
            stripped = BULLET_RE.sub("", stripped)
        elif self.cur and _indent(line) > _indent(prev) + 1 and not BULLET_RE.match(prev.strip()):
            # an indented block under a paragraph: a definition list, a parameter table or code
            self.flush()
            self.skip_deeper_than = _indent(prev)
            return
        self.cur.append(stripped)
        if stripped.endswith("::"):  # a literal block follows
            self.cur[-1] = stripped[:-2].rstrip() + (":" if stripped[:-2].rstrip() else "")
            self.flush()
            self.skip_deeper_than = _indent(line)


def split_blocks(text: str) -> list[str]:
    """Split reST/Markdown/docstring text into candidate paragraphs, dropping code and table blocks."""
    lines = inspect.cleandoc(text.expandtabs(4)).splitlines()
    state = _Blocks()
    for i, line in enumerate(lines):
        stripped = line.strip()
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if state.skipped(line, stripped) or state.heading(line, stripped, nxt) or state.numpy_skip:
            continue
        if not stripped:
            state.flush()
        elif not state.dropped_block(line, stripped):
            state.add(line, stripped, lines[i - 1])
    state.flush()
    return [" ".join(b) for b in state.blocks if "\0" not in b]


def clean_inline(text: str) -> str:
    """Strip inline markup, keeping the readable words (a link keeps its text, loses its target)."""
    for pattern, repl in INLINE_SUBS:
        text = pattern.sub(repl, text)
    text = re.sub(r"\(\s*\)|\[\s*\]", "", text)  # brackets left empty by removed links
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s+([.,;:!?])", r"\1", text)


def is_prose(text: str, min_words: int = 6) -> bool:
    """True for a paragraph that reads as English sentences, not code, a table, a heading or boilerplate.

    A bare URL rejects the paragraph: removing it would leave a broken sentence ("See  for details.").
    """
    words = text.split()
    if len(words) < min_words or not text[0].isupper() or text[-1] not in ".!?":
        return False
    if not text[-2].isalpha() and text[-2] not in ")\"'":  # "...", "1.", "x." are fine; "foo()." or "...". not
        return False
    if SIGNATURE_RE.match(text) or LICENSE_RE.search(text) or URL_RE.search(text) or "::" in text or ">>>" in text:
        return False
    if sum(WORD_RE.match(w) is not None for w in words) < 0.85 * len(words):
        return False
    return sum(c in CODE_CHARS for c in text) <= 0.01 * len(text)
