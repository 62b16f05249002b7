"""`bert-pretrain`'s flags: `TrainConfig` (every field is a flag, common.flags) and its parser.

Batch size, accumulation and ZeRO stage come from the DeepSpeed JSON (`--deepspeed_config`); the optimizer,
schedule and precision from it or from the recipe (`optimizer`, `schedule`, `precision`, merged into the JSON by
pretrain.recipe_deepspeed); model shape from `--model` (`ModelFlags`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Literal

from common.errors import UserError
from common.flags import accept_launcher_arguments, add_arguments, from_args, option
from pretrain import recipe
from pretrain.data_config import DataConfig
from pretrain.models import ModelFlags


@dataclass(kw_only=True)
class TrainConfig(ModelFlags):
    """One pretraining run: every field is a flag of `bert-pretrain` (common.flags)."""

    deepspeed_config: str | None = option(
        None, flag="--deepspeed_config", aliases=("--deepspeed-config",), metavar="X.json"
    )
    """DeepSpeed JSON (ds_configs/): batch sizes, ZeRO stage, and the optimizer, schedule and precision where
    the recipe leaves them out. Required: here or in the --recipe file."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Pretraining samples: the datasets and how samples are built from them."""
    save: str | None = option(None, metavar="DIR")
    """Directory for checkpoints and metrics.jsonl; relaunching with it resumes exactly. Required: here or in
    the --recipe file."""
    train_steps: int = 1000
    """Optimizer steps; the learning rate reaches zero here."""
    save_every: int = 0
    """Checkpoint every N steps; 0 saves only at the end and on a signal."""
    keep_last: int = 0
    """Keep only the newest K good checkpoints (complete, verified, saved at a sane loss) and the one the run
    resumed from; 0 keeps all."""
    keep_every: int = 0
    """With --keep-last: also keep every checkpoint whose step is a multiple of N (milestones); 0: none."""
    resume_from: str | None = None
    """Roll back: resume from this checkpoint tag of --save (e.g. step_00004000) instead of the newest good one;
    the newer tags are moved into SAVE/abandoned/."""
    trust_checkpoint: bool = False
    """Load checkpoints (resume, --init-from) without the weights_only check: only for files of known origin."""
    eval_every: int = 0
    """Evaluate every N steps, at step 0 and at the end; 0 never."""
    eval_samples: int = 1024
    """Held-out samples per evaluation."""
    init_from: str | None = None
    """Weights only, from a checkpoint or a Hugging Face directory; fresh optimizer and schedule (phase 2)."""
    init_optimizer: bool = False
    """With --init-from one of our checkpoints: also take its optimizer state (the LAMB moments), as NVIDIA's
    phase 2 does; the schedule and the step count start afresh, the hyperparameters are this run's JSON's."""
    log_every: int = 10
    """Plain log line every N steps when not on a terminal."""
    time_budget: float = option(0.0, flag="--time-budget-hours", aliases=("--time-budget",), metavar="HOURS")
    """Wall-clock hours that drive the schedule; the run stops with a checkpoint when they are spent; 0: none."""
    max_nonfinite: int = 10
    """Stop after this many consecutive non-finite losses."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project (offline without an API key)."""
    tensorboard: bool = False
    """Write TensorBoard events to SAVE/tensorboard."""
    dist_timeout: float = option(10.0, flag="--dist-timeout-minutes", aliases=("--dist-timeout",), metavar="MIN")
    """Minutes a collective may wait for a missing peer before the run fails (the process-group timeout; a
    launch by scripts/launch_multinode.sh ends every rank within seconds of a failure anyway)."""
    allow_tokenizer_change: bool = False
    """Resume or --init-from a checkpoint trained with another tokenizer than the data's (refused otherwise)."""
    recipe: str | None = option(None, metavar="FILE")
    """Recipe file (YAML or JSON of field: value, with optional phases:) or a shipped one (bert-base,
    modernbert-base); over the model family's recipe, under the command line (docs/RECIPES.md)."""
    phase: str | None = None
    """Apply this entry of the --recipe file's phases: (e.g. phase2, context) over the rest of the file."""
    lr: float | None = None
    """Peak learning rate, for a DeepSpeed JSON without optimizer.params.lr (one that sets another is an error)."""
    global_batch: int | None = option(None, metavar="N")
    """Global batch in samples, for a DeepSpeed JSON without train_batch_size (another value is an error)."""
    micro_batch: int | None = option(None, metavar="N")
    """Micro-batch per process, for a DeepSpeed JSON without train_micro_batch_size_per_gpu (likewise)."""
    warmup: float | None = None
    """Warmup share of the run, for a DeepSpeed JSON schedule without warmup_proportion (likewise)."""
    precision: Literal["bf16", "fp16", "fp32"] | None = None
    """Compute precision, for a DeepSpeed JSON without bf16/fp16 sections (one that runs another is an error)."""
    optimizer: dict | None = option(None, cli=False)
    """Recipe file only: the optimizer as {type, lr, betas, ...} (the JSON's type and params in one mapping),
    for a JSON without an optimizer section or the params it leaves out; a preset brings its family's."""
    schedule: dict | None = option(None, cli=False)
    """Recipe file only: the learning-rate schedule as {type, warmup_proportion, ...}, likewise for the JSON's
    scheduler section."""
    print_recipe: bool = False
    """Print the resolved recipe (each value with where it came from, and the provenance) and exit."""
    given: list[str] | None = option(None, cli=False)
    """The fields named on the command line (set by from_args; None: those that differ from their default)."""
    compile: bool = False
    """torch.compile the whole model through DeepSpeed's engine.compile() (the first steps compile, then run
    faster; checkpoints keep the eager names)."""

    @property
    def seed(self) -> int:
        """`--seed`: of the weights and dropout here, of samples and masks in `data`."""
        return self.data.seed

    @classmethod
    def from_args(cls, argv=None) -> TrainConfig:
        parser = build_parser()
        cfg = from_args(cls, parser.parse_args(argv))
        return dataclasses.replace(cfg, given=sorted(recipe.given_on_command_line(parser, argv)))

    def validate(self) -> None:
        for name, flag in (("deepspeed_config", "--deepspeed_config X.json"), ("save", "--save DIR")):
            if getattr(self, name) is None:
                raise UserError(f"{flag.split()[0]} is required: pass {flag} or set {name}: in a --recipe file")
        for name in ("train_steps",):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        nonnegative = (
            "save_every",
            "keep_last",
            "keep_every",
            "eval_every",
            "time_budget",
            "log_every",
            "max_nonfinite",
        )
        for name in nonnegative:
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be 0 or more")
        if self.init_optimizer and not self.init_from:
            raise UserError("--init-optimizer takes the optimizer state of --init-from; pass --init-from CHECKPOINT")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bert-pretrain",
        description="Pretrain BERT (MLM + NSP/SOP) or ModernBERT (MLM on packed documents) with DeepSpeed; a "
        "--model preset brings its family's recipe (docs/RECIPES.md). Batch size and ZeRO stage come from "
        "--deepspeed_config; the optimizer, schedule and precision from it or from --recipe FILE, which can name "
        "every flag. Relaunching with the same --save resumes exactly. Multi-process: "
        "deepspeed [--hostfile H] [--num_gpus N] --module pretrain.train <these flags>.",
    )
    add_arguments(p, TrainConfig)
    accept_launcher_arguments(p)
    return p
