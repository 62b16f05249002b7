"""finetune.data: the two readers, label discovery, every bad input of the issue, and WordPiece alignment."""

import pytest
from fixtures_finetune import build_tokenizer, classify_rows, tag_sentences, write_conll, write_csv, write_jsonl

from common.errors import UserError
from data_prep.tokenizer import load as load_tokenizer
from finetune import data


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(str(build_tokenizer(tmp_path_factory.mktemp("tok"))))


def test_csv_and_jsonl_read_the_same_examples(tmp_path):
    rows = classify_rows(12, seed=0)
    a = data.read_classify(str(write_csv(tmp_path / "t.csv", rows)), "text", "label")
    b = data.read_classify(str(write_jsonl(tmp_path / "t.jsonl", rows)), "text", "label")
    assert a == b == [data.ClassifyExample(r["text"], r["label"]) for r in rows]
    assert data.discover_labels(a) == ["food", "sport", "tech"]


def test_sentence_pairs_become_segments(tmp_path, tok):
    rows = [{"q": "the football", "a": "goal of the match", "y": "yes"}, {"q": "bread", "a": "server", "y": "no"}]
    ex = data.read_classify(str(write_jsonl(tmp_path / "p.jsonl", rows)), "q", "y", pair="a")
    enc = data.encode_classify(tok, ex, ["no", "yes"], 64, False, "p.jsonl")
    ref = tok("the football", "goal of the match")
    assert enc.input_ids[0] == ref["input_ids"] and enc.token_type_ids[0] == ref["token_type_ids"]
    assert set(enc.token_type_ids[0]) == {0, 1} and enc.labels == [1, 0]


@pytest.mark.parametrize(
    "content, name, match",
    [
        ("", "e.csv", "is empty"),
        ("   \n\n", "e.jsonl", "is empty"),
        ("text,label\n", "h.csv", "header but no examples"),
        ("sentence,label\nhello,a\n", "c.csv", "no column 'text'.*--text-column"),
        ("text,tag\nhello,a\n", "c.csv", "no column 'label'.*--label-column"),
        ('{"text": "a", "label": "x"}\n{"text": "b"\n', "j.jsonl", r"j.jsonl line 2 is not JSON"),
    ],
)
def test_bad_classify_files(tmp_path, content, name, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=match):
        data.read_classify(str(tmp_path / name), "text", "label")


def test_missing_file_and_missing_pair_column(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.read_classify(str(tmp_path / "nope.csv"), "text", "label")
    path = write_csv(tmp_path / "t.csv", classify_rows(3, seed=1))
    with pytest.raises(UserError, match="--pair-column"):
        data.read_classify(str(path), "text", "label", pair="hypothesis")


def test_eval_label_unseen_in_training(tmp_path):
    train = data.read_classify(str(write_csv(tmp_path / "a.csv", [{"text": "x", "label": "pos"}] * 2)), "text", "label")
    evals = data.read_classify(str(write_csv(tmp_path / "b.csv", [{"text": "y", "label": "neg"}])), "text", "label")
    with pytest.raises(UserError, match="'neg' never occurs in the training file"):
        data.check_labels(evals, data.discover_labels(train), "b.csv")


def test_conll_reader(tmp_path):
    text = "-DOCSTART- -X- O O\n\nEU NNP B-ORG\nrejects VBZ O\n\n\nPeter NNP B-PER\nBlackburn NNP I-PER\n"
    (tmp_path / "c.conll").write_text(text)
    sents = data.read_conll(str(tmp_path / "c.conll"))
    assert [(s.words, s.tags, s.line) for s in sents] == [
        (["EU", "rejects"], ["B-ORG", "O"], 3),
        (["Peter", "Blackburn"], ["B-PER", "I-PER"], 7),
    ]
    assert data.discover_labels(sents) == ["O", "B-ORG", "I-ORG", "B-PER", "I-PER"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("a O\nb O\n\nlonely\n", r"c.conll:4: expected 'TOKEN TAG'"),
        ("a O\nb PERSON\n", r"c.conll:2: tag 'PERSON' is not BIO"),
        ("a O\nb B-\n", r"c.conll:2: tag 'B-' is not BIO"),
        ("\n\n-DOCSTART- O\n", "has no sentences"),
    ],
)
def test_bad_conll_names_the_line(tmp_path, text, match):
    (tmp_path / "c.conll").write_text(text)
    with pytest.raises(UserError, match=match):
        data.read_conll(str(tmp_path / "c.conll"))


def test_unseen_tag_in_eval_names_the_sentence(tmp_path):
    write_conll(tmp_path / "t.conll", [[("a", "B-PER"), ("b", "O")]])
    write_conll(tmp_path / "e.conll", [[("a", "O")], [("x", "B-LOC")]])
    labels = data.discover_labels(data.read_conll(str(tmp_path / "t.conll")))
    with pytest.raises(UserError, match=r"e.conll:3: label 'B-LOC' never occurs"):
        data.check_labels(data.read_conll(str(tmp_path / "e.conll")), labels, "e.conll")


def test_tags_go_to_first_wordpiece(tmp_path, tok):
    sents = data.read_conll(str(write_conll(tmp_path / "t.conll", tag_sentences(40, seed=5))))
    labels = data.discover_labels(sents)
    enc = data.encode_tag(tok, sents, labels, 64, False, "t.conll")
    split = 0
    for sent, ids, label_ids, firsts in zip(sents, enc.input_ids, enc.labels, enc.word_index):
        pieces = [tok.tokenize(w) for w in sent.words]  # independent: one word at a time
        split += sum(len(p) > 1 for p in pieces)
        expected = [data.IGNORE_INDEX]
        for p, tag in zip(pieces, sent.tags):
            expected += [labels.index(tag)] + [data.IGNORE_INDEX] * (len(p) - 1)
        assert label_ids == expected + [data.IGNORE_INDEX]
        assert ids == [tok.cls_token_id, *tok.convert_tokens_to_ids([t for p in pieces for t in p]), tok.sep_token_id]
        assert firsts == [i for i, y in enumerate(label_ids) if y != data.IGNORE_INDEX]
    assert split > 10  # the alignment was actually exercised


def test_long_sequences_truncated_and_counted_or_rejected(tmp_path, tok):
    long = " ".join(["football"] * 40)
    ex = [data.ClassifyExample(long, "a"), data.ClassifyExample("football", "b")]
    enc = data.encode_classify(tok, ex, ["a", "b"], 16, False, "x.csv")
    assert (
        enc.truncated == 1 and [len(i) for i in enc.input_ids] == [16, 3] and enc.input_ids[0][-1] == tok.sep_token_id
    )
    with pytest.raises(UserError, match="example 1 is 42 tokens, longer than --seq-len 16"):
        data.encode_classify(tok, ex, ["a", "b"], 16, True, "x.csv")
    sents = [data.TagExample(["football"] * 30, ["B-X"] + ["I-X"] * 29, 1)]
    tagged = data.encode_tag(tok, sents, ["O", "B-X", "I-X"], 10, False, "t.conll")
    assert tagged.truncated == 1 and len(tagged.input_ids[0]) == 10 and len(tagged.word_index[0]) == 8
    with pytest.raises(UserError, match="t.conll:1"):
        data.encode_tag(tok, sents, ["O", "B-X", "I-X"], 10, True, "t.conll")


def test_batches_pad_right(tok):
    enc = data.Encoded([[2, 5, 3], [2, 3]], [[0, 0, 0], [0, 0]], [[-100, 1, -100], [-100, -100]], token_labels=True)
    (batch,) = data.batches(enc, [0, 1], 8, pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 1, -100], [-100, -100, -100]]
