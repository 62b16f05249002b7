"""`bert-glue`: GLUE tasks over several seeds (and learning rates), summed up in one table.

    bert-glue --data-dir glue_data --init-from runs/demo/hf --output glue --seeds 1 2 3 --lr 3e-4 1e-4 5e-5 3e-5
    deepspeed --num_gpus 8 --module finetune.suite --data-dir glue_data --init-from CKPT --output glue

Design choices:
- Each (task, learning rate, seed) is one `finetune.run.main` in this process (under the launcher every rank
  runs each in step), written to OUTPUT/<task>/lr<LR>/seed<S>/ like any `bert-finetune --glue-task` run.
- The table gives each metric's mean, sample standard deviation and range over the seeds, x100 as GLUE tables
  print them. With several learning rates, each task's best one (highest mean `score`) is the one summed up:
  the last line is the mean over tasks of those scores, GLUE's overall number (here on the dev sets).
- OUTPUT/glue_results.json keeps every run's report and the table's numbers.
- Relaunching the same command goes on where a stopped launch left off: a run whose eval_report.json (written
  last, with the flags it ran with) matches its flags is not run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError, run_cli
from common.flags import accept_launcher_arguments, add_arguments, option
from common.log import get_logger
from finetune.config import FinetuneConfig
from finetune.kinds import glue
from finetune.kinds.glue import TaskName
from finetune.run import flags_json
from finetune.run import main as finetune
from pretrain.runtime import dist

log = get_logger(__name__)

# bert-finetune flags that the suite sets per run, or that do not apply to GLUE
PER_RUN = ("task", "glue_task", "train", "eval", "seed", "lr", "metric")
OTHER_KINDS = ("columns", "qa")  # the classify and qa kinds' own flag groups


@dataclass(kw_only=True)
class SuiteConfig:
    """A GLUE suite: every field is a flag of `bert-glue`."""

    tasks: list[TaskName] = option(default_factory=lambda: list(glue.TASKS))
    """GLUE tasks to run, in this order."""
    seeds: list[int] = option(default_factory=lambda: [1, 2, 3])
    """Seeds: one run per task, learning rate and seed."""
    lrs: list[float] | None = option(None, flag="--lr")
    """Learning rates to sweep (default: bert-finetune's for the model). Google's grid for its compact BERTs:
    3e-4 1e-4 5e-5 3e-5 (batch 8 to 128, 4 epochs)."""
    run: FinetuneConfig
    """Each run: bert-finetune's flags (--output is the suite's directory)."""


def run_all(cfg: SuiteConfig) -> list[dict]:
    """Every run's task, learning rate, seed, best epoch and report."""
    if not cfg.run.data_dir:
        raise UserError("bert-glue reads the tasks from --data-dir; pass the GLUE directory")
    if len(set(cfg.seeds)) != len(cfg.seeds) or len(set(cfg.lrs or ())) != len(cfg.lrs or ()):
        raise UserError("--seeds and --lr must not repeat a value")
    for task in cfg.tasks:  # every task's files are there before the first run starts
        glue.task_dir(cfg.run.data_dir, glue.TASKS[task])
    runs = []
    for task in cfg.tasks:
        for lr in cfg.lrs or [None]:
            for seed in cfg.seeds:
                out = Path(cfg.run.output, task, "lr_default" if lr is None else f"lr{lr:g}", f"seed{seed}")
                run = dataclasses.replace(cfg.run, glue_task=task, lr=lr, seed=seed, output=str(out))
                result = _finished(run)
                if result is None:
                    log.info(f"== {task}, lr {lr or 'default'}, seed {seed} -> {out}")
                    result = finetune(run)
                else:
                    log.info(f"== {task}, lr {lr or 'default'}, seed {seed}: done by an earlier launch ({out})")
                runs.append({k: result[k] for k in ("task", "lr", "seed", "best_epoch", "report")})
    return runs


def _finished(run: FinetuneConfig) -> dict | None:
    """The result of a run an earlier launch completed with the same flags (its eval_report.json, written last),
    when every rank sees it; else None. A relaunched suite goes on where it stopped."""
    path = Path(run.output, "eval_report.json")
    try:
        saved = json.loads(path.read_text())
        same = saved.get("config") == flags_json(run)
    except (OSError, ValueError):
        saved, same = None, False
    return saved if dist.all_reduce([float(same)], "min")[0] == 1.0 else None


def summarize(runs: list[dict]) -> dict:
    """{"rows": mean/std/min/max of each (task, lr, metric) over seeds, "best_lr": {task: lr}, "average"}."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["lr"]), []).append(r["report"])
    rows = []
    for (task, lr), reports in groups.items():
        names = glue.metric_names(glue.TASKS[task])
        for metric in names[1:] if len(names) == 2 else names:  # "score" only where it averages several
            values = [rep[metric] for rep in reports]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            row = {"task": task, "lr": lr, "metric": metric, "mean": statistics.mean(values), "std": spread}
            rows.append(row | {"min": min(values), "max": max(values), "seeds": len(values)})
    score = {key: statistics.mean(rep["score"] for rep in reports) for key, reports in groups.items()}
    best_lr = {}
    for (task, lr), value in score.items():
        if task not in best_lr or value > score[(task, best_lr[task])]:
            best_lr[task] = lr
    average = statistics.mean(score[(task, lr)] for task, lr in best_lr.items())
    return {"rows": rows, "best_lr": best_lr, "average": average}


def format_table(summary: dict) -> str:
    """The usual table: one line per task, learning rate and metric, in points (x100)."""
    lines = [f"{'task':<6} {'lr':>8} {'metric':<12} {'mean':>7} {'std':>6} {'min':>7} {'max':>7} {'seeds':>5}"]
    swept = {t: len({r["lr"] for r in summary["rows"] if r["task"] == t}) > 1 for t in summary["best_lr"]}
    for r in summary["rows"]:
        star = "*" if swept[r["task"]] and summary["best_lr"][r["task"]] == r["lr"] else ""
        points = [100 * r[k] for k in ("mean", "std", "min", "max")]
        lines.append(
            f"{r['task']:<6} {r['lr']:>8.2g} {r['metric']:<12} {points[0]:>7.2f} {points[1]:>6.2f} "
            f"{points[2]:>7.2f} {points[3]:>7.2f} {r['seeds']:>5}{star}"
        )
    n = len(summary["best_lr"])
    lines.append(f"GLUE average (dev sets, {n} task{'s' * (n > 1)}): {100 * summary['average']:.2f}")
    if any(swept.values()):
        lines.append("* the learning rate with the best mean score, the one in the average")
    return "\n".join(lines)


def main(cfg: SuiteConfig) -> dict:
    """Run the suite, print the table, write OUTPUT/glue_results.json; return what it holds."""
    runs = run_all(cfg)
    summary = summarize(runs)
    result = {"suite": dataclasses.asdict(cfg), "runs": runs, **summary}
    if dist.is_rank0():
        path = Path(cfg.run.output, "glue_results.json")
        path.write_text(json.dumps(result, indent=2))
        log.info(format_table(summary))
        log.info(f"every run's report: {path}")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bert-glue",
        description="Fine-tune on GLUE tasks over several seeds (and learning rates); print each metric's mean and "
        "spread and write OUTPUT/glue_results.json. Each run is a bert-finetune --glue-task run.",
    )
    # bert-finetune's wording would describe one run, not the suite
    help_texts = {field: {"help": text} for field, text in GLUE_HELP.items()}
    add_arguments(p, SuiteConfig, exclude=PER_RUN + OTHER_KINDS, extra=help_texts)
    accept_launcher_arguments(p)
    return p


GLUE_HELP = {  # field -> its help in bert-glue
    "data_dir": "The GLUE directory (glue_data/ with CoLA/, SST-2/, ...), read for every task.",
    "output": "Directory of the suite: one subdirectory per task, learning rate and seed, and glue_results.json.",
    "epochs": "Maximum passes over each task's training set. (default: 3)",
    "predict": "Write each run's test-set predictions in GLUE's submission format (its submission/ directory).",
}


def parse_args(argv: Sequence[str] | None = None) -> SuiteConfig:
    from pretrain.recipe import add_recipe_arguments, parse_with_recipe

    parser = build_parser()
    add_recipe_arguments(parser)
    return parse_with_recipe(SuiteConfig, parser, argv)


def cli(argv: Sequence[str] | None = None) -> int:
    raise SystemExit(run_cli(main, argv, parse=parse_args, after_success=dist.shutdown))


if __name__ == "__main__":
    cli()
