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
from data_prep.flags import accept_launcher_arguments, add_arguments, fields_in, from_args, option
from pretrain.data import DataConfig, PretrainingData, eval_batches
from pretrain.model import BertConfig, ModelFlags


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
    """Set by SIGTERM/SIGINT; read at each step boundary (all ranks agree through an all-reduce)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signal = signum


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _log(msg: str) -> None:
    if _is_rank0():
        print(msg, flush=True)


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


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
    correct, total, loss_sum, nsp_correct, nsp_total = _all_reduce([correct, total, loss_sum, nsp_correct, nsp_total])
    return {
        "mlm_acc": correct / max(total, 1),
        "mlm_loss": loss_sum / max(total, 1),
        "nsp_acc": nsp_correct / nsp_total if nsp_total else None,  # None: no pair task (--pair-task none)
    }


class Metrics:
    """Rank 0: metrics.jsonl (cut back to the resumed step), console, TensorBoard, wandb."""

    def __init__(self, cfg: TrainConfig, resolved: dict, start_step: int):
        self.enabled = _is_rank0()
        self.path = Path(cfg.save) / "metrics.jsonl"
        self.tb = self.wandb = None
        if not self.enabled:
            return
        Path(cfg.save).mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop what a killed run logged after its last checkpoint
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
            keep = [ln for ln in keep if not (json.loads(ln)["step"] == start_step and "split" in json.loads(ln))]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(cfg.save) / "tensorboard"))
        if cfg.wandb_project:
            import wandb

            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.wandb = wandb.init(project=cfg.wandb_project, dir=cfg.save, config=resolved, mode=mode)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        prefix = "eval/" if record.get("split") == "eval" else "train/"
        scalars = {prefix + k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


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
        saved = found[1].config.get("model", {})
        ours = dataclasses.asdict(model_cfg)
        diff = [k for k in fields_in(BertConfig, "shape") if saved.get(k) != ours.get(k)]
        if diff:
            raise UserError(
                f"--save {cfg.save} holds a checkpoint of a different model shape ({', '.join(diff)} differ); "
                "use a new --save directory or the same --model"
            )
    return model_cfg, data, ds_cfg, found


def main(cfg: TrainConfig) -> dict:
    """Train (or resume) and return the final metrics: step, loss, eval (if any), stopped_by."""
    model_cfg, data, ds_cfg, found = _prepare(cfg)
    stop = StopFlag()
    stop.install()
    try:
        return _train(cfg, model_cfg, data, ds_cfg, found, stop)
    finally:
        stop.uninstall()


def _train(cfg: TrainConfig, model_cfg, data, ds_cfg: dict, found, stop: StopFlag) -> dict:
    from pretrain import checkpoint
    from pretrain import engine as eng

    eng.init_distributed()
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    _, micro_batch, grad_accum = eng.resolve_batch(ds_cfg, world)
    if found is not None and found[1].world_size != world and not found[0].endswith("_universal"):
        raise UserError(
            f"{cfg.save}/{found[0]} was written by {found[1].world_size} processes, this launch has {world}; "
            f"run `python -m pretrain.checkpoint to-universal {cfg.save}` first, or relaunch with "
            f"{found[1].world_size}"
        )
    if found is not None and found[0].endswith("_universal"):
        ds_cfg.setdefault("checkpoint", {})["load_universal"] = True

    resolved = {
        "train": dataclasses.asdict(cfg),
        "model": dataclasses.asdict(model_cfg),
        "deepspeed": ds_cfg,
        "world_size": world,
        "data": {"vocab_size": data.vocab_size, "train_samples": data.num_samples("train")},
    }
    _log("resolved configuration:\n" + json.dumps(resolved, indent=2))
    if model_cfg.vocab_size - data.vocab_size > 64:  # more than rounding up to a multiple of 64 (30522 -> 30528)
        _log(
            f"note: the model's vocab_size {model_cfg.vocab_size} exceeds the data's {data.vocab_size} ids; the extra "
            f"rows are never a target but cost MLM-decoder compute: --model-set vocab_size={data.vocab_size}"
        )

    model = _build_model(cfg, model_cfg, init=cfg.init_from if found is None else None)
    state = checkpoint.TrainState(world_size=world, config=resolved)
    # elapsed time of a resumed run is needed before resume: loading the LR scheduler evaluates the time budget
    clock = {"start": time.monotonic(), "before": found[1].elapsed_s if found is not None else 0.0}

    def elapsed() -> float:
        return clock["before"] + time.monotonic() - clock["start"]

    budget_s = cfg.time_budget * 3600.0
    progress = (lambda step: elapsed() / budget_s) if budget_s else None
    engine = eng.initialize(model, ds_cfg, total_steps=cfg.train_steps, progress=progress)
    if cfg.compile:
        engine.compile()  # in place (nn.Module.compile): parameter names and checkpoints are unchanged
    torch.manual_seed(cfg.seed + 1000 * rank)  # dropout streams differ per rank
    resumed = checkpoint.resume(engine, cfg.save) if found is not None else None
    if resumed is not None:
        state = dataclasses.replace(resumed, world_size=world, config=resolved)
        clock["before"] = state.elapsed_s
        _log(f"resumed from {cfg.save} at step {state.step} ({state.consumed_samples} samples)")

    metrics = Metrics(cfg, resolved, state.step)
    rng = checkpoint.rng_state()  # starting a loader draws worker seeds; keep dropout's stream untouched
    loader = data.loader("train", micro_batch, rank, world, consumed_samples=state.consumed_samples)
    checkpoint.set_rng_state(rng)
    evals = eval_batches(data, micro_batch, rank, world, cfg.eval_samples) if cfg.eval_every else None
    global_batch = micro_batch * grad_accum * world
    result = {"step": state.step, "stopped_by": None}

    def run_eval() -> None:
        record = {"step": state.step, "split": "eval", **evaluate(engine, evals)}
        metrics.write(record)
        result["eval"] = record
        _log(f"eval step {state.step}: " + " ".join(f"{k}={v}" for k, v in _rounded(record).items()))

    if evals is not None and state.step == 0:
        run_eval()
    bar = _progress_bar(cfg, state.step)
    clock["loop"], clock["loop_step"] = time.monotonic(), state.step
    nonfinite = 0
    while state.step < cfg.train_steps:
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves on inside engine.step)
        sums = _optimizer_step(engine, loader, grad_accum)
        spent_budget = budget_s and elapsed() >= budget_s
        reduced = _all_reduce([*sums, float(not all(map(math.isfinite, sums)))])
        flags = _all_reduce([float(stop.signal is not None), float(bool(spent_budget))], op="max")
        loss, mlm, nsp = (x / world for x in reduced[:3])
        state.step += 1
        state.consumed_samples += global_batch
        state.elapsed_s = elapsed()
        dt = time.perf_counter() - t0
        record = {"step": state.step, "loss": loss, "mlm_loss": mlm, "nsp_loss": nsp}
        record.update(lr=lr, samples=state.consumed_samples, seq_per_s=global_batch / dt)
        record.update(_loss_scaling(engine))
        metrics.write(record)
        result.update(step=state.step, loss=loss)
        eta = (time.monotonic() - clock["loop"]) / (state.step - clock["loop_step"]) * (cfg.train_steps - state.step)
        if budget_s:  # the budget ends the run first when it is the shorter of the two
            eta = min(eta, max(budget_s - state.elapsed_s, 0.0))
        _report(bar, cfg, record, eta)
        nonfinite = nonfinite + 1 if reduced[3] else 0
        if nonfinite >= max(cfg.max_nonfinite, 1):
            metrics.close()
            raise UserError(
                f"the loss was non-finite for {nonfinite} consecutive steps (last at step {state.step}); "
                f"stopping without saving, the last good checkpoint in {cfg.save} is intact; lower the learning rate"
            )
        last = state.step == cfg.train_steps
        stopping = flags[0] or flags[1]
        if evals is not None and (state.step % cfg.eval_every == 0 or last or stopping):
            run_eval()
        if not nonfinite and (last or stopping or (cfg.save_every and state.step % cfg.save_every == 0)):
            tag_dir = checkpoint.save(engine, cfg.save, state, cfg.keep_last or None)
            _log(f"saved {tag_dir}")
        if stopping:
            result["stopped_by"] = "signal" if flags[0] else "time budget"
            _log(f"stopping at step {state.step} ({result['stopped_by']}); relaunch the same command to resume")
            break
    if bar is not None:
        bar.close()
    metrics.close()
    return result


def _rounded(record: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items() if k not in ("step", "split")}


def _build_model(cfg: TrainConfig, model_cfg, init: str | None):
    """A fresh model from `--seed`, or with the weights of `--init-from` (not when resuming)."""
    from pretrain.checkpoint import load_weights
    from pretrain.model import BertForPreTraining

    torch.manual_seed(cfg.seed)
    model = BertForPreTraining(model_cfg)
    if init:
        _, weights = load_weights(init)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise UserError(
                f"--init-from {init} does not match --model ({len(missing)} missing, {len(unexpected)} unexpected "
                f"tensors, e.g. {(missing + unexpected)[:2]}); use the same model shape"
            )
        _log(f"initialized weights from {init}")
    return model


def _optimizer_step(engine, loader, grad_accum: int) -> list[float]:
    """`grad_accum` micro-batches and one optimizer step; this rank's (loss, mlm_loss, nsp_loss) means."""
    sums = [0.0, 0.0, 0.0]
    for _ in range(grad_accum):
        batch = {k: v.to(engine.device) for k, v in next(loader).items()}
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        nsp = out.nsp_loss.item() if out.nsp_loss is not None else 0.0
        sums = [s + x / grad_accum for s, x in zip(sums, (out.loss.item(), out.mlm_loss.item(), nsp))]
    return sums


def _loss_scaling(engine) -> dict:
    """fp16 only: the dynamic loss scale after this step and the optimizer steps skipped on overflow so far."""
    if not engine.fp16_enabled():
        return {}
    return {"loss_scale": float(engine.optimizer.loss_scale), "skipped_steps": int(engine.skipped_steps)}


def _progress_bar(cfg: TrainConfig, start: int):
    if not (_is_rank0() and sys.stderr.isatty()):
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
        _log(
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
