"""bert-finetune end to end: from a tiny checkpoint to a high score on generated tasks, and the Hugging Face
directory it writes gives the same predictions in `transformers` as our model and as our report."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from fixtures_finetune import (
    build_tokenizer,
    classify_rows,
    hf_predictions,
    tag_sentences,
    tiny_checkpoint,
    write_conll,
    write_csv,
)
from fixtures_train import free_port

from finetune import data, metrics
from finetune.config import FinetuneConfig
from finetune.model import TaskModel, save_hf
from finetune.run import cli, main
from pretrain.models.bert import BertConfig

ROOT = Path(__file__).resolve().parent.parent
HEAD = {"classify": "sequence", "tag": "token"}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    tok = build_tokenizer(root / "tok")
    return {
        "root": root,
        "ckpt": tiny_checkpoint(root / "ckpt", tok),
        "train_csv": write_csv(root / "train.csv", classify_rows(300, seed=1)),
        "dev_csv": write_csv(root / "dev.csv", classify_rows(90, seed=2)),
        "train_conll": write_conll(root / "train.conll", tag_sentences(300, seed=3)),
        "dev_conll": write_conll(root / "dev.conll", tag_sentences(90, seed=4)),
    }


def test_classify_learns_the_task_and_hf_agrees(task):
    out = task["root"] / "out_classify"
    cfg = FinetuneConfig(
        task="classify",
        train=str(task["train_csv"]),
        eval=str(task["dev_csv"]),
        init_from=str(task["ckpt"]),
        output=str(out),
        epochs=4,
        lr=1e-3,
        seq_len=32,
    )
    result = main(cfg)
    gold = [ex.label for ex in data.read_classify(str(task["dev_csv"]), "text", "label")]
    assert max(Counter(gold).values()) / len(gold) < 0.4  # a constant guess is at chance
    assert result["accuracy"] >= 0.9, result["history"]
    saved = json.loads((out / "eval_report.json").read_text())
    assert saved["report"]["accuracy"] == result["accuracy"] and saved["best_epoch"] == result["best_epoch"]
    assert set(saved["report"]["per_class"]) == {"food", "sport", "tech"}
    hf = metrics.classification_report(gold, hf_predictions(out, task["dev_csv"], "classify"))
    assert hf == result["report"]


def test_tag_learns_entities_and_hf_agrees(task):
    out = task["root"] / "out_tag"
    cfg = FinetuneConfig(
        task="tag",
        train=str(task["train_conll"]),
        eval=str(task["dev_conll"]),
        init_from=str(task["ckpt"]),
        output=str(out),
        epochs=4,
        lr=2e-3,
        seq_len=32,
    )
    result = main(cfg)
    assert result["f1"] >= 0.85, result["history"]
    assert set(result["report"]["per_type"]) == {"PER", "LOC"}
    assert {"micro avg", "macro avg", "weighted avg"} <= set(
        json.loads((out / "eval_report.json").read_text())["report"]
    )
    gold = [ex.tags for ex in data.read_conll(str(task["dev_conll"]))]
    hf = metrics.entity_report(gold, hf_predictions(out, task["dev_conll"], "tag"))
    assert hf == result["report"]


def test_early_stopping_keeps_the_best_epoch(task, tmp_path):
    """With a learning rate too small to change a prediction, epoch 2 is no better: patience 1 stops there."""
    cfg = FinetuneConfig(
        task="classify",
        train=str(task["train_csv"]),
        eval=str(task["dev_csv"]),
        init_from=str(task["ckpt"]),
        output=str(tmp_path),
        epochs=5,
        lr=1e-9,
        seq_len=32,
        patience=1,
        batch=32,
    )
    result = main(cfg)
    assert [h["epoch"] for h in result["history"]] == [1, 2] and result["best_epoch"] == 1
    assert result["history"][0]["accuracy"] == result["history"][1]["accuracy"]


@pytest.mark.parametrize("task_name", ["classify", "tag"])
def test_saved_directory_matches_transformers_logits(tmp_path, task_name):
    import transformers

    torch.manual_seed(0)
    config = BertConfig.preset("tiny", vocab_size=99, max_position_embeddings=64)
    ours = TaskModel(config, HEAD[task_name], ["x", "y", "z"]).eval()
    save_hf(ours, ours.state_dict(), str(tmp_path))
    cls = (
        transformers.BertForSequenceClassification
        if task_name == "classify"
        else transformers.BertForTokenClassification
    )
    theirs = cls.from_pretrained(tmp_path).eval()
    assert theirs.config.id2label == {0: "x", 1: "y", 2: "z"} and theirs.config.architectures == [cls.__name__]
    ids = torch.randint(5, 99, (3, 12))
    mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5, [1] * 3 + [0] * 9])
    types = (torch.arange(12) >= 6).long().expand(3, 12) * mask
    with torch.no_grad():
        a, b = ours(ids, types, mask).logits, theirs(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
    real = mask.bool() if task_name == "tag" else slice(None)  # padded rows: ours are zeros, HF's meaningless
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=1e-4)


def test_encoder_weights_come_from_the_checkpoint(task):
    from pretrain.models.bert import BertForPreTraining

    pretrained = BertForPreTraining.from_hf_pretrained(str(task["ckpt"]))
    model = TaskModel(pretrained.config, "sequence", ["a", "b"])
    model.load_pretrained(pretrained.state_dict())
    for name, p in model.bert.state_dict().items():
        torch.testing.assert_close(p, pretrained.bert.state_dict()[name], atol=0, rtol=0)


def test_cli_unseen_eval_label_is_a_one_line_error(task, tmp_path, capsys):
    dev = write_csv(tmp_path / "dev.csv", [{"text": "the laptop", "label": "tech"}, {"text": "a car", "label": "cars"}])
    args = ["--task", "classify", "--train", str(task["train_csv"]), "--eval", str(dev)]
    with pytest.raises(SystemExit) as exit_info:
        cli([*args, "--init-from", str(task["ckpt"]), "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'cars' never occurs in the training file" in err and "Traceback" not in err


@pytest.mark.slow
def test_two_processes_through_the_deepspeed_launcher(task, tmp_path):
    """`deepspeed --module finetune.run` with ZeRO-2 and bf16: ranks stay in step and the result still learns."""
    ds = json.loads((ROOT / "ds_configs" / "finetune_cpu.json").read_text())
    ds.update(zero_optimization={"stage": 2}, bf16={"enabled": True}, train_micro_batch_size_per_gpu=8)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    out = tmp_path / "out"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += ["--module", "finetune.run", "--task", "classify", "--train", str(task["train_csv"])]
    cmd += ["--eval", str(task["dev_csv"]), "--init-from", str(task["ckpt"]), "--output", str(out)]
    cmd += ["--epochs", "4", "--lr", "1e-3", "--seq-len", "32", "--deepspeed_config", str(tmp_path / "ds.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "eval_report.json").read_text())
    assert report["accuracy"] >= 0.9, report["history"]
    gold = [ex.label for ex in data.read_classify(str(task["dev_csv"]), "text", "label")]
    assert metrics.classification_report(gold, hf_predictions(out, task["dev_csv"], "classify"))["accuracy"] >= 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_gpu_learns_the_task(task, tmp_path):
    ds = json.loads((ROOT / "ds_configs" / "finetune_cpu.json").read_text())
    ds["fp16"] = {"enabled": True, "initial_scale_power": 12}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = FinetuneConfig(
        task="classify",
        train=str(task["train_csv"]),
        eval=str(task["dev_csv"]),
        init_from=str(task["ckpt"]),
        output=str(tmp_path / "out"),
        epochs=3,
        lr=1e-3,
        seq_len=32,
        deepspeed_config=str(tmp_path / "ds.json"),
    )
    assert main(cfg)["accuracy"] >= 0.9


@pytest.mark.slow
def test_from_a_pretraining_save_directory(task, tmp_path):
    """--init-from a `bert-pretrain --save` directory: weights via load_weights, tokenizer via the dataset manifest."""
    from fixtures_train import make_setup, run_env, train_args

    from pretrain.runtime.weights import load_weights

    setup = make_setup(tmp_path)
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.train", *train_args(setup, save, 3)]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    cfg = FinetuneConfig(
        task="classify",
        train=str(task["train_csv"]),
        eval=str(task["dev_csv"]),
        init_from=str(save),
        output=str(out),
        epochs=1,
        lr=1e-9,
        seq_len=32,
    )
    main(cfg)
    _, pretrained = load_weights(save)
    from safetensors.torch import load_file

    tuned = load_file(out / "model.safetensors")
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.output.dense.weight"):
        torch.testing.assert_close(tuned[name], pretrained[name], atol=1e-6, rtol=0)
    manifest = json.loads(Path(setup["prefix"] + ".json").read_text())
    import transformers

    shipped = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    assert shipped == transformers.AutoTokenizer.from_pretrained(manifest["tokenizer"]["path"]).get_vocab()
