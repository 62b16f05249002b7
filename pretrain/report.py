"""`bert-report RUN_DIR`: loss, learning-rate and accuracy curves from a run's `metrics.jsonl`.

Reads any run directory (or the metrics file itself), writes one PNG with matplotlib's Agg backend (no
display needed) and prints a short summary: steps, final training losses, and held-out accuracy at the
first and last evaluation (the first is the untrained baseline when training evaluates at step 0).

A resumed run appends the steps it repeats after the checkpoint, so records are keyed by step and the
last record for a step wins: the curve shows what the finished run actually did.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from common.errors import UserError, run_cli
from common.files import json_lines
from common.log import get_logger

log = get_logger(__name__)

TRAIN_KEYS = ("loss", "mlm_loss", "nsp_loss")
EVAL_KEYS = ("mlm_acc", "nsp_acc")
TIME_KEYS = ("data_wait_frac", "step_skew")  # shares of the step time: pretrain/timing.py


def metrics_path(run: str | Path) -> Path:
    """`RUN_DIR/metrics.jsonl`, or the file itself when given one."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics file at {path}; pass a training --save directory or a metrics.jsonl file")
    return path


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records), each sorted by step with the last record per step kept."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for _, rec in json_lines(path, "is this a metrics.jsonl file?"):
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        target = evals if rec.get("split") == "eval" else train if rec.get("split", "train") == "train" else None
        if target is not None:
            target[int(rec["step"])] = rec
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), int | float)]
    pts = [(s, v) for s, v in pts if math.isfinite(v)]
    return [s for s, _ in pts], [v for _, v in pts]


def plot(train: list[dict], evals: list[dict], output: str | Path, title: str = "") -> dict[str, tuple[list, list]]:
    """Four panels: training losses, learning rate, held-out accuracies, where the time goes (data wait and the
    slowest rank's skew, as shares); each against the step.

    Returns what was drawn, read back from the figure: {"panel/label": (steps, values)}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr, ax_acc, ax_time) = plt.subplots(1, 4, figsize=(20, 4.2))
    for key in TRAIN_KEYS:
        steps, values = _series(train, key)
        if steps:
            ax_loss.plot(steps, values, label=key, linewidth=1)
    for key in ("loss", "mlm_loss", "nsp_loss"):
        steps, values = _series(evals, key)
        if steps:
            ax_loss.plot(steps, values, "o--", label=f"eval {key}", markersize=3, linewidth=1)
    ax_loss.set(title="loss", xlabel="step")
    steps, values = _series(train, "lr")
    ax_lr.plot(steps, values, color="tab:purple", linewidth=1, label="lr")
    ax_lr.set(title="learning rate", xlabel="step")
    for key in EVAL_KEYS:
        steps, values = _series(evals, key)
        if steps:
            ax_acc.plot(steps, values, "o-", label=f"held-out {key}", markersize=4)
    ax_acc.set(title="held-out accuracy", xlabel="step", ylim=(0, 1))
    for key in TIME_KEYS:
        steps, values = _series(train, key)
        if steps:
            ax_time.plot(steps, values, label=key, linewidth=1)
    ax_time.set(title="where the time goes", xlabel="step")
    for ax in (ax_loss, ax_acc, ax_time):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in (ax_loss, ax_lr, ax_acc, ax_time):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    drawn = {
        f"{ax.get_title()}/{line.get_label()}": (list(line.get_xdata()), list(line.get_ydata()))
        for ax in (ax_loss, ax_lr, ax_acc, ax_time)
        for line in ax.get_lines()
    }
    plt.close(fig)
    return drawn


def summary(train: list[dict], evals: list[dict]) -> str:
    """A few lines a person reads after a run: how far it got and what the held-out numbers say."""
    lines = []
    if train:
        last = train[-1]
        tail = train[-max(1, len(train) // 10) :]  # mean of the last 10% of logged steps: less noisy
        losses = ", ".join(
            f"{k} {sum(r[k] for r in tail) / len(tail):.3f}" for k in TRAIN_KEYS if all(k in r for r in tail)
        )
        lines.append(f"train: {len(train)} logged steps up to step {last['step']}; final {losses}")
    waits, skews = _series(train, "data_wait_frac")[1], _series(train, "step_skew")[1]
    if waits:
        skew = f", step skew {100 * sum(skews) / len(skews):.1f}% (mean)" if skews else ""
        lines.append(f"time: data wait {100 * sum(waits) / len(waits):.1f}% of the step time (mean){skew}")
    for label, rec in (("first eval", evals[0] if evals else None), ("last eval", evals[-1] if evals else None)):
        if rec is None or (label == "last eval" and len(evals) < 2):
            continue
        accs = ", ".join(f"{k} {rec[k]:.4f}" for k in EVAL_KEYS if rec.get(k) is not None)  # None: no NSP
        lines.append(f"{label} (step {rec['step']}): {accs}")
    if not lines:
        lines.append("no step records yet")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bert-report",
        description="Plot training loss/MLM/NSP loss and learning rate, and held-out MLM/NSP accuracy, against "
        "the step from a run's metrics.jsonl, and print a short summary.",
    )
    parser.add_argument("run", metavar="RUN_DIR", help="a training --save directory, or a metrics.jsonl file")
    parser.add_argument("--output", default=None, metavar="FILE", help="PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    path = metrics_path(args.run)
    output = Path(args.output) if args.output else path.parent / "curves.png"
    if not output.parent.is_dir():
        raise UserError(f"directory {output.parent} does not exist; create it or change --output")
    train, evals = read_metrics(path)
    if not train and not evals:
        raise UserError(f"{path} has no step records; run training for at least one logged step first")
    plot(train, evals, output, title=str(path.parent.name))
    log.info(summary(train, evals))
    log.info(f"curves: {output}")
    return 0


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
