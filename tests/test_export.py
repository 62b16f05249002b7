"""`bert-export`: a checkpoint written by training loads in transformers and gives our model's outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from fixtures_train import ROOT, make_setup, run_env, train_args

from common.errors import run_cli
from pretrain import export
from pretrain.models.bert import BertForPreTraining
from pretrain.runtime.weights import load_weights

ATOL = 1e-5
TEXTS = ["the farmer sold a red bicycle near the river.", "our doctor found the map and talked about the garden."]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short single-process training runs, ZeRO stage 0 and stage 2, launched side by side."""
    root = tmp_path_factory.mktemp("export")
    procs = {}
    for stage in (0, 2):
        setup = make_setup(root, stage=stage)
        cmd = [sys.executable, "-m", "pretrain.train", *train_args(setup, root / f"run{stage}", 3, "--save-every", "2")]
        procs[stage] = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for proc in procs.values():
        out = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, out[-3000:]
    return root


def hf_batch(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]


def assert_transformers_match(model: BertForPreTraining, out_dir, texts):
    """BertForPreTraining, BertModel, BertForMaskedLM and the fill-mask pipeline agree with `model`."""
    import transformers

    model = model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    ids, types, mask = hf_batch(tok, texts)
    assert (mask == 0).any(), "the batch should contain padding"
    real = mask.bool()
    with torch.no_grad():
        ours = model(input_ids=ids, token_type_ids=types, attention_mask=mask)
        seq, pooled = model.bert(ids, types, mask)

        hf = transformers.BertForPreTraining.from_pretrained(str(out_dir)).eval()
        theirs = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        torch.testing.assert_close(theirs.prediction_logits[real], ours.mlm_logits[real], atol=ATOL, rtol=0)
        torch.testing.assert_close(theirs.seq_relationship_logits, ours.nsp_logits, atol=ATOL, rtol=0)

        enc = transformers.BertModel.from_pretrained(str(out_dir)).eval()
        theirs = enc(input_ids=ids, token_type_ids=types, attention_mask=mask)
        torch.testing.assert_close(theirs.last_hidden_state[real], seq[real], atol=ATOL, rtol=0)
        torch.testing.assert_close(theirs.pooler_output, pooled, atol=ATOL, rtol=0)

        mlm = transformers.BertForMaskedLM.from_pretrained(str(out_dir)).eval()
        theirs = mlm(input_ids=ids, token_type_ids=types, attention_mask=mask)
        torch.testing.assert_close(theirs.logits[real], ours.mlm_logits[real], atol=ATOL, rtol=0)

    fill = transformers.pipeline("fill-mask", model=str(out_dir), device="cpu")
    masked = texts[0].split()
    masked[1] = tok.mask_token
    predictions = fill(" ".join(masked), top_k=5)
    ids = tok(" ".join(masked), return_tensors="pt")["input_ids"]
    at = (ids[0] == tok.mask_token_id).nonzero().item()
    with torch.no_grad():
        probs = model(input_ids=ids).mlm_logits[0, at].softmax(-1)
    top = probs.topk(5)
    assert [p["token"] for p in predictions] == top.indices.tolist()
    assert [p["score"] for p in predictions] == pytest.approx(top.values.tolist(), abs=1e-6)


@pytest.mark.parametrize("stage", [0, 2])
def test_export_matches_transformers(runs, stage, tmp_path, capsys):
    run = runs / f"run{stage}"
    assert (run / "latest").read_text() == "step_00000003"
    out = tmp_path / "hf"
    assert export.main([str(run), str(out)]) == 0  # newest checkpoint; tokenizer from the recorded dataset
    assert "verified" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    assert (out / "vocab.txt").read_text() == (runs / "data" / "tokenizer" / "vocab.txt").read_text()

    config, weights = load_weights(str(run))  # the training code's own reading of its checkpoint
    model = export.build_model(config, weights)
    assert_transformers_match(model, out, TEXTS)

    # --tag picks an older checkpoint: different weights, still exported faithfully
    older = tmp_path / "hf_step2"
    assert export.main([str(run), str(older), "--tag", "step_00000002", "--no-verify"]) == 0
    config2, weights2 = load_weights(str(run / "step_00000002"))
    assert not torch.equal(weights2["cls.predictions.bias"], weights["cls.predictions.bias"])
    assert_transformers_match(export.build_model(config2, weights2), older, TEXTS)


def test_user_errors(tmp_path, capsys):
    assert run_cli(export.main, [str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert run_cli(export.main, [str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert "pass --tokenizer DIR" in capsys.readouterr().err
    manifest = tmp_path / "data.json"
    manifest.write_text(json.dumps({"tokenizer": {"path": str(tmp_path / "gone")}}))
    argv = [str(tmp_path / "run"), str(tmp_path / "out"), "--data", str(tmp_path / "data")]
    assert run_cli(export.main, argv) == 2
    assert "is not a directory; pass --tokenizer DIR" in capsys.readouterr().err


@pytest.mark.parametrize("data", [["a", "b"], {"prefixes": ["a", "b"], "seq_len": 128}, "a"])
def test_recorded_data_prefixes_reads_every_checkpoint_layout(tmp_path, data):
    """`train.data` is a DataConfig now, the prefix list (or one prefix) in older checkpoints."""
    from pretrain.runtime import checkpoint

    state = {"step": 1, "config": {"train": {"data": data}}}
    (tmp_path / checkpoint.STATE_FILE).write_text(json.dumps(state))
    assert export.recorded_data_prefixes(tmp_path) == (["a"] if data == "a" else ["a", "b"])
