"""`bert-report`: the PNG shows exactly the records of metrics.jsonl (last record per step wins)."""

import json
import math

import matplotlib.image
import pytest

from common.errors import run_cli
from pretrain import report


def write_run(run_dir):
    """A metrics.jsonl shaped like training writes it: an untrained eval at step 0, steps, periodic evals."""
    recs = [
        {"split": "eval", "step": 0, "loss": 11.0, "mlm_loss": 10.3, "nsp_loss": 0.7, "mlm_acc": 0.0, "nsp_acc": 0.5}
    ]
    for step in range(1, 41):
        mlm = 10.0 * math.exp(-step / 20)
        recs.append({"step": step, "loss": mlm + 0.69, "mlm_loss": mlm, "nsp_loss": 0.69, "lr": 1e-3 * step / 40})
        recs[-1]["data_wait_frac"] = 0.01 * (step % 3)
        if step % 10 == 0:  # pretrain/timing.py logs the skew once per window of steps
            recs[-1].update(step_skew=0.02 * step / 10, slowest_rank=1)
        if step % 20 == 0:
            recs.append({"split": "eval", "step": step, "mlm_acc": 0.1 * step / 20, "nsp_acc": 0.5 + step / 400})
    run_dir.mkdir(exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
        f.write("\n")  # a trailing blank line, as after an interrupted write


def test_curves_show_the_records(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    assert report.main([str(run)]) == 0
    out = capsys.readouterr().out
    png = run / "curves.png"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 1000 and image.std() > 0.01  # a drawn figure, not blank
    assert "train: 40 logged steps up to step 40" in out
    assert "first eval (step 0): mlm_acc 0.0000, nsp_acc 0.5000" in out
    assert "last eval (step 40): mlm_acc 0.2000, nsp_acc 0.6000" in out
    tail = [10.0 * math.exp(-s / 20) for s in range(37, 41)]  # the last 10% of 40 steps
    assert f"mlm_loss {sum(tail) / 4:.3f}" in out
    waits = [0.01 * (s % 3) for s in range(1, 41)]
    assert f"time: data wait {100 * sum(waits) / 40:.1f}% of the step time (mean), step skew 5.0% (mean)" in out

    train, evals = report.read_metrics(run / "metrics.jsonl")
    drawn = report.plot(train, evals, tmp_path / "again.png")
    steps, values = drawn["loss/mlm_loss"]
    assert steps == list(range(1, 41))
    assert values == pytest.approx([10.0 * math.exp(-s / 20) for s in steps])
    assert drawn["learning rate/lr"][1] == pytest.approx([1e-3 * s / 40 for s in steps])
    assert drawn["held-out accuracy/held-out mlm_acc"] == ([0, 20, 40], pytest.approx([0.0, 0.1, 0.2]))
    assert drawn["loss/eval mlm_loss"] == ([0], [10.3])
    assert drawn["where the time goes/data_wait_frac"][1] == pytest.approx([0.01 * (s % 3) for s in steps])
    assert drawn["where the time goes/step_skew"] == ([10, 20, 30, 40], pytest.approx([0.02, 0.04, 0.06, 0.08]))


def test_resumed_run_keeps_the_last_record_per_step(tmp_path):
    # The first attempt checkpointed at step 20 and was killed at step 29; the relaunch redid steps 21-40.
    first = [{"step": s, "loss": 100.0 + s, "lr": 1.0} for s in range(1, 30)]
    first.append({"split": "eval", "step": 20, "mlm_acc": 0.3, "nsp_acc": 0.6})
    second = [{"step": s, "loss": 200.0 + s, "lr": 2.0} for s in range(21, 41)]
    second.append({"split": "eval", "step": 40, "mlm_acc": 0.4, "nsp_acc": 0.7})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first + second))
    out_png = tmp_path / "custom.png"
    assert report.main([str(tmp_path / "metrics.jsonl"), "--output", str(out_png)]) == 0
    assert out_png.stat().st_size > 10_000
    train, evals = report.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["loss"] for r in train] == [100.0 + s for s in range(1, 21)] + [200.0 + s for s in range(21, 41)]
    assert [(r["step"], r["mlm_acc"]) for r in evals] == [(20, 0.3), (40, 0.4)]


def test_user_errors(tmp_path, capsys):
    assert run_cli(report.main, [str(tmp_path)]) == 2
    assert f"no metrics file at {tmp_path / 'metrics.jsonl'}" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    assert run_cli(report.main, [str(tmp_path)]) == 2
    assert "line 2 is not JSON" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("\n")
    assert run_cli(report.main, [str(tmp_path)]) == 2
    assert "has no step records" in capsys.readouterr().err
