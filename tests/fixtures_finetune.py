"""Small generated downstream tasks whose answers need the text, a WordPiece tokenizer trained on them, and a
tiny "pretrained" BERT (random init, saved as an HF directory) to fine-tune from.

classify: each sentence is filler words plus one keyword of its class at a random place, with a keyword of
another class's *distractor* list (shared by all classes) mixed in; lengths are drawn independently of the
class, so neither a constant nor a length-based guess beats chance (1/3).
tag: filler words with PER and LOC names (a first word, maybe a continuation word) tagged B-/I-; names are
made of rare syllables so the small WordPiece vocabulary splits many of them into several pieces.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

CLASSES = {
    "sport": ["football", "tennis", "goal", "referee", "stadium", "athlete", "match", "league"],
    "food": ["bread", "cheese", "recipe", "kitchen", "soup", "flavor", "oven", "spice"],
    "tech": ["laptop", "software", "server", "compiler", "keyboard", "network", "kernel", "database"],
}
FILLER = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "it",
    "for",
    "on",
    "with",
    "as",
    "at",
    "by",
    "this",
    "that",
    "from",
    "or",
    "be",
    "are",
    "were",
    "very",
    "some",
    "many",
]
DISTRACTORS = ["yesterday", "people", "really", "think", "city", "morning", "friend", "great", "new", "old"]
# (first words, continuation words) of each entity type: a name is one first word and maybe one continuation.
ENTITIES = {
    "PER": (["zorblax", "quintavia", "mervok", "alitha", "drungel", "pexora"], ["tamsin", "vulko", "smithers"]),
    "LOC": (["krathos", "belmora", "ostrava", "yzmir", "qualendor", "duvale"], ["bay", "heights", "norrik"]),
}


def classify_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = sorted(CLASSES)[i % len(CLASSES)]
        words = rng.choices(FILLER, k=rng.randint(3, 12)) + rng.sample(DISTRACTORS, k=rng.randint(0, 2))
        rng.shuffle(words)
        words.insert(rng.randint(0, len(words)), rng.choice(CLASSES[label]))
        rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def tag_sentences(n: int, seed: int) -> list[list[tuple[str, str]]]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        sent = [(w, "O") for w in rng.choices(FILLER + DISTRACTORS, k=rng.randint(2, 6))]
        for _ in range(rng.randint(1, 2)):
            kind = rng.choice(sorted(ENTITIES))
            firsts, rest = ENTITIES[kind]
            span = [rng.choice(firsts)] + rng.sample(rest, k=rng.randint(0, 1))
            tagged = [(w, ("B-" if j == 0 else "I-") + kind) for j, w in enumerate(span)]
            at = rng.choice([i for i in range(len(sent) + 1) if i == len(sent) or sent[i][1] == "O"])
            sent[at:at] = tagged + [(rng.choice(FILLER), "O")]
        sentences.append(sent)
    return sentences


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_conll(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    path.write_text("\n\n".join("\n".join(f"{w} {t}" for w, t in s) for s in sentences) + "\n")
    return path


def build_tokenizer(directory: Path, vocab_size: int = 200) -> Path:
    """A lowercase WordPiece vocab.txt trained on the task words (small, so rare names split into pieces)."""
    from tokenizers import BertWordPieceTokenizer

    names = [w for pair in ENTITIES.values() for ws in pair for w in ws]
    words = FILLER + DISTRACTORS + [w for ws in CLASSES.values() for w in ws] + names
    text = [" ".join(random.Random(i).sample(words, k=10)) for i in range(300)]
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(text, vocab_size=vocab_size, min_frequency=1)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_model(str(directory))
    return directory


def tiny_checkpoint(directory: Path, tokenizer: Path, seed: int = 0) -> Path:
    """A tiny-preset BertForPreTraining with random weights, saved as an HF directory with the tokenizer."""
    import torch

    from pretrain.model import BertConfig, BertForPreTraining

    vocab = (tokenizer / "vocab.txt").read_text()
    torch.manual_seed(seed)
    config = BertConfig.preset("tiny", vocab_size=len(vocab.splitlines()), max_position_embeddings=64)
    BertForPreTraining(config).save_hf_pretrained(str(directory))
    (directory / "vocab.txt").write_text(vocab)
    return directory
