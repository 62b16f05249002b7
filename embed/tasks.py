"""`bert-embed task`: a retrieval task from the documentation installed on this machine, no download.

Each function or class docstring of the standard library and the installed packages that has a one-line
summary and at least one prose paragraph after it gives one example: the summary is the query ("Return the
number of items in the queue.") and the rest of its documentation (the prose paragraphs, cleaned as `bert-prep
corpus` cleans them) is the one relevant passage. The split is by module (a seeded share of the source files),
so no module's vocabulary and style appears on both sides. Written as BEIR directories: OUT/train
(qrels/train.tsv) and OUT/test (qrels/test.tsv), each with its own corpus; OUT/train/pairs.jsonl holds the
training pairs for `bert-embed train`. Summaries shorter than 4 words or not ending in a full stop, and
examples whose query or passage repeats another's, are dropped.
"""

from __future__ import annotations

import ast
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.log import get_logger

log = get_logger(__name__)


@dataclass(kw_only=True)
class TaskConfig:
    """A retrieval task from local documentation: a docstring's summary line as the query, the rest as the passage.

    Split train/test by module; written as BEIR directories OUT/train and OUT/test plus OUT/train/pairs.jsonl."""

    output: str
    """Directory to write train/ and test/ into."""
    root: str | None = None
    """Directory of Python sources to read (default: the standard library, then site-packages)."""
    test_fraction: float = 0.2
    """Share of the modules (source files) held out for the test split."""
    max_examples: int = 6000
    """Examples in all, at most (a seeded sample when there are more)."""
    seed: int = 0
    """Seed of the split and the sample."""


def summary_and_rest(doc: str) -> tuple[str, str] | None:
    """(one-line summary, the prose after it) of a docstring, or None when either is missing."""
    from data_prep.prose import clean_inline, is_prose, split_blocks

    head, _, rest = doc.strip().partition("\n\n")
    summary = " ".join(head.split())
    if len(summary.split()) < 4 or not summary.endswith("."):
        return None
    paragraphs = [p for p in (clean_inline(b) for b in split_blocks(rest)) if p and is_prose(p)]
    return (summary, " ".join(paragraphs)) if paragraphs else None


def module_examples(path: Path) -> list[tuple[str, str]]:
    """(query, passage) of every function and class docstring of one source file, in source order."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            doc = ast.get_docstring(node, clean=True)
            found = summary_and_rest(doc) if doc else None
            if found:
                out.append(found)
    return out


def write_beir(directory: Path, split: str, examples: list[tuple[str, str, str]]) -> None:
    """examples: (module, query, passage) -> corpus.jsonl, queries.jsonl, qrels/<split>.tsv (one relevant each)."""
    (directory / "qrels").mkdir(parents=True, exist_ok=True)
    with open(directory / "corpus.jsonl", "w") as corpus, open(directory / "queries.jsonl", "w") as queries:
        for i, (module, query, passage) in enumerate(examples):
            corpus.write(json.dumps({"_id": f"d{i}", "title": "", "text": passage, "module": module}) + "\n")
            queries.write(json.dumps({"_id": f"q{i}", "text": query}) + "\n")
    qrels = "".join(f"q{i}\td{i}\t1\n" for i in range(len(examples)))
    (directory / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)


def build_task(cfg: TaskConfig) -> dict:
    """Write the task; returns its counts."""
    from data_prep.corpus import default_roots, iter_sources

    if not 0 < cfg.test_fraction < 1:
        raise UserError("--test-fraction must be between 0 and 1")
    roots = [Path(cfg.root)] if cfg.root else default_roots()
    seen, by_module = set(), {}
    for root in roots:
        for path in iter_sources([root]):
            if path.suffix != ".py":
                continue
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            for query, passage in module_examples(path):
                if passage not in seen and query not in seen:
                    seen.update((query, passage))
                    by_module.setdefault(module, []).append((module, query, passage))
    rng = random.Random(cfg.seed)
    modules = sorted(by_module)
    rng.shuffle(modules)
    examples = [e for m in modules for e in by_module[m]]
    if len(examples) < 10:
        raise UserError(f"only {len(examples)} documented functions found under {cfg.root}; pass another --root")
    keep = set(rng.sample(range(len(examples)), min(cfg.max_examples, len(examples))))
    examples = [e for i, e in enumerate(examples) if i in keep]
    cut = int(len(examples) * cfg.test_fraction)
    while 0 < cut < len(examples) and examples[cut][0] == examples[cut - 1][0]:
        cut += 1  # the split falls between modules
    test, train = examples[:cut], examples[cut:]
    out = Path(cfg.output)
    write_beir(out / "train", "train", train)
    write_beir(out / "test", "test", test)
    with open(out / "train" / "pairs.jsonl", "w") as f:
        for _, query, passage in train:
            f.write(json.dumps({"query": query, "positive": passage}) + "\n")
    counts = {"train": len(train), "test": len(test), "modules": len(modules), "roots": [str(r) for r in roots]}
    log.info(f"retrieval task in {out}: {json.dumps(counts)}")
    return counts
