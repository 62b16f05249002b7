"""`python -m finetune.compare ROOT --seeds 1 2 3`: pretrained vs random initialization, per seed, and a verdict.

Reads `ROOT/{pretrained,random}/seedS/eval_report.json` (`bert-finetune --output`), prints accuracy per seed,
mean +- sample std over the seeds for each initialization and for the gain, and one verdict line.

Design choices:
- The gain is paired: seed S of the pretrained run against seed S of the random-init run (the same data order
  and head initialization), so what the seed moves in both cancels out of the gain.
- The verdict compares the mean gain with the seed spread, the sample standard deviation of the per-seed gains:
  "helped" when the mean gain is larger than the spread and positive, "hurt" when it is below minus the spread,
  otherwise "no difference beyond the seed spread". One seed has no spread, so it gives no verdict.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError, run_cli

INITS = ("pretrained", "random")


@dataclass
class Verdict:
    """The paired comparison in accuracy points (100 x accuracy)."""

    gains: list[float]
    """Pretrained minus random init, per seed."""
    mean: float
    spread: float | None
    """Sample standard deviation of the gains; None with one seed."""
    outcome: str
    """helped, hurt, within spread, or one seed."""


def judge(pretrained: Sequence[float], random: Sequence[float]) -> Verdict:
    """The verdict on per-seed accuracies (fractions, seed for seed) of the two initializations."""
    if len(pretrained) != len(random) or not pretrained:
        raise ValueError("need the same number (at least one) of pretrained and random-init results")
    gains = [100 * (p - r) for p, r in zip(pretrained, random)]
    mean = statistics.mean(gains)
    if len(gains) < 2:
        return Verdict(gains, mean, None, "one seed")
    spread = statistics.stdev(gains)
    outcome = "helped" if mean > spread and mean > 0 else "hurt" if mean < -spread else "within spread"
    return Verdict(gains, mean, spread, outcome)


def verdict_line(task: str, v: Verdict) -> str:
    if v.spread is None:
        return f"verdict ({task}): one seed ({v.mean:+.1f} points) has no spread to judge against; run 3 seeds"
    said = {
        "helped": "pretraining helped",
        "hurt": "pretraining hurt",
        "within spread": "no difference beyond the seed spread",
    }[v.outcome]
    return (
        f"verdict ({task}): {said}: {v.mean:+.1f} accuracy points, seed spread {v.spread:.1f} "
        f"(mean of {len(v.gains)} seeds, per seed {', '.join(f'{g:+.1f}' for g in v.gains)})"
    )


def _mean_std(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {std:.4f}"


def read_reports(root: Path, seeds: Sequence[str]) -> dict[str, list[dict]]:
    """{init: [eval_report.json of each seed]}; a missing report is a one-line error."""
    found = {}
    for init in INITS:
        found[init] = []
        for s in seeds:
            path = root / init / f"seed{s}" / "eval_report.json"
            if not path.is_file():
                raise UserError(f"{path} does not exist; run bert-finetune --output {path.parent} first")
            found[init].append(json.loads(path.read_text()))
    return found


def table(task: str, seeds: Sequence[str], reports: dict[str, list[dict]]) -> str:
    """Per seed accuracies and gain, the mean +- std lines and the verdict, as printed."""
    acc = {init: [r["report"]["accuracy"] for r in reports[init]] for init in INITS}
    lrs = {init: ", ".join(sorted({str(r.get("lr")) for r in reports[init]})) for init in INITS}
    v = judge(acc["pretrained"], acc["random"])
    lines = [
        f"{task}: learning rate pretrained {lrs['pretrained']}, random init {lrs['random']}",
        f"{'seed':>6} {'pretrained':>11} {'random init':>12} {'gain (points)':>14}",
    ]
    lines += [
        f"{s:>6} {p:>11.4f} {r:>12.4f} {g:>+14.1f}"
        for s, p, r, g in zip(seeds, acc["pretrained"], acc["random"], v.gains)
    ]
    spread = f" +- {v.spread:.1f}" if v.spread is not None else ""
    lines.append(
        f"mean +- std over {len(seeds)} seeds: pretrained {_mean_std(acc['pretrained'])}, random init "
        f"{_mean_std(acc['random'])}, gain {v.mean:+.1f}{spread} points"
    )
    lines.append(verdict_line(task, v))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.compare", description=__doc__.splitlines()[0])
    p.add_argument("root", metavar="ROOT", help="directory holding pretrained/seedS and random/seedS")
    p.add_argument("--seeds", nargs="+", required=True, metavar="S", help="the seeds that ran")
    p.add_argument("--task", default="task", help="the task's name in the printed lines")
    args = p.parse_args(argv)
    print(table(args.task, args.seeds, read_reports(Path(args.root), args.seeds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
