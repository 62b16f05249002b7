"""A byte-level BPE tokenizer from `bert-prep build` through pretraining to the exported Hugging Face directory:
AutoTokenizer there gives the dataset's ids and BERT's pair layout, and finetune's loader reads it too."""

from __future__ import annotations

import subprocess
import sys

import pytest
import transformers
from fixtures_prep import BPE_ROLES, documents, prep_tokenizers_fixture, run_cli, txt  # noqa: F401
from fixtures_train import ROOT, ds_config_json, run_env, tiny_model_json
from tokenizers import Tokenizer

from data_prep import tokenizer
from data_prep.indexed import IndexedDataset
from pretrain import export

pytestmark = pytest.mark.slow


def test_pretraining_and_export_carry_a_bpe_tokenizer(tmp_path, prep_tokenizers):
    (tmp_path / "a.txt").write_text(txt(documents(60, seed=70)), encoding="utf-8")
    args = ["build", "--input", tmp_path / "a.txt", "--tokenizer", prep_tokenizers["bpe_dir"]]
    assert run_cli(*args, "--output", tmp_path / "data") == 0
    ds = IndexedDataset(tmp_path / "data")
    own = Tokenizer.from_file(str(prep_tokenizers["bpe"]))
    pad = own.token_to_id(BPE_ROLES["pad"])
    model = tiny_model_json(tmp_path / "model.json", vocab_size=own.get_vocab_size(), pad_token_id=pad)
    train = ["--deepspeed_config", ds_config_json(tmp_path / "ds.json"), "--model", model]
    train += [
        "--data",
        str(tmp_path / "data"),
        "--seq-len",
        "48",
        "--train-steps",
        "2",
        "--save",
        str(tmp_path / "run"),
    ]
    train += ["--eval-fraction", "0.1", "--num-workers", "0", "--log-every", "1"]
    r = subprocess.run([sys.executable, "-m", "pretrain.train", *train], cwd=ROOT, env=run_env(), capture_output=True)
    assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()[-3000:]

    export.export(tmp_path / "run", tmp_path / "hf")  # the manifest's tokenizer, checked against our logits
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    sentences = ["The river was known for its music.", "Café 東京 😀 <|mask|> tab\tbed", "  spaced   out  "]
    assert [hf(s, add_special_tokens=False)["input_ids"] for s in sentences] == [
        own.encode(s, add_special_tokens=False).ids for s in sentences
    ]
    special = ds.manifest["tokenizer"]["special_tokens"]
    assert {r: getattr(hf, f"{r}_token_id") for r in special} == special
    a, b = (own.encode(s, add_special_tokens=False).ids for s in sentences[:2])
    pair = hf(sentences[0], sentences[1])
    assert pair["input_ids"] == [special["cls"], *a, special["sep"], *b, special["sep"]]
    assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    again = tokenizer.load(str(tmp_path / "hf"))  # what bert-finetune loads
    assert again(sentences[0], sentences[1])["input_ids"] == pair["input_ids"]
    fill = transformers.pipeline("fill-mask", model=str(tmp_path / "hf"), device="cpu")
    assert len(fill(f"The river {hf.mask_token} known.", top_k=3)) == 3
