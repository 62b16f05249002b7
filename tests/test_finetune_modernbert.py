"""bert-finetune on ModernBERT, through the code BERT takes: the saved directories against transformers'
ModernBertFor{SequenceClassification,TokenClassification,QuestionAnswering}, tiny classify and tag runs that learn
and that transformers predicts the same from (with the saved byte-level BPE tokenizer), a GLUE pair task and a
QA run decoded from transformers' logits, ZeRO-3 against stage 0 for both families, and `--init-from` each
kind of ModernBERT source: a transformers-written directory, our bf16 pretraining checkpoint (its fp32 master
weights) and its `bert-export` directory."""

import dataclasses
import json
import warnings
from collections import Counter

import pytest
import torch
import transformers
from fixtures_finetune import (
    QA_WORDS,
    build_bpe_tokenizer,
    build_tokenizer,
    classify_rows,
    hf_predictions,
    squad_json,
    tag_sentences,
    tiny_checkpoint,
    tiny_modernbert,
    write_conll,
    write_csv,
    write_glue,
    write_json,
)
from safetensors.torch import load_file

from finetune import data, metrics
from finetune.config import FinetuneConfig
from finetune.kinds import qa
from finetune.model import TaskModel, save_hf
from finetune.run import default_lr, main, make_task
from pretrain.models import config_from_json
from pretrain.models.modernbert import ModernBertConfig
from pretrain.runtime import engine

ROOT_DS = "ds_configs/finetune_cpu.json"
HF_CLASSES = {
    "sequence": transformers.ModernBertForSequenceClassification,
    "token": transformers.ModernBertForTokenClassification,
    "span": transformers.ModernBertForQuestionAnswering,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A transformers-written ModernBERT (2 layers, the second local) with a BPE tokenizer, and the tasks."""
    root = tmp_path_factory.mktemp("finetune_modernbert")
    tok = build_bpe_tokenizer(root / "tok", vocab_size=500, extra=QA_WORDS)  # most names in pieces
    return {
        "root": root,
        "tok": tok,
        "hf": tiny_modernbert(root / "hf", tok),
        "train_csv": write_csv(root / "train.csv", classify_rows(300, seed=1)),
        "dev_csv": write_csv(root / "dev.csv", classify_rows(90, seed=2)),
        "train_conll": write_conll(root / "train.conll", tag_sentences(300, seed=3)),
        "dev_conll": write_conll(root / "dev.conll", tag_sentences(90, seed=4)),
    }


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every parameter (norms and head too), so no default init hides a mismatch."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize(
    "kind, pooling, regression",
    [("sequence", "cls", False), ("sequence", "mean", False), ("sequence", "mean", True), ("token", "mean", False)]
    + [("span", "cls", False)],
)
def test_saved_directory_matches_transformers(tmp_path, kind, pooling, regression):
    """Logits and loss of our model and of transformers' class on the directory we save; a local window (8)
    shorter than the rows, padding in the batch; exactly transformers' parameters, none missing or extra."""
    config = ModernBertConfig.preset(
        "modernbert-tiny",
        vocab_size=99,
        pad_token_id=0,
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=96,
        num_hidden_layers=3,
        local_attention=8,
        classifier_pooling=pooling,
    )
    labels = [] if kind == "span" or regression else ["x", "y", "z"]
    ours = TaskModel(config, kind, labels, regression).eval()
    randomize(ours)
    save_hf(ours, ours.state_dict(), str(tmp_path))
    theirs = transformers.AutoModelForQuestionAnswering if kind == "span" else None
    theirs = (theirs or HF_CLASSES[kind]).from_pretrained(tmp_path).eval()
    assert type(theirs) is HF_CLASSES[kind] and theirs.config.architectures == [HF_CLASSES[kind].__name__]
    assert set(load_file(tmp_path / "model.safetensors")) == set(theirs.state_dict())
    assert theirs.config.id2label == ({0: "x", 1: "y", 2: "z"} if labels else theirs.config.id2label)
    ids = torch.randint(1, 99, (3, 20))
    mask = torch.tensor([[1] * 20, [1] * 13 + [0] * 7, [1] * 6 + [0] * 14])
    gold = {
        "sequence": torch.tensor([1.5, -0.2, 0.7]) if regression else torch.tensor([2, 0, 1]),
        "token": torch.randint(0, 3, (3, 20)).masked_fill(mask == 0, -100),
        "span": torch.tensor([[3, 5], [2, 2], [0, 0]]),
    }[kind]
    with torch.no_grad():
        a = ours(ids, None, mask, labels=gold)
        if kind == "span":
            b = theirs(input_ids=ids[:1], start_positions=gold[:1, 0], end_positions=gold[:1, 1])
            loss = ours(ids[:1], labels=gold[:1]).loss  # transformers' span loss sees padding: a full row
            full = theirs(input_ids=ids, attention_mask=mask)
            logits = torch.stack([full.start_logits, full.end_logits], -1)
        else:
            b = theirs(input_ids=ids, attention_mask=mask, labels=gold)
            loss, logits = a.loss, b.logits
    real = mask.bool() if kind != "sequence" else slice(None)  # padded rows: ours are zeros, theirs meaningless
    assert a.logits.abs().max() > 0.1
    torch.testing.assert_close(a.logits[real], logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, b.loss, atol=1e-5, rtol=1e-5)


def finetune(setup, task: str, out, **kw) -> dict:
    files = {"classify": ("train_csv", "dev_csv"), "tag": ("train_conll", "dev_conll")}[task]
    kw = {"epochs": 4, "seq_len": 64, "init_from": str(setup["hf"]), **kw}
    return main(FinetuneConfig(task=task, train=str(setup[files[0]]), eval=str(setup[files[1]]), output=str(out), **kw))


@pytest.mark.parametrize("task, lr, floor", [("classify", 1e-3, 0.9), ("tag", 2e-3, 0.85)])
def test_learns_the_task_and_transformers_predicts_the_same(setup, task, lr, floor):
    """From the transformers-written directory; the output loads in transformers' ModernBERT class with the saved
    tokenizer (no token_type_ids among its inputs) and gives our report, metric for metric."""
    out = setup["root"] / f"out_{task}"
    result = finetune(setup, task, out, lr=lr)
    assert result[result["metric"]] >= floor, result["history"]
    if task == "classify":
        gold = [ex.label for ex in data.read_classify(str(setup["dev_csv"]), "text", "label")]
        assert max(Counter(gold).values()) / len(gold) < 0.4  # a constant guess is at chance
        hf = metrics.classification_report(gold, hf_predictions(out, setup["dev_csv"], task, max_length=64))
    else:
        gold = [ex.tags for ex in data.read_conll(str(setup["dev_conll"]))]
        hf = metrics.entity_report(gold, hf_predictions(out, setup["dev_conll"], task, max_length=64))
    assert hf == result["report"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "modernbert" and saved["classifier_pooling"] == "mean"
    assert transformers.AutoTokenizer.from_pretrained(out).model_input_names == ["input_ids", "attention_mask"]


def test_glue_pair_task_through_bert_glue_matches_transformers_and_the_family_tokenizer(setup, tmp_path):
    """`bert-glue` on an MRPC-layout task: sentence pairs encoded as ModernBERT's own tokenizer does (`[CLS] a [SEP]
    b [SEP]`, no segment ids), trained at the default learning rate for the width, and the --predict submission is
    what transformers predicts from the saved directory, pair for pair."""
    from finetune.suite import SuiteConfig
    from finetune.suite import main as bert_glue

    write_glue(tmp_path, "mrpc", 60, 20, 12)
    run = FinetuneConfig(
        data_dir=str(tmp_path), init_from=str(setup["hf"]), output=str(tmp_path / "glue"), epochs=1, seq_len=64
    )
    result = bert_glue(SuiteConfig(tasks=["mrpc"], seeds=[1], run=dataclasses.replace(run, predict=True)))
    assert [r["lr"] for r in result["runs"]] == [default_lr(128)] and default_lr(128) == pytest.approx(3e-4)
    out = tmp_path / "glue" / "mrpc" / "lr_default" / "seed1"
    test = make_task(dataclasses.replace(run, glue_task="mrpc", predict=True)).test_sets[0][2]
    family, saved = (transformers.AutoTokenizer.from_pretrained(d) for d in (setup["tok"], out))
    pairs = ([ex.text for ex in test], [ex.pair for ex in test])
    assert saved(*pairs)["input_ids"] == family(*pairs)["input_ids"] and "token_type_ids" not in saved(*pairs)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(**saved(*pairs, padding=True, truncation=True, max_length=64, return_tensors="pt")).logits
    submitted = (out / "submission" / "MRPC.tsv").read_text().splitlines()[1:]
    assert [line.split("\t")[1] for line in submitted] == [model.config.id2label[i] for i in logits.argmax(-1).tolist()]


def test_qa_predictions_are_transformers_decoded(setup, tmp_path):
    """A SQuAD v1.1 run (windows over long contexts): decoding transformers' start/end logits of the saved
    ModernBertForQuestionAnswering on the same windows gives OUTPUT/predictions.json, answer for answer."""
    dev = squad_json(30, 2, n_facts=1, filler=8)
    cfg = FinetuneConfig(
        task="qa",
        train=str(write_json(tmp_path / "train.json", squad_json(60, 1, n_facts=1, filler=8))),
        eval=str(write_json(tmp_path / "dev.json", dev)),
        init_from=str(setup["hf"]),
        output=str(tmp_path / "out"),
        epochs=1,
        seq_len=32,
        qa=qa.QAOptions(doc_stride=8),
    )
    main(cfg)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "out").eval()
    assert type(model) is transformers.ModernBertForQuestionAnswering
    examples, _ = qa.read_squad(cfg.eval, "--eval")
    windows = qa.encode_windows(transformers.AutoTokenizer.from_pretrained(tmp_path / "out"), examples, 32, 8, 64)
    assert windows.enc.token_type_ids is None and len(windows.example) > len(examples)  # long contexts: windows
    logits = []
    with torch.no_grad():
        for ids in windows.enc.input_ids:
            out = model(input_ids=torch.tensor([ids]))
            logits.append(torch.stack([out.start_logits[0], out.end_logits[0]], -1))
    texts, _ = qa.decode(windows, examples, logits, cfg.qa.n_best, cfg.qa.max_answer_length)
    assert json.loads((tmp_path / "out" / "predictions.json").read_text()) == texts
    assert all(t == t.strip() for t in texts.values())  # byte-level pieces' leading spaces stay out of answers


def test_zero3_reaches_the_fast_path_choice_of_both_families(setup, tmp_path):
    """The engine's ZeRO-3 `set_weights_partitioned` lands on the task model and so on its encoder's paths:
    BERT's fused QKV (which reads weights outside their modules) steps aside, with its warning."""
    ckpt = tiny_checkpoint(tmp_path / "bert", build_tokenizer(tmp_path / "tok"))
    cfg = json.loads(open(ROOT_DS).read())
    cfg.update(zero_optimization={"stage": 3}, optimizer={"type": "AdamW", "params": {"lr": 1e-3}})
    for path in (ckpt, setup["hf"]):
        model = TaskModel(config_from_json(str(path / "config.json")), "sequence", ["a", "b"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.initialize(model, cfg, total_steps=2)
            model.paths.get(torch.device("cpu"), torch.float32)
        assert model.encoder.paths.partitioned
        fallback = [str(w.message) for w in caught if "fused_qkv=true falls back" in str(w.message)]
        assert bool(fallback) == (model.config.model_type == "bert")


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_zero3_fine_tunes_like_stage0(setup, tmp_path, family):
    """One epoch at ZeRO stage 3 (every weight partitioned: no persistence threshold) and at stage 0 from the same
    checkpoint and seed: the same saved model."""
    if family == "bert":
        init = tiny_checkpoint(tmp_path / "bert", build_tokenizer(tmp_path / "tok"))
    else:
        init = setup["hf"]
    ds = json.loads(open(ROOT_DS).read())
    saved = {}
    for stage in (0, 3):
        ds["zero_optimization"] = {"stage": stage, "stage3_param_persistence_threshold": 0}
        (tmp_path / f"ds{stage}.json").write_text(json.dumps(ds))
        out = tmp_path / f"out{stage}"
        main(
            FinetuneConfig(
                task="classify",
                train=str(write_csv(tmp_path / "train.csv", classify_rows(48, seed=5))),
                eval=str(setup["dev_csv"]),
                init_from=str(init),
                output=str(out),
                epochs=1,
                lr=1e-3,
                seq_len=64,
                deepspeed_config=str(tmp_path / f"ds{stage}.json"),
            )
        )
        saved[stage] = load_file(out / "model.safetensors")
    assert set(saved[3]) == set(saved[0])
    for k in saved[0]:
        torch.testing.assert_close(saved[3][k], saved[0][k], atol=1e-5, rtol=1e-4, msg=k)


def test_from_our_bf16_checkpoint_and_its_export(setup, tmp_path):
    """`--init-from` a ModernBERT pretraining --save directory trained in bf16 (its fp32 master weights through
    load_weights, not the bf16 module copy; the tokenizer through the dataset manifest) and from its `bert-export`
    directory: both start from the same weights, so with one seed both runs save the same model."""
    from fixtures_prep import run_cli

    from pretrain import export
    from pretrain.data_config import DataConfig
    from pretrain.runtime import weights
    from pretrain.train import main as pretrain
    from pretrain.train_config import TrainConfig

    rows = [row["text"] for row in classify_rows(240, seed=9)]
    docs = ["".join(f"{r.capitalize()}. " for r in rows[i : i + 3]) + "\n\n" for i in range(0, len(rows), 3)]
    (tmp_path / "corpus.txt").write_text("".join(docs))
    build = ["build", "--input", tmp_path / "corpus.txt", "--tokenizer", setup["tok"], "--output", tmp_path / "d"]
    assert run_cli(*build) == 0
    tok = transformers.AutoTokenizer.from_pretrained(setup["tok"])
    model_set = [f"vocab_size={len(tok)}", f"pad_token_id={tok.pad_token_id}", f"cls_token_id={tok.cls_token_id}"]
    model_set += [f"sep_token_id={tok.sep_token_id}", "hidden_size=64", "num_attention_heads=2", "num_hidden_layers=2"]
    model_set += ["intermediate_size=96", "local_attention=16", "max_position_embeddings=64"]
    ds = json.loads(open(ROOT_DS).read())
    ds.update(bf16={"enabled": True}, optimizer={"type": "AdamW", "params": {"lr": 3e-3}})
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    data_cfg = DataConfig([str(tmp_path / "d")], seq_len=64, eval_fraction=0.1, num_workers=0, pair_task="none",
                          packing=True, mask_prob=0.3)  # fmt: skip
    save = tmp_path / "run"
    pretrain(TrainConfig(deepspeed_config=str(tmp_path / "ds.json"), model="modernbert-tiny", model_set=model_set,
                         data=data_cfg, save=str(save), train_steps=4, log_every=0))  # fmt: skip
    export.export(save, tmp_path / "hf")
    _, masters = weights.load_weights(save)
    train, outs = write_csv(tmp_path / "t.csv", classify_rows(32, seed=3)), {}
    for name, init in (("ckpt", save), ("export", tmp_path / "hf")):
        outs[name] = tmp_path / f"out_{name}"
        main(FinetuneConfig(task="classify", train=str(train), eval=str(setup["dev_csv"]), init_from=str(init),
                            output=str(outs[name]), epochs=1, lr=1e-9, seq_len=64))  # fmt: skip
    tuned, exported = (load_file(outs[n] / "model.safetensors") for n in ("ckpt", "export"))
    assert tuned.keys() == exported.keys()
    for k in tuned:
        torch.testing.assert_close(tuned[k], exported[k], atol=0, rtol=0, msg=k)
    rounded = 0
    for k in [k for k in tuned if k.startswith(("model.", "head."))]:
        torch.testing.assert_close(tuned[k], masters[k], atol=1e-6, rtol=0, msg=k)
        rounded += not torch.equal(masters[k], masters[k].bfloat16().float())
    assert rounded  # the masters are not the bf16 copy: taking that one would fail above
    shipped = transformers.AutoTokenizer.from_pretrained(outs["ckpt"])
    assert shipped.get_vocab() == tok.get_vocab() and shipped.model_input_names == ["input_ids", "attention_mask"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_gpu_learns_the_task(setup, tmp_path):
    """On CUDA: varlen attention over the unpadded rows and the fused LayerNorm where apex is installed."""
    ds = json.loads(open(ROOT_DS).read())
    ds["bf16"] = {"enabled": True}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    result = finetune(setup, "classify", tmp_path / "out", lr=1e-3, deepspeed_config=str(tmp_path / "ds.json"))
    assert result["accuracy"] >= 0.85, result["history"]
