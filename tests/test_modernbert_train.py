"""ModernBERT through the training loop as BERT goes (pretrain.train.main in-process, fp32 CPU), on data built by
`bert-prep build` with a byte-level BPE tokenizer: packed MLM-only samples at 30% masking, StableAdamW on a
warmup-stable-decay schedule, exact resume after SIGTERM, the context-extension phase (`--init-from` a 64-token run,
continued at 256 tokens with a larger global RoPE theta) and the export with its tokenizer."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import transformers
from fixtures_prep import BPE_ROLES, documents, prep_tokenizers_fixture, run_cli, txt  # noqa: F401
from tokenizers import Tokenizer

from pretrain import export
from pretrain.data import PretrainingData, eval_batches
from pretrain.data_config import DataConfig
from pretrain.loader import Batches
from pretrain.models import load_config, pretraining_from_state
from pretrain.runtime import checkpoint, weights
from pretrain.train import evaluate, main
from pretrain.train_config import TrainConfig

pytestmark = pytest.mark.slow  # ~20 s together: one dataset build and four short runs

STEPS, SEQ, LONG = 8, 64, 256
STABLE_WSD = {
    "train_batch_size": 4,
    "train_micro_batch_size_per_gpu": 4,
    "optimizer": {"type": "StableAdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.98], "eps": 1e-6,
                                                    "weight_decay": 1e-5, "decouple_lr": True}},
    "scheduler": {"type": "WarmupStableDecay", "params": {"warmup_proportion": 0.25, "decay_proportion": 0.25}},
    "gradient_clipping": 0.0,
    "steps_per_print": 10**9,
}  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory, prep_tokenizers):
    root = tmp_path_factory.mktemp("modernbert_train")
    (root / "a.txt").write_text(txt(documents(80, seed=71)), encoding="utf-8")
    build = ["build", "--input", root / "a.txt", "--tokenizer", prep_tokenizers["bpe_dir"], "--output", root / "data"]
    assert run_cli(*build) == 0
    own = Tokenizer.from_file(str(prep_tokenizers["bpe"]))
    ids = {role: own.token_to_id(token) for role, token in BPE_ROLES.items()}
    model_set = [f"vocab_size={own.get_vocab_size()}", f"pad_token_id={ids['pad']}", "hidden_size=64"]
    model_set += ["num_attention_heads=2", "intermediate_size=96", "num_hidden_layers=3", "local_attention=16"]
    model_set += [f"cls_token_id={ids['cls']}", f"sep_token_id={ids['sep']}", f"bos_token_id={ids['cls']}"]
    model_set += [f"eos_token_id={ids['sep']}", "embedding_dropout=0.1", "mlp_dropout=0.1"]  # dropout: RNG resumes
    model_set += [f"max_position_embeddings={SEQ}", "global_rope_theta=10000"]  # phase 1 as ModernBERT's
    (root / "ds.json").write_text(json.dumps(STABLE_WSD))
    return {"root": root, "data": str(root / "data"), "model_set": model_set, "tokenizer": own, "ids": ids}


def config(setup: dict, save: Path, steps: int = STEPS, seq_len: int = SEQ, model_set=(), **kw) -> TrainConfig:
    data = DataConfig([setup["data"]], seq_len=seq_len, eval_fraction=0.1, num_workers=0, pair_task="none",
                      packing=True, mask_prob=0.3)  # fmt: skip
    return TrainConfig(deepspeed_config=str(setup["root"] / "ds.json"), model="modernbert-tiny",
                       model_set=[*setup["model_set"], *model_set], data=data, save=str(save), train_steps=steps,
                       log_every=0, **kw)  # fmt: skip


def records(save: Path) -> list[dict]:
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def train_losses(save: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(save) if "split" not in r}


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    save = tmp_path_factory.mktemp("straight") / "save"
    main(config(setup, save))
    return save


def test_exact_resume_after_sigterm_with_packing(setup, straight, tmp_path, monkeypatch):
    run, fetched, real_next = tmp_path / "run", {"n": 0}, Batches.__next__

    def next_batch(self):
        fetched["n"] += 1
        if fetched["n"] == 4:  # SIGTERM while step 4 runs: it finishes, saves and stops
            os.kill(os.getpid(), signal.SIGTERM)
        return real_next(self)

    monkeypatch.setattr(Batches, "__next__", next_batch)
    assert main(config(setup, run))["stopped_by"] == "signal"
    monkeypatch.setattr(Batches, "__next__", real_next)
    assert checkpoint.newest(run)[1].step == 4
    assert main(config(setup, run))["step"] == STEPS
    want = train_losses(straight)
    assert train_losses(run) == want and sorted(want) == list(range(1, STEPS + 1))  # bitwise, dropout on
    train = [r for r in records(straight) if "split" not in r]
    assert all(r["fill"] == 1.0 and r["tokens_per_s"] == pytest.approx(r["seq_per_s"] * SEQ) for r in train)
    assert all(r["nsp_loss"] == 0.0 and r["tflops"] > 0 for r in train)
    lrs = [r["lr"] for r in train]  # WSD over 8 steps: warmup 2, stable to step 6, then 1-sqrt decay
    assert lrs[:4] == pytest.approx([0.0, 1e-3, 2e-3, 2e-3]) and lrs[-1] == pytest.approx(2e-3 * (1 - 0.5**0.5))


def test_context_extension_from_a_short_context_run(setup, straight, tmp_path):
    """Phase 2 of ModernBERT's recipe on tiny sizes: the 64-token run's weights and StableAdamW moments, at 256
    tokens with global_rope_theta 160000 (not a weight: only the new config holds it)."""
    longer = ["max_position_embeddings=256", "global_rope_theta=160000"]
    run = tmp_path / "phase2"
    cfg = config(setup, run, steps=2, seq_len=LONG, model_set=longer, init_from=str(straight), init_optimizer=True,
                 eval_every=2, eval_samples=8)  # fmt: skip
    main(cfg)
    state = checkpoint.read_state(run / checkpoint.tag_name(2))
    assert state.config["model"]["global_rope_theta"] == 160000 and state.config["train"]["data"]["seq_len"] == LONG
    train = [r for r in records(run) if "split" not in r]
    assert len(train) == 2 and all(r["tokens_per_s"] == pytest.approx(r["seq_per_s"] * LONG) for r in train)

    step0 = next(r for r in records(run) if r.get("split") == "eval" and r["step"] == 0)
    data = PretrainingData(cfg.data)
    batches = eval_batches(data, 4, 0, 1, 8)
    assert batches[0]["input_ids"].shape == (4, LONG) and len(batches[0]["document_ids"].unique()) > 1
    _, phase1 = weights.load_weights(straight)
    for theta, same in ((160000, True), (10000, False)):  # the same computation: bitwise, or not at all
        model_cfg = load_config("modernbert-tiny", [*setup["model_set"], *longer, f"global_rope_theta={theta}"])
        got = evaluate(pretraining_from_state(model_cfg, phase1), batches)
        assert (got["mlm_loss"] == step0["mlm_loss"]) == same, (theta, got, step0)


def test_export_carries_the_bpe_tokenizer(setup, straight, tmp_path):
    out = tmp_path / "hf"
    export.export(straight, out)  # checks transformers' logits against ours on the saved weights
    model = transformers.AutoModelForMaskedLM.from_pretrained(str(out))
    assert type(model).__name__ == "ModernBertForMaskedLM" and model.config.pad_token_id == setup["ids"]["pad"]
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    sentences = ["The river was known for its music.", "Café 東京 😀 tab\tbed"]
    own = setup["tokenizer"]
    assert [hf(s, add_special_tokens=False)["input_ids"] for s in sentences] == [
        own.encode(s, add_special_tokens=False).ids for s in sentences
    ]
    assert hf.mask_token == BPE_ROLES["mask"] and hf.cls_token_id == setup["ids"]["cls"]
    fill = transformers.pipeline("fill-mask", model=str(out), device="cpu")
    assert len(fill(f"The river {hf.mask_token} known for its music.", top_k=3)) == 3
