"""`bert-prep corpus`: prose in, code and boilerplate out, deduplicated, deterministic."""

import re
import textwrap

import pytest

from common.errors import run_cli
from data_prep import corpus, prose

MODULE = '''\
"""Tools for counting the birds that visit a garden feeder.

The counts are kept per species and per day, so that a season can be compared with the last one.

Example::

    counter = BirdCounter()
    counter.add("robin")

>>> BirdCounter().total()
0

See https://example.org/birds for the field guide that the species names come from.

Copyright (c) 2020 The Bird People. Licensed under the MIT License, without warranty of any kind.
"""


def count(species, day):
    """Return how many birds of one species were seen on a given day.

    The :func:`count` helper reads the ``log`` lazily and never keeps more than one day in memory.

    Parameters
    ----------
    species : str
        Name of the species as written in the field guide.
    day : datetime.date
        The day to count.

    Returns
    -------
    int
        The number of sightings recorded for that day.
    """


class BirdCounter:
    """A running tally of sightings that can be merged with the tally of a neighbouring garden.

    Args:
        strict: Whether unknown species raise an error instead of being counted as other birds.
    """

    def merge(self, other):
        """merge(other) -> BirdCounter"""
'''

README = """\
# Bird counter

A small library that keeps the tally of garden birds and explains the seasonal patterns it finds.

```python
from birds import BirdCounter
BirdCounter().add("robin")
```

- Install it with pip and start counting.
- fast

The counts are kept per species and per day, so that a season can be compared with the last one.
"""

METADATA = """\
Metadata-Version: 2.1
Name: birds
Version: 1.0

Birds is maintained by volunteers who count sparrows, finches and robins every winter weekend.
"""


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "site"
    (root / "birds").mkdir(parents=True)
    (root / "birds" / "__init__.py").write_text(MODULE)
    (root / "birds" / "README.md").write_text(README)
    (root / "birds" / "LICENSE.txt").write_text("Permission is hereby granted, free of charge, to any person.\n")
    (root / "birds" / "tests").mkdir()
    (root / "birds" / "tests" / "test_birds.py").write_text('"""Tests are not documentation and are skipped."""\n')
    (root / "birds-1.0.dist-info").mkdir()
    (root / "birds-1.0.dist-info" / "METADATA").write_text(METADATA)
    return root


def documents(path):
    return [doc.split("\n") for doc in path.read_text().strip("\n").split("\n\n")]


def test_keeps_prose_and_drops_code_tables_urls_and_license(tree, tmp_path):
    out = tmp_path / "corpus.txt"
    stats = corpus.build_corpus(out, roots=[tree], progress=False)
    assert documents(out) == [
        [  # birds/README.md sorts before birds/__init__.py
            "A small library that keeps the tally of garden birds and explains the seasonal patterns it finds.",
            "Install it with pip and start counting.",
            "The counts are kept per species and per day, so that a season can be compared with the last one.",
        ],
        [  # birds/__init__.py, docstrings in source order; the paragraph shared with the README is dropped
            "Tools for counting the birds that visit a garden feeder.",
            "Return how many birds of one species were seen on a given day.",
            "The count helper reads the log lazily and never keeps more than one day in memory.",
            "A running tally of sightings that can be merged with the tally of a neighbouring garden.",
        ],
        ["Birds is maintained by volunteers who count sparrows, finches and robins every winter weekend."],
    ]
    assert (stats.documents, stats.paragraphs, stats.duplicates) == (3, 8, 1)
    assert stats.words == len(out.read_text().split())
    assert stats.bytes == out.stat().st_size


def test_normalized_duplicates_are_dropped(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    para = "Each paragraph of documentation is written once and read many times by many people."
    (root / "a.md").write_text(para + "\n")
    variant = "Each paragraph of Documentation is written once, and read many times by many people!"
    (root / "b.md").write_text(variant + "\n\nA second paragraph makes this file count.\n")
    out = tmp_path / "c.txt"
    stats = corpus.build_corpus(out, roots=[root], progress=False)
    assert documents(out) == [[para], ["A second paragraph makes this file count."]]
    assert stats.duplicates == 1


def test_real_corpus_is_clean_deduplicated_prose_and_deterministic(tmp_path, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    assert corpus.main(["corpus", "--output", str(a), "--max-mb", "0.5", "--workers", "1"]) == 0
    summary = capsys.readouterr().out
    assert re.search(r"corpus: [\d,]+ documents, [\d,]+ paragraphs, [\d,]+ words, 0\.\d MB", summary)
    assert corpus.main(["corpus", "--output", str(b), "--max-mb", "0.5", "--workers", "2"]) == 0
    assert a.read_bytes() == b.read_bytes()  # same machine, same corpus, whatever the worker count

    text = a.read_text()
    assert len(text.encode()) >= 500_000
    paragraphs = [p for p in text.split("\n") if p]
    docs = text.strip("\n").split("\n\n")
    assert len(docs) > 50 and all(d for d in docs)
    norm = [" ".join(re.findall(r"[a-z0-9]+", p.lower())) for p in paragraphs]
    assert len(set(norm)) == len(norm)
    for p in paragraphs:
        assert ">>>" not in p and not p.startswith(("def ", "class ", "import ")), p
        assert p[0].isupper() and p[-1] in ".!?", p
        assert not re.search(r"https?://|``|:func:`|\*\*[A-Za-z ]+\*\*", p), p
    words = text.split()
    plain = [w for w in words if re.fullmatch(r"[\"'(]*[A-Za-z][a-z]*(?:'[a-z]+)?[\"'),.;:!?]*", w)]
    assert len(plain) > 0.9 * len(words)
    sentences = re.findall(r"[.!?](?:\s|$)", text)
    assert len(words) / len(sentences) < 40  # real sentences, not run-on tables


def test_user_errors(tmp_path, capsys):
    missing = tmp_path / "nope"
    argv = ["corpus", "--output", str(tmp_path / "c.txt"), "--roots", str(missing)]
    assert run_cli(corpus.main, argv) == 2
    assert f"error: corpus source {missing} is not a directory" in capsys.readouterr().err
    assert run_cli(corpus.main, ["corpus", "--output", str(tmp_path / "c.txt"), "--max-mb", "0"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(corpus.main, ["corpus", "--output", str(tmp_path / "c.txt"), "--roots", str(empty)]) == 2
    assert "no prose found" in capsys.readouterr().err


def test_split_blocks_handles_google_and_directives():
    doc = textwrap.dedent("""\
        Summary line that is long enough to count as a sentence here.

        .. note::
           Indented directive bodies are dropped with the directive.

        Raises:
            ValueError: when the input is wrong in any of the usual ways.

        A closing paragraph, after the sections, is prose again.
        """)
    assert prose.split_blocks(doc) == [
        "Summary line that is long enough to count as a sentence here.",
        "A closing paragraph, after the sections, is prose again.",
    ]
