"""`bert-finetune`: fine-tune a pretrained checkpoint on a downstream task and report how it does.

    bert-finetune --task classify --train train.csv --eval dev.csv --init-from CKPT_OR_HF_DIR --output DIR
    bert-finetune --task qa --train train-v2.0.json --eval dev-v2.0.json --init-from DIR --output DIR --seq-len 384
    bert-finetune --glue-task mrpc --data-dir glue_data --init-from DIR --output DIR --predict
    deepspeed --num_gpus 2 --module finetune.run --task tag --train train.conll --eval dev.conll ...

Design choices:
- The model trains through `pretrain.runtime.engine.initialize`, so precision, ZeRO stage, optimizer and schedule
  come from the DeepSpeed JSON (default ds_configs/finetune_cpu.json); `--batch` and `--lr` are the two
  settings a fine-tuning sweep changes, so they override the JSON's micro batch and learning rate.
- The learning rate, when neither --lr nor the JSON sets one, is 5e-5 x 768 / hidden size: 5e-5 for
  BERT-base and 3e-4 for BERT-tiny, the two ends of Google's grid for its compact BERTs (Adam's step scaled
  inversely with width). BERT-base's 5e-5 left a tiny model at the majority class (docs/PERFORMANCE.md).
- Every rank evaluates the whole eval set, so ZeRO-3 ranks stay in step and no gather is needed; rank 0 writes.
- After each epoch the eval metric decides: a better model is written to --output at once (an HF directory
  with the tokenizer, plus the task's prediction files), and `--patience` epochs without improvement stop.
- What differs between tasks (files, head, metrics, predictions, own flags) lives in finetune/kinds/, one module
  per kind; `make_task` hands each only its inputs and its own options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from common.errors import UserError, run_cli
from common.files import write_json_atomic
from common.flags import accept_launcher_arguments, add_arguments
from common.log import get_logger
from finetune import data, kinds
from finetune.config import DEFAULT_DS_CONFIG, FinetuneConfig  # noqa: F401  (DEFAULT_DS_CONFIG: tests/test_wheel.py)
from finetune.kinds import classify, glue, qa, tag
from finetune.model import FAMILIES, save_hf
from pretrain import identity
from pretrain.runtime import dist

log = get_logger(__name__)

KINDS = {"classify": classify.Classify, "tag": tag.Tag, "qa": qa.QA}
METRICS = sorted(
    {m for kind in KINDS.values() for m in kind.metrics}
    | {m for s in glue.TASKS.values() for m in glue.metric_names(s)}
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def make_task(cfg: FinetuneConfig) -> kinds.Task:
    """The task of `cfg`, its files read (not yet encoded); each kind gets its inputs and its own options only."""
    if cfg.glue_task:
        return glue.Glue(cfg.glue_task, cfg.data_dir, cfg.seq_len, cfg.strict, cfg.predict)
    own = {"classify": (cfg.columns,), "tag": (), "qa": (cfg.qa,)}[cfg.task]
    return KINDS[cfg.task](cfg.inputs(), *own)


def default_lr(hidden_size: int) -> float:
    """5e-5 x 768 / hidden to 3 digits: BERT-base 5e-5, BERT-tiny 3e-4 (see the module docstring)."""
    return float(f"{5e-5 * 768 / hidden_size:.3g}")


def load_pretrained(cfg: FinetuneConfig):
    """(model config of either family, its pretraining model's fp32 state dict, tokenizer directory) of
    --init-from."""
    from pretrain.runtime.weights import load_weights

    config, state = load_weights(cfg.init_from, cfg.trust_checkpoint)
    if cfg.seq_len > config.max_position_embeddings:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's {config.max_position_embeddings} positions")
    if cfg.tokenizer:
        current = identity.describe_tokenizer(cfg.tokenizer)
        identity.check_init_from(cfg.init_from, current, f"--tokenizer {cfg.tokenizer}", cfg.allow_tokenizer_change)
        return config, state, cfg.tokenizer
    init = Path(cfg.init_from)
    if any((init / f).is_file() for f in TOKENIZER_FILES):  # an HF directory (e.g. from bert-export)
        return config, state, str(init)
    from pretrain.export import tokenizer_dir  # a checkpoint: the tokenizer of the dataset it trained on

    try:
        return config, state, tokenizer_dir(init, None, None)
    except UserError:
        raise UserError(
            f"--init-from {init} holds no tokenizer and records no dataset manifest naming one; pass --tokenizer DIR"
        ) from None


def ds_config(cfg: FinetuneConfig, hidden_size: int) -> tuple[dict, float]:
    """(the DeepSpeed JSON with --batch and the learning rate applied, that learning rate)."""
    from pretrain.runtime.ds_config import load_ds_config

    ds = load_ds_config(cfg.deepspeed_config)
    if cfg.batch is not None:
        ds["train_micro_batch_size_per_gpu"] = cfg.batch
        ds.pop("train_batch_size", None)
    optimizer = ds.get("optimizer")
    lr = cfg.lr if cfg.lr is not None else (optimizer or {}).get("params", {}).get("lr") or default_lr(hidden_size)
    if optimizer is not None:
        optimizer.setdefault("params", {})["lr"] = lr
    return ds, lr


def epoch_order(n: int, epoch: int, seed: int, chunk: int, rank: int, world: int) -> list[int]:
    """This rank's share of a seeded shuffle, wrapped to a multiple of `chunk` * world so ranks step together."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    total = math.ceil(n / (chunk * world)) * chunk * world
    order = (order * math.ceil(total / n))[:total]
    return order[rank::world]


@torch.no_grad()
def predict_logits(engine, enc: data.Encoded, batch_size: int, pad_id: int) -> list[torch.Tensor]:
    """Float logits of every example of `enc` (in order): (C,) per sequence, (S_i, C) per token, cut to S_i."""
    engine.eval()
    out = []
    for batch in data.batches(enc, list(range(len(enc.input_ids))), batch_size, pad_id):
        batch.pop("labels")
        logits = engine(**{k: v.to(engine.device) for k, v in batch.items()}).logits.float().cpu()
        lengths = batch["attention_mask"].sum(1).tolist()
        out.extend(row[:n] if logits.dim() == 3 else row for row, n in zip(logits, lengths))
    engine.train()
    return out


def flags_json(cfg: FinetuneConfig) -> dict:
    """`cfg` as eval_report.json keeps it (`config`): what a relaunch compares its own flags with."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def main(cfg: FinetuneConfig) -> dict:
    """Fine-tune, keep the best model in cfg.output, and return the eval report of that model."""
    from data_prep.tokenizer import load as load_tokenizer
    from pretrain.runtime.dist import init_distributed
    from pretrain.runtime.ds_config import resolve_batch
    from pretrain.runtime.engine import initialize

    cfg.validate()
    requested = flags_json(cfg)  # as given, before defaults resolve
    task = make_task(cfg)  # reads the files first: bad input stops before the model loads
    config, state, tok_dir = load_pretrained(cfg)
    tok = load_tokenizer(tok_dir)
    if not FAMILIES[config.model_type].token_types:  # then no segment ids are encoded, fed or saved with it
        tok.model_input_names = [name for name in tok.model_input_names if name != "token_type_ids"]
    if len(tok) > config.vocab_size:
        raise UserError(f"tokenizer {tok_dir} has {len(tok)} tokens, the model {config.vocab_size}; pass --tokenizer")
    metric = cfg.metric or task.metrics[0]
    if metric not in task.metrics:
        raise UserError(f"--metric {metric} does not apply to this task; use one of {', '.join(task.metrics)}")
    task.encode(tok)
    ds, lr = ds_config(cfg, config.hidden_size)
    cfg = dataclasses.replace(cfg, metric=metric, lr=lr)
    init_distributed()
    _, micro, accum = resolve_batch(ds, dist.world_size())
    steps_per_epoch = math.ceil(len(task.train.input_ids) / (micro * accum * dist.world_size()))
    torch.manual_seed(cfg.seed)
    model = task.build(config)
    if not cfg.random_init:
        model.load_pretrained(state)
    engine = initialize(model, ds, total_steps=cfg.epochs * steps_per_epoch)
    log.info(json.dumps({"finetune": dataclasses.asdict(cfg), "labels": task.labels, "deepspeed": ds}, indent=2))
    log.info(f"truncated to --seq-len {cfg.seq_len}: {task.truncated}")
    result = fit(cfg, engine, task, tok, (micro, accum)) | {"config": requested}
    if dist.is_rank0():
        write_json_atomic(Path(cfg.output, "eval_report.json"), result)  # written last: the run is complete
    return result


def train_epoch(cfg: FinetuneConfig, engine, enc: data.Encoded, epoch: int, pad_id: int, layout) -> float:
    """One pass over the training set; the mean loss of this rank's steps."""
    from tqdm import tqdm

    micro, accum = layout
    order = epoch_order(len(enc.input_ids), epoch, cfg.seed, micro * accum, dist.rank(), dist.world_size())
    bar = tqdm(
        data.batches(enc, order, micro, pad_id),
        total=len(order) // micro,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        disable=not dist.is_rank0(),
    )
    losses = []
    for batch in bar:
        loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return sum(losses) / len(losses)


def fit(cfg: FinetuneConfig, engine, task: kinds.Task, tok, layout) -> dict:
    """Epochs of training, each followed by evaluation, saving and the early-stopping check."""
    predict = partial(predict_logits, engine, batch_size=layout[0], pad_id=tok.pad_token_id)
    best, history, stale = None, [], 0
    for epoch in range(cfg.epochs):
        loss = train_epoch(cfg, engine, task.train, epoch, tok.pad_token_id, layout)
        report = task.evaluate(predict)
        history.append({"epoch": epoch + 1, "train_loss": loss, cfg.metric: report[cfg.metric]})
        log.info(f"epoch {epoch + 1}: train loss {loss:.4f}, eval {cfg.metric} {report[cfg.metric]:.4f}")
        if best is None or report[cfg.metric] > best["report"][cfg.metric]:
            best, stale = {"epoch": epoch + 1, "report": report}, 0
            save_best(cfg, engine, task, predict, tok)
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    return finish(cfg, task, best, history)


def save_best(cfg: FinetuneConfig, engine, task: kinds.Task, predict, tok) -> None:
    """The model (HF directory) and the task's prediction files; every rank calls this (ZeRO-3 gathers)."""
    from pretrain.runtime.engine import full_state_dict

    state = full_state_dict(engine)
    if dist.is_rank0():
        save_hf(engine.module, state, cfg.output, tok)
    task.on_best(predict, Path(cfg.output), write=dist.is_rank0())


def finish(cfg: FinetuneConfig, task: kinds.Task, best: dict, history: list[dict]) -> dict:
    """The run's result (main adds the flags as given and writes it to OUTPUT/eval_report.json), on rank 0."""
    value = best["report"][cfg.metric]
    result = {
        "task": cfg.glue_task or cfg.task,
        "metric": cfg.metric,
        "best_epoch": best["epoch"],
        cfg.metric: value,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "init_from": cfg.init_from,
        "random_init": cfg.random_init,
        "history": history,
        "truncated": task.truncated,
        "report": best["report"],
    }
    if dist.is_rank0():
        log.info(task.describe(best["report"]))
        log.info(f"best eval {cfg.metric} {value:.4f} at epoch {best['epoch']}; model in {cfg.output}")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bert-finetune",
        description="Fine-tune a pretrained BERT or ModernBERT on a classification (CSV/JSONL), tagging (CoNLL BIO), "
        "extractive QA (SQuAD JSON) or GLUE task; write the best model as a Hugging Face directory, "
        "OUTPUT/eval_report.json and the task's predictions.",
    )
    # the metrics are the task kinds' (which sit above the config), so the choices are given here
    add_arguments(p, FinetuneConfig, extra={"metric": {"choices": METRICS}})
    accept_launcher_arguments(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> FinetuneConfig:
    from pretrain.recipe import add_recipe_arguments, parse_with_recipe

    parser = build_parser()
    add_recipe_arguments(parser)
    return parse_with_recipe(FinetuneConfig, parser, argv)


def cli(argv: Sequence[str] | None = None) -> int:
    raise SystemExit(run_cli(main, argv, parse=parse_args, after_success=dist.shutdown))


if __name__ == "__main__":
    cli()
