"""`bert-finetune --task qa`: windows over long contexts, span decoding, SQuAD v1.1/v2.0 files, a generated QA
set learned above a trivial baseline, and a saved directory that transformers' QA model loads with our logits."""

import json
from collections import Counter

import pytest
import torch
from fixtures_finetune import QA_WORDS, build_tokenizer, squad_json, tiny_checkpoint, write_json

from common.errors import UserError
from data_prep.tokenizer import load as load_tokenizer
from finetune import metrics
from finetune.config import FinetuneConfig
from finetune.kinds import qa
from finetune.model import TaskModel, save_hf
from finetune.run import main
from pretrain.models.bert import BertConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    tok_dir = build_tokenizer(root / "tok", extra=QA_WORDS)
    return {"root": root, "tok": load_tokenizer(str(tok_dir)), "ckpt": tiny_checkpoint(root / "ckpt", tok_dir)}


def test_window_spans_and_max_context_by_hand():
    """Google's doc_spans: 10 tokens, room 4, stride 3 -> starts 0, 3, 6; a token in two windows belongs to the one
    that gives it more context on its shorter side (a tie goes to the earlier window)."""
    spans = qa.window_spans(10, 4, 3)
    assert spans == [(0, 4), (3, 4), (6, 4)]
    assert qa.window_spans(3, 4, 3) == [(0, 3)] and qa.window_spans(0, 4, 3) == [(0, 0)]
    owner = {pos: [i for i in range(3) if qa.is_max_context(spans, i, pos)] for pos in range(10)}
    assert owner == {0: [0], 1: [0], 2: [0], 3: [0], 4: [1], 5: [1], 6: [1], 7: [2], 8: [2], 9: [2]}


ANSWER = "qualendor norrik heights"


def long_example(at: int) -> qa.QAExample:
    """40 filler words with a three-word answer after the first `at`."""
    words = [f"w{i % 5}" for i in range(40)]
    context = " ".join(words[:at] + [ANSWER] + words[at:])
    return qa.QAExample("q", "where ?", context, [ANSWER], context.index(ANSWER))


def test_an_answer_cut_by_a_window_edge_is_labelled_in_the_next_window(setup):
    tok = setup["tok"]
    ex = long_example(13)
    pieces = tok(ex.context, add_special_tokens=False)["input_ids"]
    first = len(tok(" ".join(ex.context.split()[:13]), add_special_tokens=False)["input_ids"])
    question = len(tok(ex.question, add_special_tokens=False)["input_ids"])
    k = len(tok(ANSWER, add_special_tokens=False)["input_ids"])
    room = first + k - 1  # the first window ends one piece before the answer does; the second starts with it
    win = qa.encode_windows(tok, [ex], room + question + 3, first, 64)
    spans = qa.window_spans(len(pieces), room, first)
    assert k > 2 and len(win.example) == len(spans) > 2
    labelled = [i for i, (s, e) in enumerate(win.enc.labels) if s]
    assert labelled and 0 not in labelled  # the window that cuts the answer says "not here"
    for i in labelled:
        s, e = win.enc.labels[i]
        assert tok.decode(win.enc.input_ids[i][s : e + 1]) == ANSWER
        assert ex.context[win.offsets[i][s][0] : win.offsets[i][e][1]] == ANSWER
        assert win.enc.token_type_ids[i][s] == 1 and win.enc.input_ids[i][0] == tok.cls_token_id


def test_decode_takes_the_best_span_over_windows_and_the_no_answer_score(setup):
    """Hand-set logits in two windows that both hold the answer: in the second one a higher start logit sits on a
    token the first window gives more context (max context: not a start there); the no-answer score is the
    smallest [CLS] score over the windows."""
    ex = long_example(20)
    win = qa.encode_windows(setup["tok"], [ex], 36, 8, 64)
    (i, (s, e)), (j, (s2, e2)) = [(k, label) for k, label in enumerate(win.enc.labels) if label[0]]
    assert win.max_context[i][s] and not win.max_context[j][s2]
    logits = [torch.zeros(len(ids), 2) for ids in win.enc.input_ids]
    logits[i][s, 0], logits[i][e, 1] = 5.0, 4.0
    decoy = next(p for p, off in enumerate(win.offsets[j]) if off and p < s2 and not win.max_context[j][p])
    logits[j][decoy, 0], logits[j][e2, 1] = 50.0, 4.0
    for row in logits:
        row[0] = torch.tensor([3.0, 3.0])
    logits[-1][0] = torch.tensor([1.0, 0.5])
    texts, odds = qa.decode(win, [ex], logits, n_best=20, max_len=30)
    assert texts == {"q": ANSWER} and odds == {"q": pytest.approx(1.5 - 9.0)}
    texts, _ = qa.decode(win, [ex], logits, n_best=20, max_len=e - s)  # the answer is one piece too long now
    assert texts["q"] != ANSWER


def test_bad_squad_files(tmp_path):
    cases = {
        "a.json": ("[1, 2]", 'no "data" list'),
        "b.json": (
            '{"data": [{"paragraphs": [{"context": "x", "qas": [{"question": "y", "answers": []}]}]}]}',
            "question 1 lacks 'id'",
        ),
        "c.json": ('{"data": []}', "holds no questions"),
        "d.json": ("{", "is not JSON"),
    }
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=match):
            qa.read_squad(str(tmp_path / name), "--train")
    v2 = write_json(tmp_path / "v2.json", squad_json(6, 0, unanswerable=0.5))
    examples, is_v2 = qa.read_squad(str(v2), "--eval")
    assert is_v2 and any(not ex.answers for ex in examples) and all(qa.answer_found(ex) for ex in examples)
    assert not qa.read_squad(str(write_json(tmp_path / "v1.json", squad_json(3, 0))), "--eval")[1]


def answers(doc: dict) -> dict[str, list[str]]:
    return {p["qas"][0]["id"]: [a["text"] for a in p["qas"][0]["answers"]] for p in doc["data"][0]["paragraphs"]}


@pytest.mark.slow
def test_qa_learns_above_trivial_baselines_and_writes_official_predictions(setup):
    """One fact per paragraph amid filler and distractor words, cut into several windows: what is learned is
    finding and delimiting the answer (names of several pieces, two-word places) across windows, against
    answering the training set's most frequent answer or the context's first word."""
    root = setup["root"]
    train, dev = squad_json(300, 1, n_facts=1, filler=8), squad_json(100, 2, n_facts=1, filler=8)
    cfg = FinetuneConfig(
        task="qa",
        train=str(write_json(root / "train.json", train)),
        eval=str(write_json(root / "dev.json", dev)),
        init_from=str(setup["ckpt"]),
        output=str(root / "out"),
        epochs=3,
        lr=2e-3,
        seq_len=24,
        qa=qa.QAOptions(doc_stride=8),
    )
    result = main(cfg)
    gold = answers(dev)
    common = Counter(a[0] for a in answers(train).values()).most_common(1)[0][0]
    firsts = {p["qas"][0]["id"]: p["context"].split()[0] for p in dev["data"][0]["paragraphs"]}
    baseline = max(
        metrics.squad_report(gold, dict.fromkeys(gold, common))["exact"], metrics.squad_report(gold, firsts)["exact"]
    )
    assert baseline < 15 and result["report"]["exact"] > baseline + 45, (baseline, result["history"])
    assert result["truncated"] == {"train": 0, "eval": 0}
    preds = json.loads((root / "out" / "predictions.json").read_text())
    assert set(preds) == set(gold) and all(isinstance(v, str) for v in preds.values())
    rescored = metrics.squad_report(gold, preds)
    assert (rescored["exact"], rescored["f1"]) == (result["report"]["exact"], pytest.approx(result["report"]["f1"]))


def test_squad_v2_run_reports_no_answer_splits(setup, tmp_path):
    dev = squad_json(40, 4, unanswerable=0.4, filler=1)
    cfg = FinetuneConfig(
        task="qa",
        train=str(write_json(tmp_path / "train.json", squad_json(60, 3, unanswerable=0.4, filler=1))),
        eval=str(write_json(tmp_path / "dev.json", dev)),
        init_from=str(setup["ckpt"]),
        output=str(tmp_path / "out"),
        epochs=1,
        seq_len=32,
        qa=qa.QAOptions(doc_stride=8),
    )
    report = main(cfg)["report"]
    assert {"HasAns_exact", "NoAns_exact", "best_f1", "best_f1_thresh", "threshold"} <= set(report)
    assert report["threshold"] == report["best_f1_thresh"] and report["f1"] == pytest.approx(report["best_f1"])
    preds = json.loads((tmp_path / "out" / "predictions.json").read_text())
    odds = json.loads((tmp_path / "out" / "null_odds.json").read_text())
    assert set(preds) == set(odds) == set(answers(dev))
    assert all((preds[q] == "") == (odds[q] > report["threshold"]) for q in preds)


def test_saved_qa_directory_matches_transformers_logits(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = BertConfig.preset("tiny", vocab_size=99, max_position_embeddings=64)
    ours = TaskModel(config, "span").eval()
    save_hf(ours, ours.state_dict(), str(tmp_path))
    theirs = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == "BertForQuestionAnswering"
    ids = torch.randint(5, 99, (3, 12))
    mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5, [1] * 3 + [0] * 9])
    types = (torch.arange(12) >= 6).long().expand(3, 12) * mask
    with torch.no_grad():
        a = ours(ids, types, mask).logits
        b = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()  # padded rows: ours are zeros, HF's meaningless
    torch.testing.assert_close(a[..., 0][real], b.start_logits[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a[..., 1][real], b.end_logits[real], atol=1e-4, rtol=1e-4)
    positions = torch.tensor([[3, 5], [2, 2], [0, 0]])
    with torch.no_grad():  # same loss too where HF's softmax sees no padding (a full row)
        ours_loss = ours(ids[:1], types[:1], mask[:1], labels=positions[:1]).loss
        hf_loss = theirs(
            input_ids=ids[:1],
            token_type_ids=types[:1],
            start_positions=positions[:1, 0],
            end_positions=positions[:1, 1],
        ).loss
    torch.testing.assert_close(ours_loss, hf_loss, atol=1e-5, rtol=1e-5)
