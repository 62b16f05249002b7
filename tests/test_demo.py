"""scripts/demo.sh end to end, shortened: every step runs for real, with the launcher, the interruption and
the resume, and leaves everything under its output directory."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from fixtures_train import free_port

from pretrain.export import build_model
from pretrain.runtime.weights import load_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(
        os.environ,
        DEMO_STEPS="12",
        DEMO_SAVE_EVERY="3",
        DEMO_EVAL_EVERY="4",
        DEMO_CORPUS_MB="0.3",
        DEMO_VOCAB="2000",
        DEMO_MASTER_PORT=str(free_port()),
        DEMO_FT_SEEDS="1 2",
        DEMO_FT_EVAL="40",
    )
    env.pop("RANK", None)
    proc = subprocess.run(
        ["bash", "scripts/demo.sh", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    # 2-3: corpus, tokenizer and dataset
    corpus = (out / "corpus.txt").read_text()
    assert 300_000 <= len(corpus.encode()) < 400_000 and ">>>" not in corpus
    assert "corpus: " in log and " MB -> " in log
    assert sum(1 for _ in open(out / "tokenizer" / "vocab.txt")) == 2000
    manifest = json.loads((out / "data" / "corpus.json").read_text())
    assert manifest["tokenizer"]["path"] == str(out / "tokenizer")

    # 4: the first launch was stopped by SIGTERM after a checkpoint and the relaunch resumed from its stop
    stopped = [line for line in log.splitlines() if line.startswith("stopping at step") and "(signal)" in line]
    assert len(stopped) == 1
    step = int(stopped[0].split()[3])
    assert 3 <= step < 12
    assert f"resumed from {out / 'run'} at step {step}" in log
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "split" not in r] == list(range(1, 13))  # each step once, in order
    assert (out / "run" / "latest").read_text() == "step_00000012"
    state = json.loads((out / "run" / "step_00000012" / "train_state.json").read_text())
    assert state["world_size"] == 2

    # 5: held-out accuracy, trained vs untrained, as printed
    evals = [r for r in records if r.get("split") == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 12
    assert evals[0]["nsp_acc"] is None  # the BERT demo's recipe: MLM only
    assert f"untrained (step 0) {evals[0]['mlm_acc']:>13.4f} {'- (no NSP)':>13}" in log
    assert f"trained (step 12) {evals[-1]['mlm_acc']:>13.4f} {'- (no NSP)':>13}" in log

    # 6: the export holds the final weights and fill-mask ran on it
    hf = out / "hf"
    _, weights = load_weights(str(out / "run"))
    ours = build_model(*load_weights(str(hf)))
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, weights[name], atol=0, rtol=0)
    assert "Return the [MASK] of the list." in log and "verified" in log

    # 7: curves, and the closing summary points at everything, all under the output directory
    assert (out / "run" / "curves.png").stat().st_size > 10_000
    assert f"everything is under {out}" in log
    for path in ("corpus.txt", "tokenizer", "data/corpus.{bin,idx,json}", "run", "hf", "run/curves.png"):
        assert str(out / path) in log

    # 8: per task and seed, fine-tuning from the export and from random weights, each at its learning rate; the
    # comparison's lines (finetune.compare) are printed and kept
    from finetune.compare import judge, read_reports, table

    rates = {"word-order": {"pretrained": 3e-4, "random": 1e-3}, "packages": {"pretrained": 1e-3, "random": 1e-3}}
    verdicts = {}
    for task, name in (("word-order", "word order, held-out documents"), ("packages", "documentation packages")):
        reports = read_reports(out / "finetune" / task, ["1", "2"])
        assert table(name, ["1", "2"], reports) in log
        for init, lr in rates[task].items():  # each initialization and task at its own rate (the sweeps' choice)
            assert [r["lr"] for r in reports[init]] == [lr, lr]
        acc = [[r["report"]["accuracy"] for r in reports[init]] for init in ("pretrained", "random")]
        assert f"verdict ({name}): " in (out / "finetune" / "comparison.txt").read_text()
        verdicts[task] = judge(*acc)
        assert verdicts[task].gains == [100 * (p - r) for p, r in zip(*acc)]
    assert f"{out}/finetune/comparison.txt" in log
    # the packages task explained where pretraining did not help it (a bag-of-words classifier does as well)
    assert ("packages is a task of words" in log) == (verdicts["packages"].outcome != "helped")


def demo_script(marker: str) -> str:
    """The Python heredoc of scripts/demo.sh whose `python - ARGS <<'EOF'` line contains `marker`."""
    text = open(os.path.join(ROOT, "scripts", "demo.sh")).read()
    return re.search(rf"python - [^\n]*{re.escape(marker)}[^\n]*<<'EOF'\n(.*?)\nEOF\n", text, flags=re.S).group(1)


def run_piece(marker: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", demo_script(marker), *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# DEMO_MODEL=modernbert-mini runs the whole demo (but fine-tuning) in about the time of the BERT one, too long to
# repeat here; these tests run its pieces that differ from BERT's: the model config, the recipe, the accuracy table.
SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
MODERNBERT_IDS = ["cls_token_id=2", "sep_token_id=3", "bos_token_id=2", "eos_token_id=3"]
TOKEN_IDS = {
    "tiny": ["hidden_dropout=0", "attention_dropout=0"],  # the demo's BERT recipe: no dropout
    "modernbert-mini": MODERNBERT_IDS,
    "modernbert-tiny": MODERNBERT_IDS,
}


@pytest.mark.parametrize("preset", TOKEN_IDS)
def test_demo_model_is_the_preset_with_the_datas_vocabulary_and_special_ids(tmp_path, preset):
    from pretrain.models import load_config

    (tmp_path / "corpus.json").write_text(json.dumps({"tokenizer": {"vocab_size": 2000, "special_tokens": SPECIALS}}))
    run_piece('"$out/model.json"', preset, str(tmp_path / "corpus.json"), str(tmp_path / "model.json"))
    want = load_config(preset, ["vocab_size=2000", "pad_token_id=0", *TOKEN_IDS[preset]])
    assert load_config(str(tmp_path / "model.json")) == want


def test_demo_modernbert_recipe_is_packed_mlm_at_30_percent_with_stable_adamw(tmp_path):
    from pretrain.models import build_pretraining_model, load_config
    from pretrain.runtime.ds_config import load_ds_config
    from pretrain.runtime.engine import build_optimizer
    from pretrain.runtime.optim import StableAdamW
    from pretrain.runtime.schedules import SCHEDULES
    from pretrain.train_config import TrainConfig

    text = open(os.path.join(ROOT, "scripts", "demo.sh")).read()
    recipe = shlex.split(re.search(r"recipe=\((--deepspeed_config ds_configs/modernbert_[^)]*)\)", text).group(1))
    cfg = TrainConfig.from_args([*recipe, "--model", "modernbert-mini", "--data", "d", "--save", "s"])
    assert (cfg.data.pair_task, cfg.data.packing, cfg.data.mask_prob) == ("none", True, 0.3)
    ds = load_ds_config(os.path.join(ROOT, cfg.deepspeed_config))
    model = build_pretraining_model(load_config("modernbert-tiny", ["vocab_size=64", "pad_token_id=0"]))
    opt, _ = build_optimizer(model, ds)
    assert type(opt) is StableAdamW and opt.update_clipping and ds["scheduler"]["type"] in SCHEDULES


def test_demo_bert_recipe_is_packed_mlm_at_30_percent():
    from pretrain.runtime.ds_config import load_ds_config
    from pretrain.train_config import TrainConfig

    text = open(os.path.join(ROOT, "scripts", "demo.sh")).read()
    recipe = shlex.split(re.search(r"recipe=\((--deepspeed_config ds_configs/demo.json[^)]*)\)", text).group(1))
    cfg = TrainConfig.from_args([*recipe, "--model", "tiny", "--data", "d", "--save", "s"])
    data = cfg.data
    assert (data.pair_task, data.packing, data.mask_prob, data.eval_mask_prob) == ("none", True, 0.3, 0.15)
    ds = load_ds_config(os.path.join(ROOT, cfg.deepspeed_config))
    assert (ds["train_micro_batch_size_per_gpu"], ds["optimizer"]["params"]["lr"]) == (16, 2e-3)


def test_demo_prints_held_out_accuracy_without_nsp(tmp_path):
    """A ModernBERT run has no NSP: the demo's accuracy table says so instead of failing on the missing number."""
    lines = [{"step": 0, "split": "eval", "mlm_acc": 0.0, "nsp_acc": None}, {"step": 1, "loss": 6.0},
             {"step": 12, "split": "eval", "mlm_acc": 0.0531, "nsp_acc": None}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = run_piece('"$out/run/metrics.jsonl"', str(tmp_path / "metrics.jsonl"))
    assert f"trained (step 12) {0.0531:>13.4f} {'- (no NSP)':>13}" in out


def run_demo_until_corpus_check(tmp_path, corpus: str) -> subprocess.CompletedProcess:
    """scripts/demo.sh with DEMO_CORPUS: setup (the running venv) and step 2, which must stop a bad corpus."""
    env = dict(os.environ, DEMO_CORPUS=corpus, VENV=sys.prefix)
    env.pop("RANK", None)
    return subprocess.run(
        ["bash", "scripts/demo.sh", str(tmp_path / "demo")], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["glob", "missing"])
def test_demo_corpus_too_small_or_missing_is_one_line_before_any_training(tmp_path, kind):
    text = "".join(f"Sentence {i} of a small corpus, far from a megabyte.\n\n" for i in range(2000))  # ~0.1 MB
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(text)
    (tmp_path / "texts" / "b.txt").write_text(text)
    corpus = {"glob": "texts/*.txt", "missing": "nothing/here.txt"}[kind]
    proc = run_demo_until_corpus_check(tmp_path, str(tmp_path / corpus))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if kind == "missing":
        assert "does not exist" in errors[0]
    else:
        size = 2 * (len(text.encode()) - text.count("\n"))  # the paragraphs of both files, without newlines
        assert f"holds {size / 1e6:.2f} MB of text in 2 file(s), less than the 1 MB" in errors[0]
    assert f"your corpus: {tmp_path / corpus}" in proc.stdout
    assert not (tmp_path / "demo" / "tokenizer").exists() and not (tmp_path / "demo" / "run").exists()


def test_corpus_size_accepts_enough_text_read_as_bert_prep_reads_it(tmp_path):
    import gzip

    from data_prep.corpus_size import main

    with gzip.open(tmp_path / "big.txt.gz", "wt") as f:  # 1.2 MB of text in a much smaller file
        f.write("".join(f"Line {i:07d} of text that repeats itself over and over again.\n" for i in range(20_000)))
    assert main([str(tmp_path / "big.txt.gz"), "--min-mb", "1"]) == 0
    assert (tmp_path / "big.txt.gz").stat().st_size < 1e6
