"""`python -m finetune.demo_tasks NAME --output DIR`: downstream tasks built from local documentation, no download.

Every task reads the prose paragraphs of the installed Python standard library (the same extraction as
`bert-prep corpus`, so the demo's pretraining corpus holds this text) and splits its examples into train and
eval at random with a fixed seed.
- packages: which package (`asyncio`, `email`, ...) a paragraph comes from: the most paragraph-rich packages,
  the same number of paragraphs each, so a constant guess scores 1 / classes (CSV for `--task classify`).
- squad: extractive QA in SQuAD v2.0 JSON (`--task qa`) on paragraphs of two sentences or more. Cloze
  questions: one sentence of the paragraph with a content word replaced by "what", answered by that word in
  the paragraph; a share of the questions take their sentence from another paragraph, which the paragraph then
  does not answer (v2.0's unanswerable questions).
- word-order: is a sentence as written or with two of its words swapped (CoLA-layout swap detection, CSV for
  `--task classify`), from the documents a pretraining run held out (`--data`, with the run's --eval-fraction
  and --seed): text the encoder never trained on, from its own corpus (docs/demo.md).
  Fine-tuning train and eval examples come from different documents; labels alternate, so each split is
  balanced; a `document` column names each sentence's document in the dataset.
- glue: three tasks in GLUE's file layouts (`--glue-task`, `bert-glue`): CoLA (is a sentence as written, or one
  with two of its words swapped), MRPC (are two sentences from the same package) and SST-2 (is a sentence from
  the largest package or from the second); half of each label.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError, run_cli
from common.flags import add_arguments, from_args
from common.log import get_logger

log = get_logger(__name__)
WORD = re.compile(r"\b[a-z]{4,}\b")  # cloze answers: plain lowercase words, 4 letters or more
COMMON = {"that", "this", "with", "from", "have", "which", "when", "will", "been", "were", "they", "their", "there"}


@dataclass(kw_only=True)
class Source:
    """Where the text comes from and how it is split."""

    output: str
    """Directory to write the task's files into."""
    eval_fraction: float = 0.2
    """Share of the examples held out for evaluation."""
    seed: int = 0
    """Seed of the sampling and the split."""
    root: str | None = None
    """Directory whose packages to read (default: the standard library)."""


@dataclass(kw_only=True)
class PackagesConfig(Source):
    classes: int = 6
    """Number of packages (the largest ones)."""
    per_class: int = 250
    """Paragraphs per package, at most."""


@dataclass(kw_only=True)
class SquadConfig(Source):
    questions: int = 3000
    """Questions in all, one per paragraph."""
    unanswerable: float = 0.33
    """Share of questions the paragraph does not answer (SQuAD 2.0 has about a third)."""


@dataclass(kw_only=True)
class GlueConfig(Source):
    examples: int = 3000
    """Examples per task."""


def package_paragraphs(root: Path) -> dict[str, list[str]]:
    """{package: its distinct prose paragraphs, sorted} for the packages (directories) directly under `root`."""
    from tqdm import tqdm

    from data_prep.corpus import document_paragraphs, iter_sources

    found = defaultdict(set)
    for path in tqdm(list(iter_sources([root])), desc="documentation", unit="file"):
        parts = path.relative_to(root).parts
        if len(parts) > 1:  # a package, not a single-file module
            found[parts[0]].update(document_paragraphs(path))
    return {k: sorted(v) for k, v in found.items()}


def read_source(cfg: Source) -> dict[str, list[str]]:
    if not 0 < cfg.eval_fraction < 1:
        raise UserError("--eval-fraction must be between 0 and 1")
    from data_prep.corpus import default_roots

    return package_paragraphs(Path(cfg.root) if cfg.root else default_roots()[0])


def split(rows: list, cfg: Source, rng: random.Random) -> tuple[list, list]:
    """(train, eval) of the shuffled rows."""
    rng.shuffle(rows)
    cut = int(len(rows) * cfg.eval_fraction)
    return rows[cut:], rows[:cut]


def build_packages(cfg: PackagesConfig) -> dict:
    """OUTPUT/train.csv and OUTPUT/eval.csv (columns text,label); returns {label: paragraphs used}."""
    if cfg.classes < 2 or cfg.per_class < 2:
        raise UserError("--classes and --per-class must be at least 2")
    found = read_source(cfg)
    top = sorted(found, key=lambda k: (-len(found[k]), k))[: cfg.classes]
    if len(top) < cfg.classes:
        raise UserError(f"only {len(top)} documented packages found; lower --classes")
    n = min(cfg.per_class, *(len(found[k]) for k in top))
    rng = random.Random(cfg.seed)
    train, evals = split([(p, k) for k in top for p in rng.sample(found[k], n)], cfg, rng)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval.csv", evals), ("train.csv", train)):
        with open(out / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(part)
    log.info(f"{len(top)} classes x {n} paragraphs: {', '.join(top)} -> {cfg.output}")
    return {k: n for k in top}


def sentences(paragraph: str) -> list[str]:
    """The paragraph's sentences of 6 to 40 words, as they appear in it."""
    import blingfire

    found = blingfire.text_to_sentences(paragraph).splitlines()
    return [s for s in found if 6 <= len(s.split()) <= 40 and s in paragraph]


def cloze(sentence: str, rng: random.Random) -> tuple[str, str, int] | None:
    """(question, answer word, its offset in the sentence): a content word of the sentence made "what"."""
    words = [m for m in WORD.finditer(sentence) if m.group() not in COMMON]
    if not words:
        return None
    m = rng.choice(words)
    return sentence[: m.start()] + "what" + sentence[m.end() :], m.group(), m.start()


def squad_question(n: int, paragraph: str, other: str, cfg: SquadConfig, rng: random.Random) -> dict | None:
    """One SQuAD v2.0 question on `paragraph`, made from a sentence of `other` when it is to be unanswerable."""
    impossible = rng.random() < cfg.unanswerable
    candidates = sentences(other if impossible else paragraph)
    sentence = rng.choice(candidates) if candidates else ""
    made = cloze(sentence, rng) if sentence and not (impossible and sentence in paragraph) else None
    if made is None:
        return None
    question, answer, offset = made
    qa = {"id": f"doc{n}", "question": question, "is_impossible": impossible, "answers": []}
    if not impossible:
        qa["answers"] = [{"text": answer, "answer_start": paragraph.index(sentence) + offset}]
    return {"context": paragraph, "qas": [qa]}


def build_squad(cfg: SquadConfig) -> dict:
    """OUTPUT/train.json and OUTPUT/dev.json in SQuAD v2.0 format; returns the question counts."""
    if cfg.questions < 10 or not 0 <= cfg.unanswerable < 1:
        raise UserError("--questions must be at least 10 and --unanswerable in [0, 1)")
    paragraphs = sorted({p for ps in read_source(cfg).values() for p in ps if len(sentences(p)) >= 2})
    rng = random.Random(cfg.seed)
    rng.shuffle(paragraphs)
    made = []
    for n, paragraph in enumerate(paragraphs):
        item = squad_question(n, paragraph, paragraphs[n - 1], cfg, rng)
        if item:
            made.append(item)
        if len(made) == cfg.questions:
            break
    train, dev = split(made, cfg, rng)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.json", train), ("dev.json", dev)):
        doc = {"version": "v2.0", "data": [{"title": "python documentation", "paragraphs": part}]}
        (out / name).write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    counts = {"train": len(train), "dev": len(dev)}
    counts["unanswerable"] = sum(p["qas"][0]["is_impossible"] for p in made)
    log.info(f"{counts['train']} train and {counts['dev']} dev questions ({counts['unanswerable']} unanswerable)")
    return counts


def swapped(sentence: str, rng: random.Random) -> str:
    """The sentence with two of its (distinct) words exchanged."""
    words = sentence.split()
    i, j = sorted(rng.sample(range(len(words)), 2))
    while words[i] == words[j]:
        i, j = sorted(rng.sample(range(len(words)), 2))
    words[i], words[j] = words[j], words[i]
    return " ".join(words)


def write_tsv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    """A GLUE-style TSV: tab-separated, no quoting (tabs inside text become spaces)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + [[str(x).replace("\t", " ") for x in r] for r in rows]
    path.write_text("".join("\t".join(r) + "\n" for r in lines), encoding="utf-8")


def build_cola(found: dict[str, list[str]], cfg: GlueConfig, rng: random.Random) -> None:
    """OUTPUT/CoLA: label 1 for a sentence as written, 0 for one with two words swapped."""
    pool = sorted({s for ps in found.values() for p in ps for s in sentences(p)})
    chosen = rng.sample(pool, min(cfg.examples, len(pool)))
    rows = [(s, "1") if k % 2 else (swapped(s, rng), "0") for k, s in enumerate(chosen)]
    train, dev = split(rows, cfg, rng)
    d = Path(cfg.output, "CoLA")
    for name, part in (("train.tsv", train), ("dev.tsv", dev)):
        write_tsv(d / name, None, [["docs", y, "" if y == "1" else "*", s] for s, y in part])
    write_tsv(d / "test.tsv", ["index", "sentence"], [[i, s] for i, (s, _) in enumerate(dev)])


def build_sst2(found: dict[str, list[str]], cfg: GlueConfig, rng: random.Random) -> None:
    """OUTPUT/SST-2: label 1 for a sentence of the package richest in sentences, 0 for one of the next."""
    by_package = {k: sorted({s for p in ps for s in sentences(p)}) for k, ps in found.items()}
    first, second = sorted(by_package, key=lambda k: (-len(by_package[k]), k))[:2]
    n = min(cfg.examples // 2, len(by_package[second]))
    rows = [(s, "1") for s in rng.sample(by_package[first], n)] + [(s, "0") for s in rng.sample(by_package[second], n)]
    train, dev = split(rows, cfg, rng)
    d = Path(cfg.output, "SST-2")
    for name, part in (("train.tsv", train), ("dev.tsv", dev)):
        write_tsv(d / name, ["sentence", "label"], [[s, y] for s, y in part])
    write_tsv(d / "test.tsv", ["index", "sentence"], [[i, s] for i, (s, _) in enumerate(dev)])
    log.info(f"SST-2 layout: {first} (1) against {second} (0), {n} sentences each")


def build_mrpc(found: dict[str, list[str]], cfg: GlueConfig, rng: random.Random) -> None:
    """OUTPUT/MRPC: Quality 1 when the two sentences come from the same package."""
    by_package = {k: sorted({s for p in ps for s in sentences(p)}) for k, ps in found.items()}
    packages = [k for k, v in by_package.items() if len(v) >= 2]
    rows = []
    for k in range(cfg.examples):
        a, b = rng.sample(packages, 2)
        same = k % 2 == 1
        first, second = rng.choice(by_package[a]), rng.choice(by_package[a if same else b])
        rows.append(("1" if same else "0", first, second))
    train, dev = split(rows, cfg, rng)
    d = Path(cfg.output, "MRPC")
    head = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    for name, part in (("train.tsv", train), ("dev.tsv", dev)):
        write_tsv(d / name, head, [[y, 2 * i, 2 * i + 1, s1, s2] for i, (y, s1, s2) in enumerate(part)])
    test = [[i, 2 * i, 2 * i + 1, s1, s2] for i, (_, s1, s2) in enumerate(dev)]
    write_tsv(d / "test.tsv", ["index", *head[1:]], test)


@dataclass(kw_only=True)
class WordOrderConfig:
    """Held-out documents of a pretraining dataset and how many examples to make of them."""

    output: str
    """Directory to write train.csv and eval.csv into."""
    data: str
    """The pretraining dataset PREFIX (`bert-prep build`; the first --data of the run)."""
    data_eval_fraction: float = 0.01
    """The pretraining run's --eval-fraction: which documents it held out."""
    data_seed: int = 1234
    """The pretraining run's --seed."""
    eval_examples: int = 1000
    """Evaluation examples (at least: whole documents go to one side; half the sentences, with a warning, when the
    held-out documents hold fewer than twice as many)."""
    train_examples: int = 2000
    """Training examples, at most."""
    seed: int = 0
    """Seed of the document order and of the swaps."""


def held_out_sentences(cfg: WordOrderConfig) -> list[tuple[int, list[str]]]:
    """(document id, its sentences as text) for every held-out document of the dataset, in id order."""
    import numpy as np

    from data_prep import tokenizer
    from data_prep.indexed import IndexedDataset
    from pretrain.sources import held_out_documents

    if not Path(cfg.data + ".idx").is_file():
        raise UserError(f"dataset {cfg.data}.bin/.idx does not exist; pass the PREFIX the pretraining run read")
    ds = IndexedDataset(cfg.data)
    tok = tokenizer.load(ds.manifest["tokenizer"]["path"])
    docs = held_out_documents(cfg.data, cfg.data_eval_fraction, cfg.data_seed)
    ids = [[np.asarray(ds[i]).tolist() for i in ds.document(int(d))] for d in docs]
    texts = iter(tok.batch_decode([s for doc in ids for s in doc], skip_special_tokens=True))
    return [(int(d), [next(texts) for _ in doc]) for d, doc in zip(docs, ids)]


def build_word_order(cfg: WordOrderConfig) -> dict:
    """OUTPUT/train.csv and OUTPUT/eval.csv (columns text,label,document); returns the example counts."""
    if cfg.eval_examples < 10 or cfg.train_examples < 10:
        raise UserError("--eval-examples and --train-examples must be at least 10")
    docs = [(d, [s for s in ss if 6 <= len(s.split()) <= 40 and len(set(s.split())) > 1])
            for d, ss in held_out_sentences(cfg)]  # fmt: skip
    total = sum(len(ss) for _, ss in docs)
    want = min(cfg.eval_examples, total // 2)  # a small corpus: half of what there is, and say so
    if want < 20:
        raise UserError(
            f"the held-out documents of {cfg.data} hold only {total} sentences of 6-40 words, too few for a task; "
            "use a larger corpus, more documents (a blank line ends one in text files) or a larger "
            "--data-eval-fraction (and the same --eval-fraction in pretraining)"
        )
    rng = random.Random(cfg.seed)
    rng.shuffle(docs)
    parts: dict[str, list] = {"eval": [], "train": []}
    for d, ss in docs:  # whole documents to eval until it is full, then to train
        parts["eval" if len(parts["eval"]) < want else "train"].extend((s, d) for s in ss)
    parts["train"] = parts["train"][: cfg.train_examples]
    have = {k: len(v) for k, v in parts.items()}
    if have["eval"] < cfg.eval_examples:
        log.warning(
            f"warning: the held-out documents of {cfg.data} hold {total} sentences: the word-order task evaluates "
            f"on {have['eval']}, fewer than --eval-examples {cfg.eval_examples}, so its seed spread is wider"
        )
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label", "document"])
            for k, (s, d) in enumerate(part):
                w.writerow([s, "original", d] if k % 2 else [swapped(s, rng), "swapped", d])
    log.info(f"word order: {have['train']} train and {have['eval']} eval sentences of {len(docs)} held-out "
             f"documents of {cfg.data} -> {cfg.output}")  # fmt: skip
    return have


def build_glue(cfg: GlueConfig) -> None:
    if cfg.examples < 10:
        raise UserError("--examples must be at least 10")
    found = read_source(cfg)
    rng = random.Random(cfg.seed)
    build_cola(found, cfg, rng)
    build_mrpc(found, cfg, rng)
    build_sst2(found, cfg, rng)
    log.info(f"CoLA, MRPC and SST-2 layouts, up to {cfg.examples} examples each -> {cfg.output}")


TASKS = {
    "packages": (PackagesConfig, build_packages, "which standard-library package a documentation paragraph is from"),
    "squad": (SquadConfig, build_squad, "extractive QA (SQuAD v2.0 JSON): cloze questions on documentation"),
    "glue": (GlueConfig, build_glue, "CoLA-, MRPC- and SST-2-layout tasks from documentation sentences"),
    "word-order": (WordOrderConfig, build_word_order, "swapped words or not, in a pretraining run's held-out text"),
}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.demo_tasks", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="task", required=True)
    for name, (config, _, text) in TASKS.items():
        add_arguments(sub.add_parser(name, help=text, description=text), config)
    args = p.parse_args(argv)
    config, build, _ = TASKS[args.task]
    build(from_args(config, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
