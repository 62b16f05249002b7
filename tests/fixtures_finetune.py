"""Small generated downstream tasks whose answers need the text, a WordPiece tokenizer trained on them, and a
tiny "pretrained" BERT (random init, saved as an HF directory) to fine-tune from.

classify: each sentence is filler words plus one keyword of its class at a random place, with a keyword of
another class's *distractor* list (shared by all classes) mixed in; lengths are drawn independently of the
class, so neither a constant nor a length-based guess beats chance (1/3).
tag: filler words with PER and LOC names (a first word, maybe a continuation word) tagged B-/I-; names are
made of rare syllables so the small WordPiece vocabulary splits many of them into several pieces.
ModernBERT: a byte-level BPE tokenizer trained on the same words and a small transformers-written ModernBERT.
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


def build_tokenizer(directory: Path, vocab_size: int = 200, extra: tuple[str, ...] = ()) -> Path:
    """A lowercase WordPiece vocabulary trained by `bert-prep vocab` on the task words (small, so rare names split
    into pieces); the same on every run (tokenizers' own trainer alone is not: data_prep.vocab)."""
    from fixtures_train import build_tokenizer as train_tokenizer

    names = [w for pair in ENTITIES.values() for ws in pair for w in ws]
    words = FILLER + DISTRACTORS + [w for ws in CLASSES.values() for w in ws] + names + list(extra)
    text = [" ".join(random.Random(i).sample(words, k=10)) for i in range(300)]
    return train_tokenizer(directory, text, vocab_size, min_frequency=1)


def tiny_checkpoint(directory: Path, tokenizer: Path, seed: int = 0) -> Path:
    """A tiny-preset BertForPreTraining with random weights, saved as an HF directory with the tokenizer."""
    import torch

    from pretrain.models.bert import BertConfig, BertForPreTraining

    vocab = (tokenizer / "vocab.txt").read_text()
    torch.manual_seed(seed)
    config = BertConfig.preset("tiny", vocab_size=len(vocab.splitlines()), max_position_embeddings=64)
    BertForPreTraining(config).save_hf_pretrained(str(directory))
    (directory / "vocab.txt").write_text(vocab)
    return directory


MODERNBERT_SPECIALS = ["[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"]  # the names ModernBERT's tokenizer uses


def build_bpe_tokenizer(directory: Path, vocab_size: int = 600, extra: tuple[str, ...] = ()) -> Path:
    """ModernBERT's kind of tokenizer, trained by `tokenizers` on the task words: byte-level BPE (`Ġ` word starts),
    `[CLS] a [SEP]` / `[CLS] a [SEP] b [SEP]` post-processor, no token_type_ids among the model inputs; saved by
    transformers (tokenizer.json + tokenizer_config.json) as a ModernBERT directory holds it."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    names = [w for pair in ENTITIES.values() for ws in pair for w in ws]
    words = FILLER + DISTRACTORS + [w for ws in CLASSES.values() for w in ws] + names + list(extra)
    text = [" ".join(random.Random(i).sample(words, k=10)) for i in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=MODERNBERT_SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(text, trainer)
    cls, sep = ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[cls, sep]
    )
    roles = dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]", unk_token="[UNK]")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, model_input_names=["input_ids", "attention_mask"], **roles
    )
    fast.save_pretrained(str(directory))
    return directory


def tiny_modernbert(directory: Path, tokenizer: Path, seed: int = 0, **overrides) -> Path:
    """A small `transformers.ModernBertForMaskedLM` (random init by transformers: 2 layers, the second one local
    with a 16-token window), written by its own `save_pretrained`, with the tokenizer's files beside it."""
    import shutil

    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer))
    ids = dict(pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id)
    config = transformers.ModernBertConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=2,
        global_attn_every_n_layers=2,
        local_attention=16,
        max_position_embeddings=128,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        classifier_pooling="mean",
        **ids,
        **overrides,
    )
    torch.manual_seed(seed)
    transformers.ModernBertForMaskedLM(config).save_pretrained(str(directory))
    for f in tokenizer.iterdir():
        shutil.copy(f, directory / f.name)
    return directory


def hf_predictions(out_dir: Path, path: Path, task_name: str, max_length: int = 32) -> list:
    """Predictions of a saved directory through transformers alone: its Auto classes (the one config.json names),
    its own tokenizer and word ids; labels for classify, tag lists for tag."""
    import torch
    import transformers

    from finetune import data

    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    auto = transformers.AutoModelForSequenceClassification if task_name == "classify" else None
    model = (auto or transformers.AutoModelForTokenClassification).from_pretrained(out_dir).eval()
    assert model.config.architectures == [type(model).__name__]
    labels = model.config.id2label
    if task_name == "classify":
        texts = [ex.text for ex in data.read_classify(str(path), "text", "label")]
        enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits
        return [labels[i] for i in logits.argmax(-1).tolist()]
    preds = []
    for ex in data.read_conll(str(path)):
        enc = tok(ex.words, is_split_into_words=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            ids = model(**enc).logits.argmax(-1)[0].tolist()
        words = enc.word_ids(0)
        firsts = [i for i, w in enumerate(words) if w is not None and (i == 0 or words[i - 1] != w)]
        preds.append([labels[ids[i]] for i in firsts] + ["O"] * (len(ex.words) - len(firsts)))
    return preds


# --- extractive QA: "NAME VERB OBJECT ." facts with filler between them; a question asks for one object --------
RELATIONS = {  # relation: (words in the context, question, objects)
    "live": ("lives in", "where does {} live ?", ENTITIES["LOC"][0]),
    "like": ("likes", "what does {} like ?", CLASSES["food"]),
    "play": ("plays", "what does {} play ?", CLASSES["sport"]),
    "use": ("uses", "what does {} use ?", CLASSES["tech"]),
}
QA_WORDS = ("lives", "where", "does", "live", "what", "like", "likes", "play", "plays", "use", "uses", "?", ".")


def squad_paragraph(rng: random.Random, n_facts: int, filler: int) -> tuple[str, dict[str, tuple[str, str, int]]]:
    """(context, {relation: (person, object, character start of the object)}) with `n_facts` facts."""
    context, facts = "", {}
    people = rng.sample(ENTITIES["PER"][0], n_facts)
    for person, rel in zip(people, rng.sample(sorted(RELATIONS), n_facts)):
        words, _, objects = RELATIONS[rel]
        obj = rng.choice(objects)
        if rel == "live" and rng.random() < 0.5:
            obj += " " + rng.choice(ENTITIES["LOC"][1])  # two-word answers
        context += " ".join(rng.choices(FILLER + DISTRACTORS, k=rng.randint(0, filler)) + [person, words]) + " "
        facts[rel] = (person, obj, len(context))
        context += obj + " . "
    return (context + " ".join(rng.choices(FILLER + DISTRACTORS, k=rng.randint(0, filler)))).strip(), facts


def squad_json(n: int, seed: int, unanswerable: float = 0.0, n_facts: int = 3, filler: int = 3) -> dict:
    """A SQuAD file: one question per paragraph (v2.0 with `unanswerable` > 0: some ask about a relation the
    paragraph lacks, with the name of someone in it)."""
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        context, facts = squad_paragraph(rng, n_facts, filler)
        if rng.random() < unanswerable:
            rel = rng.choice([r for r in sorted(RELATIONS) if r not in facts])
            person = rng.choice([p for p, _, _ in facts.values()])
            qa = {"id": f"q{i}", "question": RELATIONS[rel][1].format(person), "answers": [], "is_impossible": True}
        else:
            rel = rng.choice(sorted(facts))
            person, obj, start = facts[rel]
            qa = {"id": f"q{i}", "question": RELATIONS[rel][1].format(person)}
            qa["answers"] = [{"text": obj, "answer_start": start}]
            if unanswerable:
                qa["is_impossible"] = False
        paragraphs.append({"context": context, "qas": [qa]})
    version = "v2.0" if unanswerable else "1.1"
    return {"version": version, "data": [{"title": "generated", "paragraphs": paragraphs}]}


def write_json(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


# --- GLUE: files in the published layouts, with content a tiny model can learn --------------------------------
MNLI_PARSES = ["sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse", "sentence2_parse"]
MNLI_HEAD = ["index", "promptID", "pairID", "genre", *MNLI_PARSES, "sentence1", "sentence2"]
NLI_HEAD = ["index", "sentence1", "sentence2"]
STSB_HEAD = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
MRPC_IDS = ["#1 ID", "#2 ID", "#1 String", "#2 String"]
# task: (directory, train/dev header (None: CoLA has none), train/dev row, test header, test row)
GLUE_LAYOUTS = {
    "cola": (
        "CoLA",
        None,
        lambda i, a, b, y: [f"gj0{i % 9}", y, "" if y == "1" else "*", a],
        ["index", "sentence"],
        lambda i, a, b: [str(i), a],
    ),
    "sst2": (
        "SST-2",
        ["sentence", "label"],
        lambda i, a, b, y: [a, y],
        ["index", "sentence"],
        lambda i, a, b: [str(i), a],
    ),
    "mrpc": (
        "MRPC",
        ["Quality", *MRPC_IDS],
        lambda i, a, b, y: [y, str(100 + i), str(900 + i), a, b],
        ["index", *MRPC_IDS],
        lambda i, a, b: [str(i), str(100 + i), str(900 + i), a, b],
    ),
    "qqp": (
        "QQP",
        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        lambda i, a, b, y: [str(i), str(2 * i), str(2 * i + 1), a, b, y],
        ["id", "question1", "question2"],
        lambda i, a, b: [str(i), a, b],
    ),
    "stsb": (
        "STS-B",
        [*STSB_HEAD, "score"],
        lambda i, a, b, y: [*_stsb(i), a, b, y],
        STSB_HEAD,
        lambda i, a, b: [*_stsb(i), a, b],
    ),
    "mnli": (
        "MNLI",
        [*MNLI_HEAD, "label1", "gold_label"],
        lambda i, a, b, y: [*_mnli(i, a, b), y, y],
        MNLI_HEAD,
        lambda i, a, b: _mnli(i, a, b),
    ),
    "qnli": (
        "QNLI",
        ["index", "question", "sentence", "label"],
        lambda i, a, b, y: [str(i), a, b, y],
        ["index", "question", "sentence"],
        lambda i, a, b: [str(i), a, b],
    ),
    "rte": (
        "RTE",
        [*NLI_HEAD, "label"],
        lambda i, a, b, y: [str(i), a, b, y],
        NLI_HEAD,
        lambda i, a, b: [str(i), a, b],
    ),
    "wnli": (
        "WNLI",
        [*NLI_HEAD, "label"],
        lambda i, a, b, y: [str(i), a, b, y],
        NLI_HEAD,
        lambda i, a, b: [str(i), a, b],
    ),
}


def _stsb(i: int) -> list[str]:
    return [str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none"]


def _mnli(i: int, a: str, b: str) -> list[str]:
    parse = [f"( {a} )", f"( {b} )", f"(ROOT {a})", f"(ROOT {b})"]
    return [str(i), str(31000 + i), f"{31000 + i}e", "fiction", *parse, a, b]


def glue_examples(task: str, n: int, seed: int) -> list[tuple[str, str, str]]:
    """(text, pair, label) rows: single-sentence tasks label sport "1" and food "0"; STS-B scores 1 + 1.5 per
    sport text (+-0.5); other pair tasks say whether the two texts share a class; every 7th text opens a quote
    it never closes."""
    rng = random.Random(seed)
    rows = classify_rows(3 * n, seed)
    if task in ("cola", "sst2"):
        rows = [r for r in rows if r["label"] != "tech"]
    out = []
    for i in range(n):
        a, b = rows[2 * i], rows[2 * i + 1]
        same = a["label"] == b["label"]
        text = ('" ' if i % 7 == 3 else "") + a["text"]
        if task in ("cola", "sst2"):
            label = "1" if a["label"] == "sport" else "0"
        elif task == "stsb":
            sport = (a["label"] == "sport") + (b["label"] == "sport")
            label = f"{1 + 1.5 * sport + rng.uniform(-0.5, 0.5):.3f}"
        elif task == "mnli":
            label = "entailment" if same else "neutral" if "tech" in (a["label"], b["label"]) else "contradiction"
        elif task in ("qnli", "rte"):
            label = "entailment" if same else "not_entailment"
        else:
            label = "1" if same else "0"
        out.append((text, b["text"], label))
    return out


def write_tsv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + rows
    path.write_text("".join("\t".join(r) + "\n" for r in lines), encoding="utf-8")


def write_glue(root: Path, task: str, n_train: int, n_dev: int, n_test: int, seed: int = 0) -> Path:
    """root/<Task>/ with train, dev and test files in the task's published layout (MNLI: matched and
    mismatched, and root/diagnostic/diagnostic.tsv); returns the task directory."""
    name, head, row, test_head, test_row = GLUE_LAYOUTS[task]
    d = root / name
    train, dev = glue_examples(task, n_train, seed), glue_examples(task, n_dev, seed + 1)
    test = [(a, b) for a, b, _ in glue_examples(task, n_test, seed + 2)]
    write_tsv(d / "train.tsv", head, [row(i, *r) for i, r in enumerate(train)])
    tests = ["test.tsv"] if task != "mnli" else ["test_matched.tsv", "test_mismatched.tsv"]
    for dev_name in ["dev.tsv"] if task != "mnli" else ["dev_matched.tsv", "dev_mismatched.tsv"]:
        dev_head = head if task != "mnli" else [*MNLI_HEAD, *(f"label{k}" for k in range(1, 6)), "gold_label"]
        dev_rows = [row(i, *r) if task != "mnli" else [*_mnli(i, r[0], r[1]), *[r[2]] * 6] for i, r in enumerate(dev)]
        write_tsv(d / dev_name, dev_head, dev_rows)
    for test_name in tests:
        write_tsv(d / test_name, test_head, [test_row(i, a, b) for i, (a, b) in enumerate(test)])
    if task == "mnli":
        write_tsv(root / "diagnostic" / "diagnostic.tsv", NLI_HEAD, [[str(i), a, b] for i, (a, b) in enumerate(test)])
    return d
