"""BERT pretraining loop: `main(cfg)` (importable), `cli()` (`bert-pretrain`, `deepspeed --module pretrain.train`).

Batch size, accumulation, optimizer, precision, ZeRO stage and learning-rate schedule come from the DeepSpeed
JSON (`--deepspeed_config`); model shape from `--model`; everything else from the flags below.

Design choices:
- Every check a user can get wrong runs before any compute (dataset, vocabulary, sequence length, batch
  configuration, fp16 on CPU, a --save directory of another model shape) and fails with one line.
- Losses are averaged over data-parallel ranks before they are logged, so metrics.jsonl does not depend on
  the number of processes; the same all-reduce carries the stop flag (SIGTERM/SIGINT, time budget), so all
  ranks stop at the same step boundary, save and exit 0.
- Resume is exact: the data position is `consumed_samples` (samples are a pure function of their index),
  dropout is seeded per micro-batch from its first global sample (`dropout_seed`, not per rank), and
  metrics.jsonl is cut back to the resumed step; so a run is the same on any process count and after a resume
  on another count, up to float32 summation order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.flags import accept_launcher_arguments, add_arguments, from_args, option
from common.log import get_logger
from pretrain import identity, recipe
from pretrain.data import DataConfig, PretrainingData, eval_batches
from pretrain.metrics import Metrics
from pretrain.models import ModelFlags, build_pretraining_model, pretraining_from_state, shape_mismatch
from pretrain.runtime import dist
from pretrain.runtime.ds_config import compute_dtype, resolve_batch
from pretrain.timing import StepTiming

log = get_logger(__name__)


@dataclass(kw_only=True)
class TrainConfig(ModelFlags):
    """One pretraining run: every field is a flag of `bert-pretrain` (common.flags)."""

    deepspeed_config: str = option(flag="--deepspeed_config", aliases=("--deepspeed-config",), metavar="X.json")
    """DeepSpeed JSON (ds_configs/): batch sizes, optimizer, precision, ZeRO stage, schedule."""
    data: DataConfig
    """Pretraining samples: the datasets and how samples are built from them."""
    save: str
    """Directory for checkpoints and metrics.jsonl; relaunching with it resumes exactly."""
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
        "--model preset brings its family's objective (docs/RECIPES.md). Batch size, optimizer, precision and "
        "ZeRO stage come from --deepspeed_config. Relaunching with the same --save resumes exactly. Multi-process: "
        "deepspeed [--hostfile H] [--num_gpus N] --module pretrain.train <these flags>.",
    )
    add_arguments(p, TrainConfig)
    accept_launcher_arguments(p)
    return p


class StopFlag:
    """Set by SIGTERM/SIGINT; read before every micro-batch (all ranks agree through an all-reduce)."""

    def __init__(self):
        self.signal: int | None = None
        self.stopping = False  # the ranks agreed to stop for a signal (this rank's, or a peer's)
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the signals back; a run that stopped for a signal goes on ignoring SIGTERM while it exits: the
        checkpoint is written by now, a supervisor may repeat the request, and a rank that stopped because a
        peer was signalled may get its own SIGTERM only now (the launcher's on another node came late), which
        must not kill it in the exit's last collective."""
        for sig, handler in self._previous.items():
            stopping = (self.stopping or self.signal is not None) and sig == signal.SIGTERM
            signal.signal(sig, signal.SIG_IGN if stopping else handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signal = signum

    def agreed(self) -> bool:
        """Whether any rank was signalled (a collective: every rank calls it at the same point)."""
        return self.note(dist.all_reduce([float(self.signal is not None)], op="max")[0])

    def note(self, signalled_anywhere: float) -> bool:
        """Record the ranks' agreement (an all-reduced max of `signal is not None`) and return it."""
        self.stopping = self.stopping or bool(signalled_anywhere)
        return self.stopping


@torch.no_grad()
def evaluate(engine_or_model, batches) -> dict[str, float]:
    """MLM accuracy and loss over masked positions, NSP accuracy; summed over ranks when distributed."""
    module = getattr(engine_or_model, "module", engine_or_model)
    was_training = module.training
    module.eval()
    correct = total = loss_sum = nsp_correct = nsp_total = 0.0
    try:
        for batch in batches:
            device = next(module.parameters()).device
            batch = {k: v.to(device) for k, v in batch.items()}
            out = engine_or_model(**batch)
            labels = batch["mlm_labels"]
            logits = out.mlm_logits.float().reshape(-1, out.mlm_logits.shape[-1])
            keep = labels.reshape(-1) != -100
            logits, labels = logits[keep], labels.reshape(-1)[keep]
            correct += (logits.argmax(-1) == labels).sum().item()
            total += labels.numel()
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            if out.nsp_logits is not None:  # None: a model without a pair head (ModernBERT)
                has = batch["nsp_labels"] != -100
                nsp_correct += (out.nsp_logits.argmax(-1)[has] == batch["nsp_labels"][has]).sum().item()
                nsp_total += has.sum().item()
    finally:
        module.train(was_training)
    correct, total, loss_sum, nsp_correct, nsp_total = dist.all_reduce(
        [correct, total, loss_sum, nsp_correct, nsp_total]
    )
    return {
        "mlm_acc": correct / max(total, 1),
        "mlm_loss": loss_sum / max(total, 1),
        "nsp_acc": nsp_correct / nsp_total if nsp_total else None,  # None: no pair task (--pair-task none)
    }


def _prepare(cfg: TrainConfig, origin: dict | None = None):
    """All user-input checks, before any compute. Returns (model config, data, DeepSpeed config, checkpoint)."""
    from pretrain.runtime import checkpoint
    from pretrain.runtime.ds_config import load_ds_config, resolve_batch

    cfg.validate()
    ds_cfg = load_ds_config(cfg.deepspeed_config)
    recipe.apply_to_deepspeed(recipe.flat(cfg), origin or {}, ds_cfg, cfg.deepspeed_config)
    resolve_batch(ds_cfg, int(os.environ.get("WORLD_SIZE", "1")))
    data = PretrainingData(cfg.data)  # names a missing dataset (shards and globs resolved), checks the data
    manifest = f"{data.sources[0].prefix}.json"  # the first dataset after shards and globs are resolved
    model_cfg = identity.model_config(cfg.model, cfg.model_set, data.tokenizer, manifest)  # the data's token ids
    if cfg.data.seq_len > model_cfg.max_position_embeddings:
        raise UserError(
            f"--seq-len {cfg.data.seq_len} exceeds the model's max_position_embeddings "
            f"{model_cfg.max_position_embeddings}; lower --seq-len or use a larger --model"
        )
    if data.vocab_size > model_cfg.vocab_size:
        raise UserError(
            f"the data's vocabulary ({data.vocab_size} ids, {manifest}) is larger than the model's "
            f"vocab_size {model_cfg.vocab_size}; pass --model-set vocab_size={data.vocab_size} (or more)"
        )
    note = recipe.family_optimizer_note(model_cfg.model_type, ds_cfg, cfg.deepspeed_config)
    if note and not cfg.print_recipe:  # --print-recipe's stdout is the JSON alone
        log.info(note)
    found = checkpoint.starting_point(cfg.save, cfg.resume_from)
    if found is not None:
        diff = shape_mismatch(found[1].config.get("model", {}), model_cfg)
        if diff:
            raise UserError(
                f"--save {cfg.save} holds a checkpoint of a different model shape ({', '.join(diff)} differ); "
                "use a new --save directory or the same --model"
            )
        saved = found[1].config
        identity.compare(
            saved.get("tokenizer"),
            data.tokenizer,
            f"{cfg.save}/{found[0]}",
            f"--data {manifest}",
            cfg.allow_tokenizer_change,
        )
        _check_resume(cfg, saved, ds_cfg, found[1].world_size)
    elif cfg.init_from:
        identity.check_init_from(cfg.init_from, data.tokenizer, f"--data {manifest}", cfg.allow_tokenizer_change)
    return model_cfg, data, ds_cfg, found


def _check_resume(cfg: TrainConfig, saved: dict, ds_cfg: dict, saved_world: int) -> None:
    """A resume keeps the recipe: what may change (recipe.RESUMABLE, the learning rate, the process count)
    takes effect and is printed; any other changed recipe field (or the global batch) refuses, naming it."""
    from pretrain.runtime.ds_config import resolve_batch

    taking, refused = recipe.resume_changes(saved.get("train", {}), recipe.flat(cfg))
    old_ds, world = saved.get("deepspeed"), int(os.environ.get("WORLD_SIZE", "1"))
    if old_ds:
        old_lr, new_lr = (d.get("optimizer", {}).get("params", {}).get("lr") for d in (old_ds, ds_cfg))
        if old_lr != new_lr:
            taking.append(f"lr {old_lr} -> {new_lr}")
        old_batch, new_batch = resolve_batch(old_ds, saved_world)[0], resolve_batch(ds_cfg, world)[0]
        if old_batch != new_batch:
            refused.append(f"global batch (train_batch_size) {old_batch} -> {new_batch}")
    if saved_world != world:
        taking.append(f"processes {saved_world} -> {world} (gradient accumulation follows)")
    if refused:
        raise UserError(
            f"--save {cfg.save} holds a run whose recipe differs: {'; '.join(refused)}; a resume may change only "
            "--train-steps, the learning rate, --time-budget, the cadences and the process count: relaunch with "
            "the checkpoint's values or use a new --save directory"
        )
    if taking:
        log.info(f"resuming {cfg.save} with changes that take effect: {'; '.join(taking)}")


def main(cfg: TrainConfig) -> dict:
    """Train (or resume) and return the final metrics: step, loss, eval (if any), stopped_by."""
    given = set(cfg.given) if cfg.given is not None else recipe.given_in_python(cfg)
    file = recipe.read_file(cfg.recipe) if cfg.recipe else None
    cfg, origin = recipe.resolve(cfg, given, file, cfg.phase, cfg.recipe or "")
    if cfg.print_recipe:
        model_cfg, data, ds_cfg, _ = _prepare(cfg, origin)
        print(json.dumps(_recipe_record(cfg, origin, model_cfg, ds_cfg, data), indent=2))
        return {"step": 0, "stopped_by": None}
    stop = StopFlag()
    stop.install()
    try:
        model_cfg, data, ds_cfg, found = _prepare(cfg, origin)
        from pretrain import runlock

        dist.init_distributed(cfg.dist_timeout)  # the lock's outcome reaches every rank through the group
        with runlock.hold(cfg.save):  # one writer per --save: before anything is written there
            run = _Run(cfg, model_cfg, data, ds_cfg, found, origin)
            try:
                result = run.train(stop)
                for line in (run.timing.summary(), *run.timing.warnings()):
                    log.info(line)
                return result
            finally:
                run.close()
    finally:
        stop.uninstall()


@dataclass
class _Step:
    """What one optimizer step did on this rank."""

    loss: float = 0.0
    mlm_loss: float = 0.0
    nsp_loss: float = 0.0
    tokens: float = 0.0
    """Real (unpadded) tokens of its micro-batches."""
    capacity: float = 0.0
    """Token slots of its micro-batches (sequences x --seq-len): what padding-free packing would fill."""
    flops: float = 0.0
    """Useful training FLOPs (the model family's formula on each sequence's real length)."""
    grad_norm: float | None = None
    """Global gradient norm before clipping (the same on every rank)."""
    data_s: float = 0.0
    """Seconds spent waiting for its micro-batches."""


def _peak_memory() -> float:
    """Bytes: the accelerator's peak allocation, or on CPU the process's peak resident size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return float(torch.cuda.max_memory_allocated())
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class _Clock:
    """Training wall-clock seconds summed over resumes; they drive --time-budget."""

    def __init__(self, budget_hours: float, before_s: float):
        self.budget_s, self.before_s, self.start = budget_hours * 3600.0, before_s, time.monotonic()

    def elapsed(self) -> float:
        return self.before_s + time.monotonic() - self.start

    def progress(self, _step: int) -> float:
        """Share of the budget spent (the learning-rate schedule's clock when there is a budget)."""
        return self.elapsed() / self.budget_s

    def spent(self) -> bool:
        return bool(self.budget_s) and self.elapsed() >= self.budget_s


class _Run:
    """One launch of a run: the engine, where the run stands (`state`), its data streams and its metrics.

    `train` is the loop: optimizer steps, each followed by its record, evaluation, checkpoint and stop check.
    """

    def __init__(self, cfg: TrainConfig, model_cfg, data, ds_cfg: dict, found, origin: dict):
        from pretrain.runtime import checkpoint
        from pretrain.runtime import engine as eng

        dist.init_distributed(cfg.dist_timeout)
        self.cfg, self.data, self.model_cfg = cfg, data, model_cfg
        rank, world = dist.rank(), dist.world_size()
        _, self.micro_batch, self.grad_accum = resolve_batch(ds_cfg, world)
        self.global_batch = self.micro_batch * self.grad_accum * world
        found = _loadable(Path(cfg.save), found, world, ds_cfg, cfg.trust_checkpoint)
        trust = cfg.trust_checkpoint
        optimizer_from = (
            _optimizer_source(cfg.init_from, world, ds_cfg, trust) if found is None and cfg.init_optimizer else None
        )
        model = _build_model(cfg, model_cfg, init=cfg.init_from if found is None else None)
        # elapsed time of a resumed run is needed before resume: loading the LR scheduler evaluates the budget
        self.clock = _Clock(cfg.time_budget, found[1].elapsed_s if found is not None else 0.0)
        progress = self.clock.progress if cfg.time_budget else None
        self.engine = eng.initialize(model, ds_cfg, total_steps=cfg.train_steps, progress=progress)
        fast_paths = model.resolve_fast_paths(self.engine.device, compute_dtype(ds_cfg))  # after ZeRO-3's say
        self.resolved = _resolved_config(cfg, model_cfg, ds_cfg, data, world, fast_paths, origin)
        if cfg.compile:
            self.engine.compile()  # in place (nn.Module.compile): parameter names and checkpoints are unchanged
        self.state = checkpoint.TrainState(world_size=world, config=self.resolved)
        self.keep = checkpoint.Retention(cfg.keep_last, cfg.keep_every)
        self.losses = checkpoint.integrity.LossWatch()  # marks a checkpoint saved at a non-finite or spiking loss
        if found is not None:
            self._resume()
        elif optimizer_from is not None:
            checkpoint.load_optimizer_state(self.engine, optimizer_from, cfg.trust_checkpoint)
            log.info(f"took the optimizer state of {optimizer_from}; the schedule and the step count start afresh")
        self.peak_flops = _peak_tflops(compute_dtype(ds_cfg))
        self.timing = StepTiming(rank, world, cfg.log_every or 10, self.peak_flops)  # skew over log intervals
        self.metrics = Metrics(cfg.save, self.state.step, self.resolved, cfg.tensorboard, cfg.wandb_project)
        rng = checkpoint.rng_state()  # starting a loader draws worker seeds; keep dropout's stream untouched
        self.batches = data.loader("train", self.micro_batch, rank, world, consumed_samples=self.state.consumed_samples)
        checkpoint.set_rng_state(rng)
        self.evals = eval_batches(data, self.micro_batch, rank, world, cfg.eval_samples) if cfg.eval_every else None
        self.result = {"step": self.state.step, "stopped_by": None}
        self.bar = None

    def _resume(self) -> None:
        from pretrain.runtime import checkpoint

        only = checkpoint.rollback_target(self.cfg.save, self.cfg.resume_from)
        tag, resumed = checkpoint.resume(self.engine, self.cfg.save, self.cfg.trust_checkpoint, only)
        self.keep.protect.add(tag)
        self.keep.verified[tag] = not checkpoint.integrity.mark(Path(self.cfg.save) / tag)  # hashed by resume
        self.state = dataclasses.replace(resumed, world_size=dist.world_size(), config=self.resolved)
        self.clock.before_s = self.state.elapsed_s
        log.info(f"resumed from {self.cfg.save} at step {self.state.step} ({self.state.consumed_samples} samples)")

    def train(self, stop: StopFlag) -> dict:
        cfg, state = self.cfg, self.state
        if self.evals is not None and state.step == 0:
            self.evaluate()
        if state.step >= cfg.train_steps:  # a relaunch of a finished run: nothing to do, say so
            log.info(
                f"{cfg.save} is complete: step {state.step} of --train-steps {cfg.train_steps}; raise "
                "--train-steps to train on"
            )
        self.bar = _progress_bar(cfg, state.step)
        loop_start, loop_step = time.monotonic(), state.step
        nonfinite = 0
        while state.step < cfg.train_steps:
            t0 = time.perf_counter()
            lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler moves on inside engine.step)
            step = self._optimizer_step(stop)
            if step is None:  # a signal arrived mid-accumulation: the partial gradients are dropped
                return self._stop("signal", save=True)
            record, bad, signalled, budget = self._record(step, lr, time.perf_counter() - t0, stop)
            eta = (time.monotonic() - loop_start) / (state.step - loop_step) * (cfg.train_steps - state.step)
            _report(self.bar, cfg, record, min(eta, self._budget_left()))
            nonfinite = nonfinite + 1 if bad else 0
            if nonfinite >= max(cfg.max_nonfinite, 1):
                from pretrain.runtime import checkpoint

                good = checkpoint.newest_good(cfg.save, warn=False)
                where = f"the newest good checkpoint is {Path(cfg.save) / good}" if good else "no good checkpoint yet"
                raise UserError(
                    f"the loss was non-finite for {nonfinite} consecutive steps (last at step {state.step}); stopping "
                    f"without saving; {where} (a relaunch resumes from it); lower the learning rate"
                )
            last = state.step == cfg.train_steps
            if self.evals is not None and (state.step % cfg.eval_every == 0 or last or (budget and not signalled)):
                self.evaluate()
            if signalled or budget:
                return self._stop("signal" if signalled else "time budget", save=not nonfinite)
            if not nonfinite and (last or (cfg.save_every and state.step % cfg.save_every == 0)):
                self.save()
        return self.result

    def _optimizer_step(self, stop: StopFlag) -> _Step | None:
        """`grad_accum` micro-batches and one optimizer step: this rank's mean losses, tokens and FLOPs, and the
        gradient norm. None when a signal arrived before the last micro-batch: every rank then leaves the step
        unfinished at the same micro-batch, with the RNG states of the step's start, so that the checkpoint of
        the last completed step resumes exactly (samples are a function of their index)."""
        from pretrain.runtime import checkpoint
        from pretrain.runtime import engine as eng
        from pretrain.runtime.throughput import batch_flops

        engine, step = self.engine, _Step()
        rng = checkpoint.rng_state() if self.grad_accum > 1 else None
        rank, world, consumed = dist.rank(), dist.world_size(), self.state.consumed_samples
        for i in range(self.grad_accum):
            if i and stop.agreed():
                checkpoint.set_rng_state(rng)
                return None
            t0 = self.timing.begin()  # data wait + forward: the rank's own time (pretrain/timing.py)
            batch = next(self.batches)
            step.data_s += time.perf_counter() - t0
            # the loader's i-th micro-batch on this rank starts at this global sample (pretrain.data)
            torch.manual_seed(dropout_seed(self.cfg.seed, consumed + (i * world + rank) * self.micro_batch))
            step.tokens += float(batch["attention_mask"].sum())
            step.capacity += batch["attention_mask"].shape[0] * self.cfg.data.seq_len
            step.flops += batch_flops(self.model_cfg, batch)
            out = engine(**{k: v.to(engine.device) for k, v in batch.items()})
            self.timing.forward_done()
            engine.backward(out.loss)
            step.grad_norm = eng.step(engine)  # DeepSpeed steps the optimizer only at the accumulation boundary
            nsp = out.nsp_loss.item() if out.nsp_loss is not None else 0.0
            for name, value in (("loss", out.loss.item()), ("mlm_loss", out.mlm_loss.item()), ("nsp_loss", nsp)):
                setattr(step, name, getattr(step, name) + value / self.grad_accum)
        return step

    def _record(self, step: _Step, lr: float, seconds: float, stop: StopFlag) -> tuple[dict, bool, bool, bool]:
        """Advance the state by one step and log it: losses averaged over ranks, rates summed, memory the largest.
        Returns (record, a rank's loss was non-finite, a rank was signalled, the time budget is spent)."""
        state, world = self.state, dist.world_size()
        losses = (step.loss, step.mlm_loss, step.nsp_loss)
        bad = float(not all(map(math.isfinite, losses)))
        loss, mlm, nsp, bad, tokens, capacity, flops, *timing = dist.all_reduce(
            [*losses, bad, step.tokens, step.capacity, step.flops, *self.timing.values(step.data_s)]
        )
        memory, signalled, budget = dist.all_reduce(
            [_peak_memory(), float(stop.signal is not None), self.clock.spent()], "max"
        )
        signalled = stop.note(signalled)
        state.step += 1
        state.consumed_samples += self.global_batch
        state.elapsed_s = self.clock.elapsed()
        record = {"step": state.step, "loss": loss / world, "mlm_loss": mlm / world, "nsp_loss": nsp / world}
        record.update(lr=lr, samples=state.consumed_samples, seq_per_s=self.global_batch / seconds)
        record.update(tokens_per_s=tokens / seconds, fill=tokens / capacity, tflops=flops / seconds / 1e12)
        record["peak_mem_gb"] = memory / 1e9
        record.update(self.timing.record(timing, seconds, tokens, capacity, flops))
        if self.peak_flops:
            record["mfu"] = record["tflops"] / (self.peak_flops * world)
        if step.grad_norm is not None:
            record["grad_norm"] = step.grad_norm
        record.update(_loss_scaling(self.engine))
        self.metrics.write(record)
        self.losses.add(record["loss"])
        self.result.update(step=state.step, loss=record["loss"])
        return record, bool(bad), bool(signalled), bool(budget)

    def _budget_left(self) -> float:
        return max(self.clock.budget_s - self.clock.elapsed(), 0.0) if self.clock.budget_s else math.inf

    def evaluate(self) -> None:
        record = {"step": self.state.step, "split": "eval", **evaluate(self.engine, self.evals)}
        self.metrics.write(record)
        self.result["eval"] = record
        log.info(f"eval step {self.state.step}: " + " ".join(f"{k}={v}" for k, v in _rounded(record).items()))

    def save(self) -> None:
        from pretrain.runtime import checkpoint

        t0 = time.monotonic()
        tag_dir = checkpoint.save(self.engine, self.cfg.save, self.state, keep=self.keep, watch=self.losses)
        size = checkpoint.size_on_disk(tag_dir) if dist.is_rank0() else 0
        log.info(f"saved {tag_dir} ({checkpoint.integrity.human_bytes(size)} in {time.monotonic() - t0:.1f} s)")

    def _stop(self, reason: str, save: bool) -> dict:
        from pretrain.runtime import checkpoint

        if save and not checkpoint.is_complete(self.cfg.save, self.state.step):
            self.save()
        self.result["stopped_by"] = reason
        log.info(f"stopping at step {self.state.step} ({reason}); relaunch the same command to resume")
        return self.result

    def close(self) -> None:
        """Loader workers end with the run (also when it fails), the progress bar and metrics are closed."""
        self.batches.close()
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()


def _loadable(save_dir: Path, found, world: int, ds_cfg: dict, trust: bool = False):
    """(tag, state) that `world` processes can load of a checkpoint found in `save_dir`: the tag itself when it was
    written by as many processes, is universal, or holds its optimizer state whole (stage 0); otherwise a
    universal copy that rank 0 makes once while the other ranks wait. Says which in one line."""
    from pretrain.runtime import checkpoint

    if found is None:
        return None
    tag, state = found
    tag_dir = save_dir / tag
    if not tag.endswith("_universal") and state.world_size != world and checkpoint.partitioned(tag_dir):
        log.info(
            f"{tag_dir} was written by {state.world_size} processes with its optimizer state split over them; "
            f"converting it to the universal format to load it on {world} (once; the other ranks wait)"
        )
        if dist.is_rank0():
            checkpoint.to_universal(save_dir, tag, trust)
        dist.barrier()
        tag = f"{tag}_universal"
    elif state.world_size != world and not tag.endswith("_universal"):
        log.info(
            f"{tag_dir} was written by {state.world_size} processes; {world} load it directly (its optimizer state "
            "is whole on every rank); the global batch stays the JSON's, accumulation adapts"
        )
    if tag.endswith("_universal"):
        ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
    return tag, state


def _optimizer_source(init_from: str, world: int, ds_cfg: dict, trust: bool = False) -> Path:
    """The checkpoint tag whose optimizer state --init-optimizer takes: --init-from's newest, or that tag."""
    from pretrain.runtime import checkpoint

    path = Path(init_from)
    good = (
        checkpoint.newest_good(path, warn=False)
        if path.is_dir() and not (path / checkpoint.STATE_FILE).is_file()
        else None
    )
    found = (good, checkpoint.read_state(path / good)) if good else None  # the tag load_weights takes the weights of
    if (path / checkpoint.STATE_FILE).is_file():
        path, found = path.parent, (path.name, checkpoint.read_state(path))
    if found is None:
        raise UserError(
            f"--init-optimizer: --init-from {init_from} is not one of our checkpoints (a --save directory or a tag), "
            "so it has no optimizer state to take; drop --init-optimizer"
        )
    return path / _loadable(path, found, world, ds_cfg, trust)[0]


def _recipe_record(cfg: TrainConfig, origin: dict, model_cfg, ds_cfg: dict, data) -> dict:
    """The resolved recipe: the flags, the model config, the DeepSpeed JSON, where each flag's value came from
    (those not at their default), the data's tokenizer and the provenance (pretrain.recipe)."""
    return {
        "train": dataclasses.asdict(cfg),
        "model": dataclasses.asdict(model_cfg),
        "deepspeed": ds_cfg,
        "origin": {k: v for k, v in origin.items() if v != "default"},
        "provenance": recipe.provenance(),
        "tokenizer": data.tokenizer,  # the fingerprint that resume, export and fine-tuning compare (identity)
    }


def _resolved_config(
    cfg: TrainConfig, model_cfg, ds_cfg: dict, data, world: int, fast_paths: dict, origin: dict
) -> dict:
    """What this run is, printed at start and saved with every checkpoint."""
    resolved = {
        **_recipe_record(cfg, origin, model_cfg, ds_cfg, data),
        "fast_paths": fast_paths,
        "world_size": world,
        "data": {"vocab_size": data.vocab_size, "train_samples": data.num_samples("train")},
    }
    log.info("resolved configuration:\n" + json.dumps(resolved, indent=2))
    if model_cfg.vocab_size - data.vocab_size > 64:  # more than rounding up to a multiple of 64 (30522 -> 30528)
        log.info(
            f"note: the model's vocab_size {model_cfg.vocab_size} exceeds the data's {data.vocab_size} ids; the extra "
            f"rows are never a target but cost MLM-decoder compute: --model-set vocab_size={data.vocab_size}"
        )
    return resolved


def _rounded(record: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items() if k not in ("step", "split")}


def _build_model(cfg: TrainConfig, model_cfg, init: str | None):
    """A fresh model from `--seed`, or with the weights of `--init-from` (not when resuming)."""
    from pretrain.runtime.checkpoint import load_weights

    torch.manual_seed(cfg.seed)
    if not init:
        return build_pretraining_model(model_cfg)
    _, weights = load_weights(init, cfg.trust_checkpoint)
    model = pretraining_from_state(model_cfg, weights, f"--init-from {init} (use the --model it was trained with)")
    log.info(f"initialized weights from {init}")
    return model


def dropout_seed(seed: int, first_sample: int) -> int:
    """The dropout seed of the micro-batch that starts at global sample `first_sample`: a function of the samples
    alone, so the same micro-batch draws the same dropout on any process count and after any resume."""
    return int(np.random.SeedSequence([seed, first_sample, 43]).generate_state(1, np.uint64)[0])


def _peak_tflops(dtype: torch.dtype) -> float | None:
    """This GPU's dense peak TFLOP/s in `dtype` (pretrain.runtime.throughput), for MFU; None on CPU or unknown."""
    from pretrain.runtime.throughput import device_peak

    return device_peak(dist.device(), {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"), None)


def _loss_scaling(engine) -> dict:
    """fp16 only: the dynamic loss scale after this step and the optimizer steps skipped on overflow so far."""
    if not engine.fp16_enabled():
        return {}
    return {"loss_scale": float(engine.optimizer.loss_scale), "skipped_steps": int(engine.skipped_steps)}


def _progress_bar(cfg: TrainConfig, start: int):
    if not (dist.is_rank0() and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train_steps, initial=start, unit="step", dynamic_ncols=True)


def _report(bar, cfg: TrainConfig, r: dict, eta_s: float) -> None:
    if bar is not None:
        scaling = {"scale": f"{r['loss_scale']:g}", "skipped": r["skipped_steps"]} if "loss_scale" in r else {}
        bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}", seq_s=f"{r['seq_per_s']:.1f}", **scaling)
        bar.update(1)
    elif cfg.log_every and (r["step"] % cfg.log_every == 0 or r["step"] == cfg.train_steps):
        scaling = f"scale {r['loss_scale']:g} skipped {r['skipped_steps']} " if "loss_scale" in r else ""
        nsp = f"nsp {r['nsp_loss']:.4f} " if cfg.data.pair_task != "none" else ""  # MLM only: no NSP column
        log.info(
            f"step {r['step']}/{cfg.train_steps} loss {r['loss']:.4f} mlm {r['mlm_loss']:.4f} "
            f"{nsp}lr {r['lr']:.3e} {scaling}{r['seq_per_s']:.1f} seq/s "
            f"ETA {int(eta_s // 3600)}:{int(eta_s % 3600 // 60):02d}:{int(eta_s % 60):02d}"
        )


def cli(argv=None) -> int:
    """Console entry point (`bert-pretrain`), also run by `deepspeed --module pretrain.train`."""
    return dist.run_cli(main, argv, parse=TrainConfig.from_args)


if __name__ == "__main__":
    sys.exit(cli())
