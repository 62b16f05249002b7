"""Identity checks (issue 28, item 2; silent cases 1 and 3): the data's special-token ids reach the model config
and the exported config.json, and a checkpoint meets only the tokenizer it was trained with (export, resume,
fine-tuning), unless --allow-tokenizer-change says the change is meant."""

import json
import warnings
from pathlib import Path

import pytest
from fixtures_prep import run_cli as prep_cli
from fixtures_train import _documents, build_tokenizer, ds_config_json, make_dataset, tiny_model_json

from common.errors import UserError
from pretrain import identity
from pretrain.data_config import DataConfig
from pretrain.export import export
from pretrain.train import main
from pretrain.train_config import TrainConfig

MODERN = ["vocab_size=256", "pad_token_id=0"]  # the README's --model-set for a small vocabulary


def train(root: Path, prefix: str, save: Path, model: str, model_set=(), steps: int = 1, **kw) -> dict:
    data = DataConfig([prefix], seq_len=32, eval_fraction=0.1, num_workers=0, **kw)
    ds = ds_config_json(root / "ds.json", micro_batch=2)
    cfg = TrainConfig(
        deepspeed_config=ds, model=model, model_set=list(model_set), data=data, save=str(save), train_steps=steps
    )
    return main(cfg)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A WordPiece dataset (ids pad 0, unk 1, cls 2, sep 3, mask 4), one trained ModernBERT checkpoint, and a
    second dataset of the same text built by `bert-prep build` with another (smaller) vocabulary."""
    root = tmp_path_factory.mktemp("identity")
    prefix = make_dataset(root / "data")
    texts = [s for d in _documents(60, 0) for s in d]
    other_tok = build_tokenizer(root / "other_tok", texts, vocab_size=150)
    (root / "text.txt").write_text("".join("\n".join(d) + "\n\n" for d in _documents(60, 0)))
    other = str(root / "other" / "corpus")
    assert prep_cli("build", "--input", root / "text.txt", "--tokenizer", other_tok, "--output", other) == 0
    save = root / "run"
    train(root, prefix, save, "modernbert-tiny", MODERN, packing=True, pair_task="none")
    return {"root": root, "prefix": prefix, "other": other, "other_tok": str(other_tok), "save": save}


def test_a_modernbert_preset_exports_the_datas_cls_and_sep_ids(corpus, tmp_path, caplog):
    """Silent case 1: `--model modernbert-tiny --model-set vocab_size=... pad_token_id=...` exported ModernBERT's
    50281/50282 as cls/sep/bos/eos, outside the vocabulary; now the manifest's ids (and transformers loads it)."""
    export(corpus["save"], tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    manifest = json.loads(Path(corpus["prefix"] + ".json").read_text())["tokenizer"]["special_tokens"]
    want = {"pad_token_id": 0, "cls_token_id": 2, "sep_token_id": 3, "bos_token_id": 2, "eos_token_id": 3}
    assert {k: config[k] for k in want} == want
    assert want["cls_token_id"] == manifest["cls"] and want["sep_token_id"] == manifest["sep"]
    assert_loads_without_warnings(tmp_path / "hf", caplog)


def assert_loads_without_warnings(path: Path, caplog) -> None:
    """transformers loads the directory with no warning (it warns about token ids outside the vocabulary)."""
    import logging

    import transformers

    transformers.logging.enable_propagation()
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            transformers.AutoModelForMaskedLM.from_pretrained(str(path))
            transformers.AutoTokenizer.from_pretrained(str(path))
    finally:
        transformers.logging.disable_propagation()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] + [str(w.message) for w in caught]
    assert not said, said


def test_model_set_cannot_contradict_the_datas_ids(corpus):
    tok = json.loads(Path(corpus["prefix"] + ".json").read_text())["tokenizer"]
    with pytest.raises(UserError, match=r"--model-set cls_token_id=50281 contradicts the data's id 2") as e:
        identity.model_config("modernbert-tiny", [*MODERN, "cls_token_id=50281"], tok, "corpus.json")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="--model-set pad_token_id=5 contradicts the data's id 0"):
        identity.model_config("tiny", ["pad_token_id=5"], tok, "corpus.json")


def test_a_model_json_that_contradicts_the_data_is_refused(corpus, tmp_path):
    tok = json.loads(Path(corpus["prefix"] + ".json").read_text())["tokenizer"]
    model = tiny_model_json(tmp_path / "m.json", vocab_size=200, pad_token_id=7)
    with pytest.raises(UserError, match=r"m.json sets pad_token_id 7 but the data's id is 0"):
        identity.model_config(model, [], tok, "corpus.json")


def test_export_with_another_tokenizer_is_refused_naming_both(corpus, tmp_path):
    """Silent case 3: `bert-export --tokenizer OTHER` printed "verified" with a smaller tokenizer."""
    with pytest.raises(
        UserError, match=r"trained with tokenizer [0-9a-f]{12} .* but --tokenizer .*other_tok is tokenizer"
    ):
        export(corpus["save"], tmp_path / "hf", tokenizer=corpus["other_tok"])
    assert not (tmp_path / "hf").exists()
    with pytest.warns(UserWarning, match="--allow-tokenizer-change"):
        export(corpus["save"], tmp_path / "hf", tokenizer=corpus["other_tok"], allow_tokenizer_change=True)


def test_resuming_on_data_of_another_tokenizer_is_refused(corpus, tmp_path):
    """Silent case 3: a resume on data built with another tokenizer went on (the loss jumped, no message)."""
    root = corpus["root"]
    with pytest.raises(UserError, match=r"run/step_00000001 was trained with tokenizer .* but --data .*other/corpus"):
        train(root, corpus["other"], corpus["save"], "modernbert-tiny", MODERN, steps=2, packing=True, pair_task="none")


def test_init_from_with_another_tokenizer_is_refused(corpus, tmp_path):
    from finetune.config import FinetuneConfig
    from finetune.run import load_pretrained

    base = dict(task="classify", init_from=str(corpus["save"]), output=str(tmp_path / "ft"))
    with pytest.raises(UserError, match=r"--init-from .*run was trained with tokenizer .* but --tokenizer"):
        load_pretrained(FinetuneConfig(**base, tokenizer=corpus["other_tok"]))
    with pytest.raises(UserError, match=r"--init-from .*run was trained with tokenizer .* but --data"):
        data = DataConfig([corpus["other"]], seq_len=32, eval_fraction=0.1, num_workers=0, pair_task="none")
        cfg = TrainConfig(
            deepspeed_config=ds_config_json(tmp_path / "ds.json", micro_batch=2),
            model="modernbert-tiny",
            model_set=["vocab_size=256", "pad_token_id=0"],
            data=data,
            save=str(tmp_path / "phase2"),
            train_steps=1,
            init_from=str(corpus["save"]),
        )
        main(cfg)


def test_a_checkpoint_without_a_fingerprint_is_accepted_with_one_warning(corpus, tmp_path):
    import shutil

    from pretrain.runtime import checkpoint

    old = tmp_path / "old"
    shutil.copytree(corpus["save"], old)
    state_file = old / checkpoint.tag_name(1) / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text())
    del state["config"]["tokenizer"]
    state_file.write_text(json.dumps(state))
    for f in (old / checkpoint.tag_name(1)).glob("checksums_rank*.json"):
        f.unlink()  # a checkpoint written before fingerprints existed predates checksums too
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(old, tmp_path / "hf")
    ours = [w for w in caught if "records no tokenizer fingerprint" in str(w.message)]
    assert len(ours) == 1
