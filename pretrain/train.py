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
  dropout RNG states are saved per rank, and metrics.jsonl is cut back to the resumed step.
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

import torch

from data_prep.errors import UserError, run_cli
from data_prep.flags import accept_launcher_arguments, add_arguments, from_args, option
from data_prep.log import get_logger
from pretrain import dist
from pretrain.data import DataConfig, PretrainingData, eval_batches
from pretrain.metrics import Metrics
from pretrain.models import ModelFlags, build_pretraining_model, shape_mismatch

log = get_logger(__name__)


@dataclass(kw_only=True)
class TrainConfig(ModelFlags):
    """One pretraining run: every field is a flag of `bert-pretrain` (data_prep.flags)."""

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
    """Keep only the newest K checkpoints; 0 keeps all."""
    eval_every: int = 0
    """Evaluate every N steps, at step 0 and at the end; 0 never."""
    eval_samples: int = 1024
    """Held-out samples per evaluation."""
    init_from: str | None = None
    """Weights only, from a checkpoint or a Hugging Face directory; fresh optimizer and schedule (phase 2)."""
    log_every: int = 10
    """Plain log line every N steps when not on a terminal."""
    time_budget: float = 0.0
    """Wall-clock hours that drive the schedule; the run stops with a checkpoint when they are spent; 0: none."""
    max_nonfinite: int = 10
    """Stop after this many consecutive non-finite losses."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project (offline without an API key)."""
    tensorboard: bool = False
    """Write TensorBoard events to SAVE/tensorboard."""
    dist_timeout: float = 10.0
    """Minutes a collective may wait for a missing peer before the run fails (the process-group timeout; a
    launch by scripts/launch_multinode.sh ends every rank within seconds of a failure anyway)."""
    compile: bool = False
    """torch.compile the whole model through DeepSpeed's engine.compile() (the first steps compile, then run
    faster; checkpoints keep the eager names)."""

    @property
    def seed(self) -> int:
        """`--seed`: of the weights and dropout here, of samples and masks in `data`."""
        return self.data.seed

    @classmethod
    def from_args(cls, argv=None) -> TrainConfig:
        return from_args(cls, build_parser().parse_args(argv))

    def validate(self) -> None:
        for name in ("train_steps",):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("save_every", "keep_last", "eval_every", "time_budget", "log_every", "max_nonfinite"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be 0 or more")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bert-pretrain",
        description="Pretrain BERT (MLM + NSP) with DeepSpeed. Batch size, optimizer, precision and ZeRO stage "
        "come from --deepspeed_config. Relaunching with the same --save resumes exactly. Multi-process: "
        "deepspeed [--hostfile H] [--num_gpus N] --module pretrain.train <these flags>.",
    )
    add_arguments(p, TrainConfig)
    accept_launcher_arguments(p)
    return p


class StopFlag:
    """Set by SIGTERM/SIGINT; read before every micro-batch (all ranks agree through an all-reduce)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the signals back; a process that was asked to stop goes on ignoring SIGTERM while it exits (a
        supervisor may repeat the request, and the checkpoint is written by now)."""
        for sig, handler in self._previous.items():
            stopping = self.signal is not None and sig == signal.SIGTERM
            signal.signal(sig, signal.SIG_IGN if stopping else handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signal = signum

    def agreed(self) -> bool:
        """Whether any rank was signalled (a collective: every rank calls it at the same point)."""
        return bool(dist.all_reduce([float(self.signal is not None)], op="max")[0])


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
            nsp = batch["nsp_labels"]
            has = nsp != -100
            nsp_correct += (out.nsp_logits.argmax(-1)[has] == nsp[has]).sum().item()
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


def _prepare(cfg: TrainConfig):
    """All user-input checks, before any compute. Returns (model config, data, DeepSpeed config, checkpoint)."""
    from pretrain import checkpoint
    from pretrain.engine import load_ds_config, resolve_batch

    cfg.validate()
    ds_cfg = load_ds_config(cfg.deepspeed_config)
    resolve_batch(ds_cfg, int(os.environ.get("WORLD_SIZE", "1")))
    model_cfg = cfg.model_config()
    if cfg.data.seq_len > model_cfg.max_position_embeddings:
        raise UserError(
            f"--seq-len {cfg.data.seq_len} exceeds the model's max_position_embeddings "
            f"{model_cfg.max_position_embeddings}; lower --seq-len or use a larger --model"
        )
    for prefix in cfg.data.prefixes:
        if not Path(prefix + ".idx").is_file() or not Path(prefix + ".bin").is_file():
            raise UserError(f"dataset {prefix}.bin/.idx does not exist; pass a PREFIX written by `bert-prep build`")
    data = PretrainingData(cfg.data)
    if data.vocab_size > model_cfg.vocab_size:
        raise UserError(
            f"the data's vocabulary ({data.vocab_size} ids, {cfg.data.prefixes[0]}.json) is larger than the model's "
            f"vocab_size {model_cfg.vocab_size}; pass --model-set vocab_size={data.vocab_size} (or more)"
        )
    found = checkpoint.newest(cfg.save)
    if found is not None:
        diff = shape_mismatch(found[1].config.get("model", {}), model_cfg)
        if diff:
            raise UserError(
                f"--save {cfg.save} holds a checkpoint of a different model shape ({', '.join(diff)} differ); "
                "use a new --save directory or the same --model"
            )
    return model_cfg, data, ds_cfg, found


def main(cfg: TrainConfig) -> dict:
    """Train (or resume) and return the final metrics: step, loss, eval (if any), stopped_by."""
    stop = StopFlag()
    stop.install()
    try:
        model_cfg, data, ds_cfg, found = _prepare(cfg)
        run = _Run(cfg, model_cfg, data, ds_cfg, found)
        try:
            return run.train(stop)
        finally:
            run.close()
    finally:
        stop.uninstall()


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

    def __init__(self, cfg: TrainConfig, model_cfg, data, ds_cfg: dict, found):
        from pretrain import checkpoint
        from pretrain import engine as eng

        eng.init_distributed(cfg.dist_timeout)
        self.cfg, self.data = cfg, data
        rank, world = dist.rank(), dist.world_size()
        _, self.micro_batch, self.grad_accum = eng.resolve_batch(ds_cfg, world)
        self.global_batch = self.micro_batch * self.grad_accum * world
        _check_resume_layout(cfg, ds_cfg, found, world)
        model = _build_model(cfg, model_cfg, init=cfg.init_from if found is None else None)
        fast_paths = model.resolve_fast_paths(dist.device(), eng.compute_dtype(ds_cfg))
        self.resolved = _resolved_config(cfg, model_cfg, ds_cfg, data, world, fast_paths)
        # elapsed time of a resumed run is needed before resume: loading the LR scheduler evaluates the budget
        self.clock = _Clock(cfg.time_budget, found[1].elapsed_s if found is not None else 0.0)
        progress = self.clock.progress if cfg.time_budget else None
        self.engine = eng.initialize(model, ds_cfg, total_steps=cfg.train_steps, progress=progress)
        if cfg.compile:
            self.engine.compile()  # in place (nn.Module.compile): parameter names and checkpoints are unchanged
        torch.manual_seed(cfg.seed + 1000 * rank)  # dropout streams differ per rank
        self.state = checkpoint.TrainState(world_size=world, config=self.resolved)
        if found is not None:
            self._resume()
        self.metrics = Metrics(cfg.save, self.state.step, self.resolved, cfg.tensorboard, cfg.wandb_project)
        rng = checkpoint.rng_state()  # starting a loader draws worker seeds; keep dropout's stream untouched
        self.batches = data.loader("train", self.micro_batch, rank, world, consumed_samples=self.state.consumed_samples)
        checkpoint.set_rng_state(rng)
        self.evals = eval_batches(data, self.micro_batch, rank, world, cfg.eval_samples) if cfg.eval_every else None
        self.result = {"step": self.state.step, "stopped_by": None}
        self.bar = None

    def _resume(self) -> None:
        from pretrain import checkpoint

        resumed = checkpoint.resume(self.engine, self.cfg.save)
        self.state = dataclasses.replace(resumed, world_size=dist.world_size(), config=self.resolved)
        self.clock.before_s = self.state.elapsed_s
        log.info(f"resumed from {self.cfg.save} at step {self.state.step} ({self.state.consumed_samples} samples)")

    def train(self, stop: StopFlag) -> dict:
        cfg, state = self.cfg, self.state
        if self.evals is not None and state.step == 0:
            self.evaluate()
        self.bar = _progress_bar(cfg, state.step)
        loop_start, loop_step = time.monotonic(), state.step
        nonfinite = 0
        while state.step < cfg.train_steps:
            t0 = time.perf_counter()
            lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler moves on inside engine.step)
            sums = self._optimizer_step(stop)
            if sums is None:  # a signal arrived mid-accumulation: the partial gradients are dropped
                return self._stop("signal", save=True)
            record, bad = self._record(sums, lr, time.perf_counter() - t0)
            eta = (time.monotonic() - loop_start) / (state.step - loop_step) * (cfg.train_steps - state.step)
            _report(self.bar, cfg, record, min(eta, self._budget_left()))
            nonfinite = nonfinite + 1 if bad else 0
            if nonfinite >= max(cfg.max_nonfinite, 1):
                raise UserError(
                    f"the loss was non-finite for {nonfinite} consecutive steps (last at step {state.step}); stopping "
                    f"without saving, the last good checkpoint in {cfg.save} is intact; lower the learning rate"
                )
            signalled, budget = dist.all_reduce([float(stop.signal is not None), float(self.clock.spent())], "max")
            last = state.step == cfg.train_steps
            if self.evals is not None and (state.step % cfg.eval_every == 0 or last or (budget and not signalled)):
                self.evaluate()
            if signalled or budget:
                return self._stop("signal" if signalled else "time budget", save=not nonfinite)
            if not nonfinite and (last or (cfg.save_every and state.step % cfg.save_every == 0)):
                self.save()
        return self.result

    def _optimizer_step(self, stop: StopFlag) -> list[float] | None:
        """`grad_accum` micro-batches and one optimizer step: this rank's mean (loss, mlm_loss, nsp_loss) and
        whether one was non-finite. None when a signal arrived before the last micro-batch: every rank then
        leaves the step unfinished at the same micro-batch, with the RNG states of the step's start, so that
        the checkpoint of the last completed step resumes exactly (samples are a function of their index)."""
        from pretrain import checkpoint

        engine, sums = self.engine, [0.0, 0.0, 0.0]
        rng = checkpoint.rng_state() if self.grad_accum > 1 else None
        for i in range(self.grad_accum):
            if i and stop.agreed():
                checkpoint.set_rng_state(rng)
                return None
            batch = {k: v.to(engine.device) for k, v in next(self.batches).items()}
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            nsp = out.nsp_loss.item() if out.nsp_loss is not None else 0.0
            sums = [s + x / self.grad_accum for s, x in zip(sums, (out.loss.item(), out.mlm_loss.item(), nsp))]
        return [*sums, float(not all(map(math.isfinite, sums)))]

    def _record(self, sums: list[float], lr: float, seconds: float) -> tuple[dict, bool]:
        """Advance the state by one step and log it (losses averaged over ranks); whether a rank's was non-finite."""
        state, world = self.state, dist.world_size()
        reduced = dist.all_reduce(sums)
        loss, mlm, nsp = (x / world for x in reduced[:3])
        state.step += 1
        state.consumed_samples += self.global_batch
        state.elapsed_s = self.clock.elapsed()
        record = {"step": state.step, "loss": loss, "mlm_loss": mlm, "nsp_loss": nsp}
        record.update(lr=lr, samples=state.consumed_samples, seq_per_s=self.global_batch / seconds)
        record.update(_loss_scaling(self.engine))
        self.metrics.write(record)
        self.result.update(step=state.step, loss=loss)
        return record, bool(reduced[3])

    def _budget_left(self) -> float:
        return max(self.clock.budget_s - self.clock.elapsed(), 0.0) if self.clock.budget_s else math.inf

    def evaluate(self) -> None:
        record = {"step": self.state.step, "split": "eval", **evaluate(self.engine, self.evals)}
        self.metrics.write(record)
        self.result["eval"] = record
        log.info(f"eval step {self.state.step}: " + " ".join(f"{k}={v}" for k, v in _rounded(record).items()))

    def save(self) -> None:
        from pretrain import checkpoint

        t0 = time.monotonic()
        tag_dir = checkpoint.save(self.engine, self.cfg.save, self.state, self.cfg.keep_last or None)
        size = checkpoint.size_on_disk(tag_dir) if dist.is_rank0() else 0
        log.info(f"saved {tag_dir} ({size / 1e9:.2f} GB in {time.monotonic() - t0:.1f} s)")

    def _stop(self, reason: str, save: bool) -> dict:
        from pretrain import checkpoint

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


def _check_resume_layout(cfg: TrainConfig, ds_cfg: dict, found, world: int) -> None:
    if found is not None and found[1].world_size != world and not found[0].endswith("_universal"):
        raise UserError(
            f"{cfg.save}/{found[0]} was written by {found[1].world_size} processes, this launch has {world}; "
            f"run `python -m pretrain.checkpoint to-universal {cfg.save}` first, or relaunch with "
            f"{found[1].world_size}"
        )
    if found is not None and found[0].endswith("_universal"):
        ds_cfg.setdefault("checkpoint", {})["load_universal"] = True


def _resolved_config(cfg: TrainConfig, model_cfg, ds_cfg: dict, data, world: int, fast_paths: dict) -> dict:
    """What this run is, printed at start and saved with every checkpoint."""
    resolved = {
        "train": dataclasses.asdict(cfg),
        "model": dataclasses.asdict(model_cfg),
        "fast_paths": fast_paths,
        "deepspeed": ds_cfg,
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
    from pretrain.checkpoint import load_weights

    torch.manual_seed(cfg.seed)
    model = build_pretraining_model(model_cfg)
    if init:
        _, weights = load_weights(init)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise UserError(
                f"--init-from {init} does not match --model ({len(missing)} missing, {len(unexpected)} unexpected "
                f"tensors, e.g. {(missing + unexpected)[:2]}); use the same model shape"
            )
        log.info(f"initialized weights from {init}")
    return model


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
        log.info(
            f"step {r['step']}/{cfg.train_steps} loss {r['loss']:.4f} mlm {r['mlm_loss']:.4f} "
            f"nsp {r['nsp_loss']:.4f} lr {r['lr']:.3e} {scaling}{r['seq_per_s']:.1f} seq/s "
            f"ETA {int(eta_s // 3600)}:{int(eta_s % 3600 // 60):02d}:{int(eta_s % 60):02d}"
        )


def _cli_main(argv=None) -> int:
    main(TrainConfig.from_args(argv))
    return 0


def cli(argv=None) -> int:
    """Console entry point (`bert-pretrain`), also run by `deepspeed --module pretrain.train`."""
    rc = run_cli(_cli_main, argv)
    if rc == 0:
        from pretrain.engine import shutdown

        shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(cli())
