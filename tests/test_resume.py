"""Exact resume after SIGTERM (1 and 2 processes) and resume on another process count (universal checkpoint).

Each run is a real `python -m pretrain.train` / `deepspeed --module pretrain.train` launch. A run interrupted
by SIGTERM at whatever step it has reached and then relaunched must log the same per-step losses as a run
that was never interrupted: bitwise in fp32 on CPU with the same process count (dropout on, so the saved RNG
states matter), and within float32 rounding after a universal conversion from 2 processes to 1.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_train import ROOT, finish, free_port, interrupt_when, losses, make_setup, run_env, train_args

from pretrain import checkpoint

STEPS = 60


def launch(setup: dict, save: Path, world: int, steps: int = STEPS, stage_cmd=None) -> subprocess.Popen:
    args = train_args(setup, save, steps)
    if world == 1:
        cmd = [sys.executable, "-m", "pretrain.train", *args]
    else:
        port = str(free_port())
        cmd = ["deepspeed", "--num_gpus", str(world), "--master_port", port, "--module", "pretrain.train", *args]
    log = open(save.parent / f"{save.name}.log", "a")
    return subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def check_stopped_early(save: Path) -> int:
    tag, state = checkpoint.newest(save)
    assert 0 < state.step < STEPS, f"the signal did not stop the run early ({tag})"
    return state.step


def test_exact_resume_after_sigterm_one_process(tmp_path):
    setup = make_setup(tmp_path, stage=0, dropout=0.1)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    finish(launch(setup, straight, 1), straight)
    proc = launch(setup, interrupted, 1)
    interrupt_when(proc, interrupted, 5)
    assert proc.returncode == 0, "a SIGTERM'd run must save and exit 0"
    assert "stopping at step" in (tmp_path / "interrupted.log").read_text()
    stopped = check_stopped_early(interrupted)
    finish(launch(setup, interrupted, 1), interrupted)
    want, got = losses(straight), losses(interrupted)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want, f"resumed at step {stopped}: losses differ"
    assert want[STEPS] < want[1]


@pytest.mark.slow
def test_exact_resume_two_processes_and_universal_to_one(tmp_path):
    """ZeRO-2, dropout off (a different process count draws different dropout masks)."""
    setup = make_setup(tmp_path, stage=2, dropout=0.0, world=2)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    finish(launch(setup, straight, 2), straight)
    proc = launch(setup, interrupted, 2)
    interrupt_when(proc, interrupted, 5)
    stopped = check_stopped_early(interrupted)
    universal = tmp_path / "universal"
    shutil.copytree(interrupted, universal)

    finish(launch(setup, interrupted, 2), interrupted)
    want = losses(straight)
    assert losses(interrupted) == want, f"2-process resume at step {stopped}: losses differ"

    checkpoint.to_universal(universal)
    # load_weights reads both formats (zero_to_fp32 for the ZeRO-2 tag, per-parameter files for the universal one)
    _, from_zero = checkpoint.load_weights(universal / checkpoint.tag_name(stopped))
    _, from_universal = checkpoint.load_weights(universal / f"{checkpoint.tag_name(stopped)}_universal")
    assert from_zero.keys() == from_universal.keys()
    assert all(torch.equal(from_zero[k], from_universal[k]) for k in from_zero)
    finish(launch(setup, universal, 1), universal)
    got = losses(universal)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[stopped + 1] == pytest.approx(want[stopped + 1], rel=1e-5)
    assert [got[s] for s in range(stopped + 1, STEPS + 1)] == pytest.approx(
        [want[s] for s in range(stopped + 1, STEPS + 1)], rel=1e-3
    )
