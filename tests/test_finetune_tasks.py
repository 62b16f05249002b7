"""`python -m finetune.demo_tasks`: the tasks built from local documentation are files our readers (and the formats'
rules) accept: SQuAD v2.0 answers at their offsets, GLUE layouts that `--glue-task` reads."""

import csv
import random

from fixtures_finetune import CLASSES, FILLER

from finetune import demo_tasks as tasks
from finetune.config import FinetuneConfig
from finetune.kinds import qa
from finetune.run import make_task


def make_docs(root, packages=3, paragraphs=30):
    """root/pkgN/mod.py whose module docstring holds prose paragraphs of two or three sentences."""
    rng = random.Random(0)
    for k, words in enumerate(list(CLASSES.values())[:packages]):
        paras = []
        for _ in range(paragraphs):
            sents = [
                " ".join(["The", *rng.sample(FILLER, 3), rng.choice(words), *rng.sample(words + FILLER, 4)]) + "."
                for _ in range(rng.randint(2, 3))
            ]
            paras.append(" ".join(sents))
        (root / f"pkg{k}").mkdir(parents=True)
        (root / f"pkg{k}" / "mod.py").write_text('"""' + "\n\n".join(paras) + '\n"""\n')
    return root


def test_squad_task_answers_sit_at_their_offsets(tmp_path):
    root = make_docs(tmp_path / "lib")
    cfg = tasks.SquadConfig(output=str(tmp_path / "squad"), root=str(root), questions=40, unanswerable=0.3, seed=1)
    counts = tasks.build_squad(cfg)
    assert counts["train"] + counts["dev"] == 40 and 5 <= counts["unanswerable"] <= 20
    for name in ("train.json", "dev.json"):
        examples, v2 = qa.read_squad(str(tmp_path / "squad" / name), name)
        assert v2 and all(qa.answer_found(ex) for ex in examples)
        for ex in examples:
            asked = ex.question.replace("what", ex.answers[0] if ex.answers else "", 1)
            assert ex.question.count("what") == 1 and (asked in ex.context) == bool(ex.answers)


def test_glue_tasks_are_read_by_glue_task(tmp_path):
    root = make_docs(tmp_path / "lib")
    tasks.build_glue(tasks.GlueConfig(output=str(tmp_path / "glue"), root=str(root), examples=40, seed=2))
    originals = {s for p in tasks.package_paragraphs(root).values() for para in p for s in tasks.sentences(para)}
    for name in ("cola", "mrpc", "sst2"):
        cfg = FinetuneConfig(glue_task=name, data_dir=str(tmp_path / "glue"), init_from="x", output="y", predict=True)
        t = make_task(cfg)
        examples = t.train_examples + t.dev_sets[0][1]
        assert (len(t.train_examples), len(t.dev_sets[0][1]), len(t.test_sets[0][2])) == (32, 8, 8)
        assert sorted(ex.label for ex in examples) == ["0"] * 20 + ["1"] * 20
        if name == "cola":  # a "1" is a sentence as written, a "0" the same words in another order
            assert all((ex.text in originals) == (ex.label == "1") for ex in examples)
    with open(tmp_path / "glue" / "CoLA" / "train.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert {len(r) for r in rows} == {4} and {r[2] for r in rows} == {"", "*"}  # CoLA's layout: no header
