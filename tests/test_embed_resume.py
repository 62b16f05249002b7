"""Exact resume of `bert-embed train` on pretraining's checkpoints: a run stopped by SIGTERM (a real signal to a
real `python -m embed.cli train`) saves at a step boundary, and the same command relaunched ends with the same
per-step losses and the same weights as a run never interrupted (dropout on, so the saved RNG states matter);
a finished run continued with more --epochs equals one run of them all (its --dev history too); checkpoints are
verified as pretraining's (a damaged newest one is passed over); a relaunch with other settings or another
tokenizer refuses in one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures_embed import ds_config, pairs, write_beir, write_pairs
from fixtures_finetune import build_tokenizer, tiny_checkpoint
from fixtures_train import run_env
from safetensors.torch import load_file

from common.errors import UserError
from embed import checkpoints
from embed.train import EmbedTrainConfig, main
from pretrain.runtime import checkpoint

ROOT = Path(__file__).resolve().parent.parent
STEPS = 30  # 3 epochs of 80 pairs in batches of 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_resume")
    tok = build_tokenizer(root / "tok")
    return {
        "root": root,
        "tok": tok,
        "bert": tiny_checkpoint(root / "bert", tok),  # dropout 0.1
        "pairs": write_pairs(root / "pairs.jsonl", pairs(80, seed=1, negatives=1)),
        "dev": write_beir(root / "dev", pairs(20, seed=9), split="dev"),
        "ds": ds_config(root / "ds.json", micro=8),  # constant learning rate: a longer run continues a shorter one
    }


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "split" not in r}


def weights_equal(a: Path, b: Path) -> None:
    want, got = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def launch(setup: dict, out: Path) -> subprocess.Popen:
    """`bert-embed train` in its own process group, on the default DeepSpeed JSON (warmup and linear decay)."""
    args = ["--init-from", str(setup["bert"]), "--train", str(setup["pairs"]), "--output", str(out), "--batch", "8",
            "--lr", "1e-3", "--epochs", "3", "--passage-len", "48", "--log-every", "1"]  # fmt: skip
    log = open(f"{out}.log", "a")
    cmd = [sys.executable, "-m", "embed.cli", "train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, out: Path) -> None:
    assert proc.wait(timeout=900) == 0, Path(f"{out}.log").read_text()[-4000:]


@pytest.mark.slow
def test_sigterm_saves_and_the_relaunch_ends_as_an_uninterrupted_run(setup):
    straight, stopped = setup["root"] / "straight", setup["root"] / "stopped"
    reference = launch(setup, straight)
    proc = launch(setup, stopped)
    deadline = time.monotonic() + 600  # a loaded machine starts slowly
    while proc.poll() is None and time.monotonic() < deadline:
        if (stopped / "metrics.jsonl").is_file() and len(losses(stopped)) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal; raise STEPS"
    os.killpg(proc.pid, signal.SIGTERM)
    finish(proc, stopped)
    tag, state = checkpoint.newest(checkpoints.directory(str(stopped)))
    assert 3 <= state.step < STEPS and checkpoint.problem(checkpoints.directory(str(stopped)) / tag) is None
    assert "relaunch the same command to resume" in Path(f"{stopped}.log").read_text()
    assert not (stopped / "model.safetensors").exists()  # the model is written when the run ends
    finish(launch(setup, stopped), stopped)
    finish(reference, straight)
    want, got = losses(straight), losses(stopped)
    assert sorted(got) == list(range(1, STEPS + 1)) and got == want, f"resumed at step {state.step}"
    weights_equal(straight, stopped)
    assert f"resumed from {checkpoints.directory(str(stopped))}" in Path(f"{stopped}.log").read_text()


def run(setup: dict, out: Path, epochs: int, **flags) -> dict:
    paths = {"init_from": setup["bert"], "train": setup["pairs"], "output": out, "deepspeed_config": setup["ds"]}
    return main(EmbedTrainConfig(**{k: str(v) for k, v in paths.items()}, epochs=epochs, passage_len=48,
                                 dev=str(setup["dev"]), **flags))  # fmt: skip


def test_more_epochs_continue_a_finished_run_as_one_run_of_them_all(setup):
    whole, grown = setup["root"] / "whole", setup["root"] / "grown"
    want = run(setup, whole, epochs=2)
    first = run(setup, grown, epochs=1)
    assert first["steps"] == 10 and [d["step"] for d in first["dev"]] == [10]
    again = run(setup, grown, epochs=1)  # the same command: nothing left to do
    assert again["steps"] == 10 and losses(grown) == {k: v for k, v in losses(whole).items() if k <= 10}
    got = run(setup, grown, epochs=2)
    assert losses(grown) == losses(whole) and got["dev"] == want["dev"]
    evals = [json.loads(line) for line in (grown / "metrics.jsonl").read_text().splitlines() if "split" in line]
    assert [e["step"] for e in evals] == [10, 20]
    weights_equal(whole, grown)
    assert got["config"]["tokenizer"]["sha256"] and got["config"]["provenance"]["torch"] == torch.__version__


def test_a_damaged_newest_checkpoint_is_passed_over(setup):
    out = setup["root"] / "damaged"
    run(setup, out, epochs=1, save_every=5, keep_last=0)
    save = checkpoints.directory(str(out))
    assert checkpoint.tags(save) == ["step_00000010", "step_00000005"]
    model_file = save / "step_00000010" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:-100])  # a cut file: its checksum no longer matches
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000010"):
        report = run(setup, out, epochs=1, save_every=5, keep_last=0)
    assert report["steps"] == 10 and sorted(losses(out)) == list(range(1, 11))


def test_a_relaunch_with_other_settings_or_tokenizer_refuses_in_one_line(setup):
    out = setup["root"] / "refuse"
    run(setup, out, epochs=1, max_steps=2)
    with pytest.raises(UserError, match=r"--temperature 0.05 -> 0.1.*new --output"):
        run(setup, out, epochs=1, temperature=0.1)
    other = build_tokenizer(setup["root"] / "tok_small", vocab_size=150)
    with pytest.raises(UserError, match="trained with tokenizer .* but this launch's tokenizer is"):
        run(setup, out, epochs=1, tokenizer=str(other))
