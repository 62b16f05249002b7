"""`python -m finetune.tasks packages --output DIR`: a classification task built from local documentation.

Each example is one prose paragraph of the installed Python standard library (the same extraction as
`bert-prep corpus`, so the demo's pretraining corpus holds this text) and its label is the package it comes
from (`asyncio`, `email`, ...): the most paragraph-rich packages, the same number of paragraphs each, so a
constant guess scores 1 / classes. Paragraphs are split into train/eval at random with a fixed seed.
"""

from __future__ import annotations

import argparse
import csv
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from data_prep.errors import UserError, run_cli


def package_paragraphs(root: Path) -> dict[str, list[str]]:
    """{package: its prose paragraphs} for the packages (directories) directly under `root`."""
    from tqdm import tqdm

    from data_prep.corpus import document_paragraphs, iter_sources

    found = defaultdict(list)
    for path in tqdm(list(iter_sources([root])), desc="documentation", unit="file"):
        parts = path.relative_to(root).parts
        if len(parts) > 1:  # a package, not a single-file module
            found[parts[0]].extend(document_paragraphs(path))
    return found


def build(output: str, classes: int, per_class: int, eval_fraction: float, seed: int, root: str | None) -> dict:
    """Write OUTPUT/train.csv and OUTPUT/eval.csv (columns text,label); returns {label: paragraphs used}."""
    if classes < 2 or per_class < 2 or not 0 < eval_fraction < 1:
        raise UserError("--classes and --per-class must be at least 2 and --eval-fraction between 0 and 1")
    from data_prep.corpus import default_roots

    found = package_paragraphs(Path(root) if root else default_roots()[0])
    found = {k: sorted(set(v)) for k, v in found.items()}
    top = sorted(found, key=lambda k: (-len(found[k]), k))[:classes]
    if len(top) < classes:
        raise UserError(f"only {len(top)} documented packages found; lower --classes")
    n = min(per_class, *(len(found[k]) for k in top))
    rng = random.Random(seed)
    rows = [(p, k) for k in top for p in rng.sample(found[k], n)]
    rng.shuffle(rows)
    cut = int(len(rows) * eval_fraction)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval.csv", rows[:cut]), ("train.csv", rows[cut:])):
        with open(out / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(part)
    return {k: n for k in top}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.tasks", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="task", required=True)
    s = sub.add_parser("packages", help="which standard-library package a documentation paragraph comes from")
    s.add_argument("--output", required=True, help="directory for train.csv and eval.csv")
    s.add_argument("--classes", type=int, default=6, help="number of packages (the largest ones) (default: 6)")
    s.add_argument("--per-class", type=int, default=250, help="paragraphs per package, at most (default: 250)")
    s.add_argument("--eval-fraction", type=float, default=0.2, help="share held out for eval.csv (default: 0.2)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampling and the split (default: 0)")
    s.add_argument("--root", help="directory whose packages to use (default: the standard library)")
    a = p.parse_args(argv)
    used = build(a.output, a.classes, a.per_class, a.eval_fraction, a.seed, a.root)
    print(f"{len(used)} classes x {next(iter(used.values()))} paragraphs: {', '.join(used)} -> {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
