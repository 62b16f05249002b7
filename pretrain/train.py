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

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UserError, run_cli
from common.log import get_logger
from pretrain import recipe, runlock
from pretrain.data import eval_batches
from pretrain.metrics import Metrics
from pretrain.models.base import IGNORE_INDEX
from pretrain.runtime import checkpoint, dist, resume
from pretrain.runtime.ds_config import compute_dtype, resolve_batch
from pretrain.runtime.throughput import batch_flops, peak_memory, peak_tflops
from pretrain.startup import (
    build_model,
    loadable,
    optimizer_source,
    prepare,
    recipe_record,
    resolved_config,
    rounded,
)
from pretrain.stop import StopFlag
from pretrain.timing import StepTiming
from pretrain.train_config import TrainConfig

log = get_logger(__name__)


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
            keep = labels.reshape(-1) != IGNORE_INDEX
            logits, labels = logits[keep], labels.reshape(-1)[keep]
            correct += (logits.argmax(-1) == labels).sum().item()
            total += labels.numel()
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            if out.nsp_logits is not None:  # None: a model without a pair head (ModernBERT)
                has = batch["nsp_labels"] != IGNORE_INDEX
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


def main(cfg: TrainConfig) -> dict:
    """Train (or resume) and return the final metrics: step, loss, eval (if any), stopped_by."""
    given = set(cfg.given) if cfg.given is not None else recipe.given_in_python(cfg)
    file = recipe.read_file(cfg.recipe) if cfg.recipe else None
    cfg, origin = recipe.resolve(cfg, given, file, cfg.phase, cfg.recipe or "")
    if cfg.print_recipe:
        model_cfg, data, ds_cfg, _ = prepare(cfg, origin)
        print(json.dumps(recipe_record(cfg, origin, model_cfg, ds_cfg, data), indent=2))
        return {"step": 0, "stopped_by": None}
    stop = StopFlag()
    stop.install()
    try:
        model_cfg, data, ds_cfg, found = prepare(cfg, origin)
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
        from pretrain.runtime import engine as eng  # imports deepspeed (seconds): not for --print-recipe, --help

        dist.init_distributed(cfg.dist_timeout)
        self.cfg, self.data, self.model_cfg = cfg, data, model_cfg
        rank, world = dist.rank(), dist.world_size()
        _, self.micro_batch, self.grad_accum = resolve_batch(ds_cfg, world)
        self.global_batch = self.micro_batch * self.grad_accum * world
        found = loadable(Path(cfg.save), found, world, ds_cfg, cfg.trust_checkpoint)
        trust = cfg.trust_checkpoint
        optimizer_from = (
            optimizer_source(cfg.init_from, world, ds_cfg, trust) if found is None and cfg.init_optimizer else None
        )
        model = build_model(cfg, model_cfg, init=cfg.init_from if found is None else None)
        self.options = model.paths.options  # the speed switches (--model-set), for the FLOP count
        # elapsed time of a resumed run is needed before resume: loading the LR scheduler evaluates the budget
        self.clock = _Clock(cfg.time_budget, found[1].elapsed_s if found is not None else 0.0)
        progress = self.clock.progress if cfg.time_budget else None
        self.engine = eng.initialize(model, ds_cfg, total_steps=cfg.train_steps, progress=progress)
        fast_paths = model.resolve_fast_paths(self.engine.device, compute_dtype(ds_cfg))  # after ZeRO-3's say
        self.resolved = resolved_config(cfg, model_cfg, ds_cfg, data, world, fast_paths, origin)
        if cfg.compile:
            self.engine.compile()  # in place (nn.Module.compile): parameter names and checkpoints are unchanged
        self.state = checkpoint.TrainState(world_size=world, config=self.resolved)
        self.keep = checkpoint.Retention(cfg.keep_last, cfg.keep_every)
        self.losses = checkpoint.integrity.LossWatch()  # marks a checkpoint saved at a non-finite or spiking loss
        if found is not None:
            self._resume()
        elif optimizer_from is not None:
            resume.load_optimizer_state(self.engine, optimizer_from, cfg.trust_checkpoint)
            log.info(f"took the optimizer state of {optimizer_from}; the schedule and the step count start afresh")
        self.peak_flops = peak_tflops(compute_dtype(ds_cfg))
        self.timing = StepTiming(rank, world, cfg.log_every or 10, self.peak_flops)  # skew over log intervals
        self.metrics = Metrics(cfg.save, self.state.step, self.resolved, cfg.tensorboard, cfg.wandb_project)
        rng = checkpoint.rng_state()  # starting a loader draws worker seeds; keep dropout's stream untouched
        self.batches = data.loader("train", self.micro_batch, rank, world, consumed_samples=self.state.consumed_samples)
        checkpoint.set_rng_state(rng)
        self.evals = eval_batches(data, self.micro_batch, rank, world, cfg.eval_samples) if cfg.eval_every else None
        self.result = {"step": self.state.step, "stopped_by": None}
        self.bar = None

    def _resume(self) -> None:

        only = resume.rollback_target(self.cfg.save, self.cfg.resume_from)
        tag, resumed = resume.resume(self.engine, self.cfg.save, self.cfg.trust_checkpoint, only)
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
        from pretrain.runtime import engine as eng  # imports deepspeed (seconds): not for --print-recipe, --help

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
            step.flops += batch_flops(self.model_cfg, batch, self.options)
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
            [peak_memory(), float(stop.signal is not None), self.clock.spent()], "max"
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
        log.info(f"eval step {self.state.step}: " + " ".join(f"{k}={v}" for k, v in rounded(record).items()))

    def save(self) -> None:

        t0 = time.monotonic()
        tag_dir = checkpoint.save(self.engine, self.cfg.save, self.state, keep=self.keep, watch=self.losses)
        size = checkpoint.size_on_disk(tag_dir) if dist.is_rank0() else 0
        log.info(f"saved {tag_dir} ({checkpoint.integrity.human_bytes(size)} in {time.monotonic() - t0:.1f} s)")

    def _stop(self, reason: str, save: bool) -> dict:

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


def dropout_seed(seed: int, first_sample: int) -> int:
    """The dropout seed of the micro-batch that starts at global sample `first_sample`: a function of the samples
    alone, so the same micro-batch draws the same dropout on any process count and after any resume."""
    return int(np.random.SeedSequence([seed, first_sample, 43]).generate_state(1, np.uint64)[0])


def _loss_scaling(engine) -> dict:
    """fp16 only: the dynamic loss scale after this step and the optimizer steps skipped on overflow so far."""
    if not engine.fp16_enabled():
        return {}
    return {"loss_scale": float(engine.optimizer.loss_scale), "skipped_steps": int(engine.skipped_steps)}


def _progress_bar(cfg: TrainConfig, start: int):
    if not (dist.is_rank0() and sys.stderr.isatty()):
        return None
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
    return run_cli(main, argv, parse=TrainConfig.from_args, after_success=dist.shutdown)


if __name__ == "__main__":
    sys.exit(cli())
