"""scripts/bench_hf_loop.py (time to equal loss, docs/PERFORMANCE.md): our engine and a plain transformers loop
train the same model on the same batches, so their held-out loss curves start equal and stay together."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fixtures_train import ROOT, make_setup, run_env


@pytest.mark.slow
def test_both_loops_train_the_same_model_on_the_same_data(tmp_path):
    setup = make_setup(tmp_path)
    out = tmp_path / "race.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_hf_loop.py"), "--data", setup["prefix"]]
    cmd += ["--model", setup["model"], "--steps", "6", "--eval-every", "3", "--eval-samples", "32", "--seq-len", "48"]
    cmd += ["--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(out.read_text())
    ours, hf = result["curves"]["ours"], result["curves"]["hf"]
    assert [p["step"] for p in ours] == [p["step"] for p in hf] == [0, 3, 6]
    # the same initial weights (transformers' BertForPreTraining loaded from ours) on the same eval batches
    assert ours[0]["loss"] == pytest.approx(hf[0]["loss"], rel=1e-5)
    # the same objective, optimizer and batches, no dropout: the curves stay together while they fall
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.05
    for a, b in zip(ours[1:], hf[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3), (ours, hf)
    assert result["target"] == pytest.approx(max(ours[-1]["loss"], hf[-1]["loss"]))
    assert all(0 < t < 300 for t in result["times"].values())
    assert "ours" in proc.stdout and "faster" in proc.stdout
