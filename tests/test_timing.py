"""Where the time goes: data wait, per-rank skew and the end-of-run line (pretrain/timing.py, pretrain.train)."""

import json
import statistics
import subprocess
import time

import pytest
from fixtures_train import ROOT, free_port, make_setup, run_env, train_args

from pretrain.timing import StepTiming


def feed(timing: StepTiming, per_rank_local: list[float], data_s: list[float], seconds: float) -> dict:
    """One step as the loop runs it: every rank's values() summed (the all-reduce), then record()."""
    summed = [0.0] * (1 + timing.world)
    for rank, (local, wait) in enumerate(zip(per_rank_local, data_s)):
        other = StepTiming(rank, timing.world)
        other.local_s = local  # what begin() / forward_done() summed on that rank
        mine = other.values(wait)
        summed = [a + b for a, b in zip(summed, mine)]
    return timing.record(summed, seconds, tokens=1000.0, capacity=1250.0, flops=1e9)


def test_skew_and_slowest_rank_over_a_window_against_a_direct_count(capsys):
    timing = StepTiming(0, 4, interval=3)
    steps = [[0.10, 0.30, 0.11, 0.12], [0.10, 0.32, 0.12, 0.11], [0.11, 0.31, 0.10, 0.12]]
    records = [feed(timing, local, [0.01] * 4, seconds=0.5) for local in steps]
    assert "step_skew" not in records[0] and "step_skew" not in records[1]  # only at the window's end
    per_rank = [sum(s[r] for s in steps) for r in range(4)]
    assert records[2]["slowest_rank"] == 1
    assert records[2]["step_skew"] == pytest.approx(max(per_rank) / statistics.median(per_rank) - 1)
    assert all(r["data_wait_frac"] == pytest.approx(0.02) for r in records)
    # rank 1 keeps the others waiting ~0.2 s of every 0.5 s step: over 10%, one warning naming it
    warned = [line for line in capsys.readouterr().out.splitlines() if "is slow" in line]
    assert len(warned) == 1 and "warning: rank 1 is slow: the others wait for it 39% of the step time" in warned[0]
    assert timing.warnings() and "rank 1 is slow" in timing.warnings()[0]
    line = timing.summary()
    assert "2,000 tokens/s" in line and "data wait 2.0%" in line and "padding 20.0%" in line and "MFU" not in line


def test_balanced_ranks_and_fast_data_give_no_warning():
    timing = StepTiming(0, 2, interval=2, peak_tflops=1.0)
    for _ in range(4):
        feed(timing, [0.2, 0.2], [0.001, 0.001], seconds=0.4)
    assert timing.warnings() == []
    assert "step skew 0.0%" in timing.summary() and "MFU 0.1%" in timing.summary()  # 2.5e9 FLOP/s of 2 x 1 TFLOP/s


def test_a_slow_data_loader_is_measured_and_warned_about(tmp_path, capsys, monkeypatch):
    from pretrain.data_config import DataConfig
    from pretrain.loader import Batches
    from pretrain.train import main
    from pretrain.train_config import TrainConfig

    setup = make_setup(tmp_path, stage=0, dropout=0.0)
    real_next = Batches.__next__

    def slow_next(self):
        time.sleep(1.0)  # a loader that cannot keep up (a slow disk, too few workers)
        return real_next(self)

    monkeypatch.setattr(Batches, "__next__", slow_next)
    data = DataConfig([setup["prefix"]], seq_len=48, eval_fraction=0.1, num_workers=0)
    save = tmp_path / "run"
    main(TrainConfig(deepspeed_config=setup["ds"], model=setup["model"], data=data, save=str(save), train_steps=6,
                     log_every=3))  # fmt: skip
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    waited = [r["data_wait_frac"] * 4 / r["seq_per_s"] for r in records]  # seconds: the share of 4-sample steps
    assert all(1.0 <= w < 1.5 for w in waited) and all(r["data_wait_frac"] <= 1.0 for r in records)
    assert records[-1]["step_skew"] == 0.0 and records[-1]["slowest_rank"] == 0  # one rank: no skew
    out = capsys.readouterr().out
    assert "timing: " in out and "tokens/s" in out and "padding" in out
    assert out.count("warning: waiting for data costs") == 2  # once during the run, once in the summary


@pytest.mark.slow
def test_two_ranks_log_data_wait_and_skew(tmp_path):
    setup = make_setup(tmp_path, stage=0, dropout=0.0, world=2)
    save = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pretrain.train"]
    proc = subprocess.run(
        [*cmd, *train_args(setup, save, 20)], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["data_wait_frac"] < 1.0 for r in records)
    windows = [r for r in records if "step_skew" in r]
    assert [r["step"] for r in windows] == list(range(1, 21))  # skew windows are --log-every steps: 1 in train_args
    assert all(r["step_skew"] >= 0.0 and r["slowest_rank"] in (0, 1) for r in windows)
    assert "timing: " in proc.stdout and "(slowest rank " in proc.stdout and " of 2)" in proc.stdout
