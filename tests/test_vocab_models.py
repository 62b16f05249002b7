"""`bert-prep vocab --model bpe|unigram` (issue 28, item 7): deterministic, WordPiece's special tokens, and a
ModernBERT model pretrained on data tokenized with the vocabulary exports a config.json that transformers
loads without a warning."""

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from fixtures_prep import run_cli as prep_cli
from fixtures_train import _documents, ds_config_json

from data_prep.vocab import SPECIALS


def corpus(root: Path) -> Path:
    path = root / "text.txt"
    path.write_text("".join("\n".join(d) + "\n\n" for d in _documents(80, 0)), encoding="utf-8")
    return path


def test_the_same_inputs_give_the_same_tokenizer_with_wordpieces_special_ids(tmp_path):
    import transformers

    text = corpus(tmp_path)
    for name in ("a", "b"):
        args = ["vocab", "--input", text, "--vocab-size", "300", "--output", tmp_path / name, "--model", "bpe"]
        assert prep_cli(*args, "--no-progress") == 0
    a, b = ((tmp_path / n / "tokenizer.json").read_bytes() for n in ("a", "b"))
    assert a == b and not (tmp_path / "a" / "vocab.txt").exists()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert tok.convert_tokens_to_ids(SPECIALS) == [0, 1, 2, 3, 4]
    assert (tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token) == tuple(SPECIALS)
    ids = tok("the farmer sold a red bicycle", "near the river")["input_ids"]
    assert ids[0] == 2 and ids.count(3) == 2 and ids[-1] == 3
    assert tok.decode(ids, skip_special_tokens=True).replace(
        " ", ""
    ) == "thefarmersoldaredbicyclenearthe river".replace(" ", "")
    assert tok.unk_token_id not in tok("café 東京 😀")["input_ids"]


def test_unigram_is_the_same_in_two_processes_with_wordpieces_special_ids(tmp_path):
    import transformers

    text = corpus(tmp_path)
    for name in ("a", "b"):  # separate processes: hash-map order differs between processes, not within one
        args = ["vocab", "--input", text, "--vocab-size", "300", "--output", tmp_path / name, "--model", "unigram"]
        cmd = [sys.executable, "-m", "data_prep.cli", *map(str, args), "--no-progress"]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONHASHSEED": "random"}, capture_output=True)
    a, b = ((tmp_path / n / "tokenizer.json").read_bytes() for n in ("a", "b"))
    assert a == b and not (tmp_path / "a" / "vocab.txt").exists()
    model = json.loads(a)["model"]
    assert model["type"] == "Unigram" and model["unk_id"] == 1 and len(model["vocab"]) > 50
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert tok.convert_tokens_to_ids(SPECIALS) == [0, 1, 2, 3, 4]
    assert (tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token) == tuple(SPECIALS)
    ids = tok("The farmer  sold a red bicycle", "near the river")["input_ids"]
    assert ids[0] == 2 and ids.count(3) == 2 and ids[-1] == 3 and 1 not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "the farmer sold a red bicycle near the river"
    assert tok("a [MASK] b")["input_ids"].count(4) == 1


@pytest.mark.parametrize("model", ["bpe", "unigram"])
def test_a_modernbert_model_exports_a_config_transformers_loads_quietly(tmp_path, caplog, model):
    import transformers

    from pretrain.data_config import DataConfig
    from pretrain.export import export
    from pretrain.train import main
    from pretrain.train_config import TrainConfig

    text = corpus(tmp_path)
    vocab = ["vocab", "--input", text, "--vocab-size", "300", "--output", tmp_path / "tok", "--model", model]
    assert prep_cli(*vocab, "--no-progress") == 0
    prefix = str(tmp_path / "data" / "corpus")
    assert prep_cli("build", "--input", text, "--tokenizer", tmp_path / "tok", "--output", prefix) == 0
    size = json.loads(Path(prefix + ".json").read_text())["tokenizer"]["vocab_size"]
    data = DataConfig([prefix], seq_len=32, eval_fraction=0.1, num_workers=0)
    cfg = TrainConfig(
        deepspeed_config=ds_config_json(tmp_path / "ds.json", micro_batch=2),
        model="modernbert-tiny",
        model_set=[f"vocab_size={size}"],  # the token ids come from the manifest (pretrain.identity)
        data=data,
        save=str(tmp_path / "run"),
        train_steps=2,
    )
    main(cfg)
    export(tmp_path / "run", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert [config[f"{r}_token_id"] for r in ("pad", "cls", "sep", "bos", "eos")] == [0, 2, 3, 2, 3]
    transformers.logging.enable_propagation()
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "hf"))
            transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    finally:
        transformers.logging.disable_propagation()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] + [str(w.message) for w in caught]
    assert not said, said
