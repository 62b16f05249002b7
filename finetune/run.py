"""`bert-finetune`: fine-tune a pretrained checkpoint on a classification or tagging task and report how it does.

    bert-finetune --task classify --train train.csv --eval dev.csv --init-from CKPT_OR_HF_DIR --output DIR
    deepspeed --num_gpus 2 --module finetune.run --task tag --train train.conll --eval dev.conll ...

Design choices:
- The model trains through `pretrain.engine.initialize`, so precision, ZeRO stage, optimizer and schedule
  come from the DeepSpeed JSON (default ds_configs/finetune_cpu.json); `--batch` and `--lr` are the two
  settings a fine-tuning sweep changes, so they override the JSON's micro batch and learning rate.
- Every rank evaluates the whole (small) eval set, so ZeRO-3 ranks stay in step and no gather is needed;
  rank 0 writes.
- After each epoch the eval metric decides: a better model is written to --output at once (an HF directory
  with the tokenizer), and `--patience` epochs without improvement stop the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.errors import UserError, run_cli
from finetune import data, metrics
from finetune.model import TASKS, BertClassifier, save_hf

DEFAULT_DS_CONFIG = str(Path(__file__).resolve().parent.parent / "ds_configs" / "finetune_cpu.json")
METRICS = {"classify": ("accuracy", "macro_f1"), "tag": ("f1",)}
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


@dataclass
class FinetuneConfig:
    """One fine-tuning run; field names are the command-line flags."""

    task: str
    """classify (one label per text or text pair) or tag (BIO tag per word)."""
    train: str
    """Training file: CSV/TSV/JSONL for classify, CoNLL for tag."""
    eval: str
    """Evaluation file, same format; it decides early stopping and the report."""
    init_from: str
    """Pretraining --save directory, one checkpoint tag directory, or a Hugging Face BERT directory."""
    output: str
    """Directory for the best model (HF format, with tokenizer) and eval_report.json."""
    epochs: int = 3
    """Maximum passes over the training file."""
    lr: float | None = None
    """Peak learning rate (default: the one in the DeepSpeed JSON)."""
    batch: int | None = None
    """Micro batch per process (default: the one in the DeepSpeed JSON)."""
    seq_len: int = 128
    """Longest input in tokens; longer ones are truncated and counted (or rejected with --strict)."""
    deepspeed_config: str = DEFAULT_DS_CONFIG
    """DeepSpeed JSON: optimizer, schedule, precision, ZeRO stage."""
    tokenizer: str | None = None
    """Tokenizer directory (default: the one in --init-from, else the pretraining dataset's)."""
    text_column: str = "text"
    """classify: column holding the text."""
    pair_column: str | None = None
    """classify: column holding the second text of a sentence pair."""
    label_column: str = "label"
    """classify: column holding the label."""
    metric: str | None = None
    """Eval metric for early stopping and model selection: accuracy or macro_f1 (classify), f1 (tag)."""
    patience: int = 2
    """Stop after this many epochs without a better eval metric."""
    strict: bool = False
    """Reject sequences longer than --seq-len instead of truncating them."""
    random_init: bool = False
    """Use the architecture of --init-from with random weights (the baseline that shows what pretraining buys)."""
    seed: int = 42
    """Seed for the classifier initialization, dropout and data order."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise UserError(f"--task must be one of {', '.join(TASKS)}, not {self.task!r}")
        self.metric = self.metric or METRICS[self.task][0]
        if self.metric not in METRICS[self.task]:
            raise UserError(f"--metric {self.metric} does not apply to --task {self.task}; use {METRICS[self.task]}")
        if self.epochs < 1 or self.patience < 1 or self.seq_len < 4 or (self.batch is not None and self.batch < 1):
            raise UserError("--epochs, --patience and --batch must be at least 1 and --seq-len at least 4")


def load_pretrained(cfg: FinetuneConfig):
    """(BertConfig, BertForPreTraining state dict, tokenizer directory) of --init-from."""
    from pretrain.checkpoint import load_weights

    config, state = load_weights(cfg.init_from)
    if cfg.seq_len > config.max_position_embeddings:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's {config.max_position_embeddings} positions")
    if cfg.tokenizer:
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


def read_task(cfg: FinetuneConfig):
    """(train examples, eval examples, labels); eval labels must all occur in training."""
    if cfg.task == "classify":
        cols = (cfg.text_column, cfg.label_column, cfg.pair_column)
        train = data.read_classify(cfg.train, *cols, what="--train")
        evals = data.read_classify(cfg.eval, *cols, what="--eval")
    else:
        train, evals = data.read_conll(cfg.train, "--train"), data.read_conll(cfg.eval, "--eval")
    labels = data.discover_labels(train)
    if len(labels) < 2:
        raise UserError(f"--train file {cfg.train} has only the label {labels}; a classifier needs at least two")
    data.check_labels(evals, labels, cfg.eval)
    return train, evals, labels


def encode(cfg: FinetuneConfig, tok, examples, labels: list[str], path: str) -> data.Encoded:
    fn = data.encode_classify if cfg.task == "classify" else data.encode_tag
    return fn(tok, examples, labels, cfg.seq_len, cfg.strict, path)


def ds_config(cfg: FinetuneConfig) -> dict:
    """The DeepSpeed JSON with --batch and --lr applied."""
    from pretrain.engine import load_ds_config

    ds = load_ds_config(cfg.deepspeed_config)
    if cfg.batch is not None:
        ds["train_micro_batch_size_per_gpu"] = cfg.batch
        ds.pop("train_batch_size", None)
    if cfg.lr is not None:
        ds.setdefault("optimizer", {}).setdefault("params", {})["lr"] = cfg.lr
    return ds


def epoch_order(n: int, epoch: int, seed: int, chunk: int, rank: int, world: int) -> list[int]:
    """This rank's share of a seeded shuffle, wrapped to a multiple of `chunk` * world so ranks step together."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    total = math.ceil(n / (chunk * world)) * chunk * world
    order = (order * math.ceil(total / n))[:total]
    return order[rank::world]


@torch.no_grad()
def predict(engine, enc: data.Encoded, batch_size: int, pad_id: int) -> list:
    """Arg-max label ids: one per example (classify) or per kept word (tag)."""
    engine.eval()
    preds = []
    for batch in data.batches(enc, list(range(len(enc.input_ids))), batch_size, pad_id):
        batch.pop("labels")
        logits = engine(**{k: v.to(engine.device) for k, v in batch.items()}).logits.argmax(-1).cpu()
        preds.extend(logits.tolist())
    engine.train()
    if not enc.word_index:
        return preds
    return [[row[pos] for pos in firsts] for row, firsts in zip(preds, enc.word_index)]


def evaluate(task: str, examples, preds: list, labels: list[str]) -> dict:
    if task == "classify":
        return metrics.classification_report([ex.label for ex in examples], [labels[p] for p in preds])
    pad = [[data.OUTSIDE] * (len(ex.tags) - len(row)) for ex, row in zip(examples, preds)]  # words cut off
    predicted = [[labels[p] for p in row] + rest for row, rest in zip(preds, pad)]
    return metrics.entity_report([ex.tags for ex in examples], predicted)


def consolidated_state(engine) -> dict | None:
    """The full state dict (every rank must call this under ZeRO-3; only rank 0 gets it there)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def main(cfg: FinetuneConfig) -> dict:
    """Fine-tune, keep the best model in cfg.output, and return the eval report of that model."""
    from data_prep.tokenizer import load as load_tokenizer
    from pretrain.engine import init_distributed, initialize, resolve_batch

    train_ex, eval_ex, labels = read_task(cfg)
    config, state, tok_dir = load_pretrained(cfg)
    tok = load_tokenizer(tok_dir)
    if len(tok) > config.vocab_size:
        raise UserError(f"tokenizer {tok_dir} has {len(tok)} tokens, the model {config.vocab_size}; pass --tokenizer")
    train_enc = encode(cfg, tok, train_ex, labels, cfg.train)
    eval_enc = encode(cfg, tok, eval_ex, labels, cfg.eval)

    ds = ds_config(cfg)
    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    _, micro, accum = resolve_batch(ds, world)
    steps_per_epoch = math.ceil(len(train_ex) / (micro * accum * world))
    torch.manual_seed(cfg.seed)
    model = BertClassifier(config, labels, cfg.task)
    if not cfg.random_init:
        model.load_encoder(state)
    engine = initialize(model, ds, total_steps=cfg.epochs * steps_per_epoch)
    log = print if rank == 0 else (lambda *a, **k: None)
    log(json.dumps({"finetune": dataclasses.asdict(cfg), "labels": labels, "deepspeed": ds}, indent=2))
    log(f"truncated to --seq-len {cfg.seq_len}: {train_enc.truncated} train, {eval_enc.truncated} eval examples")
    return fit(cfg, engine, (train_enc, eval_enc, eval_ex), labels, tok, (rank, world, micro, accum))


def fit(cfg: FinetuneConfig, engine, task_data, labels, tok, layout) -> dict:
    """Epochs of training, each followed by evaluation, saving and the early-stopping check."""
    from tqdm import tqdm

    (train_enc, eval_enc, eval_ex), (rank, world, micro, accum) = task_data, layout
    best, history, stale = None, [], 0
    for epoch in range(cfg.epochs):
        order = epoch_order(len(train_enc.input_ids), epoch, cfg.seed, micro * accum, rank, world)
        bar = tqdm(
            data.batches(train_enc, order, micro, tok.pad_token_id),
            total=len(order) // micro,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=rank != 0,
        )
        losses = []
        for batch in bar:
            loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        report = evaluate(cfg.task, eval_ex, predict(engine, eval_enc, micro, tok.pad_token_id), labels)
        history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), cfg.metric: report[cfg.metric]})
        if rank == 0:
            print(
                f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}, eval {cfg.metric} "
                f"{report[cfg.metric]:.4f}"
            )
        if best is None or report[cfg.metric] > best["report"][cfg.metric]:
            best, stale = {"epoch": epoch + 1, "report": report}, 0
            state = consolidated_state(engine)
            if rank == 0:
                save_hf(engine.module, state, cfg.output, tok)
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    result = {
        "task": cfg.task,
        "metric": cfg.metric,
        "best_epoch": best["epoch"],
        cfg.metric: best["report"][cfg.metric],
        "init_from": cfg.init_from,
        "random_init": cfg.random_init,
        "history": history,
        "truncated": {"train": train_enc.truncated, "eval": eval_enc.truncated},
        "report": best["report"],
    }
    if rank == 0:
        Path(cfg.output, "eval_report.json").write_text(json.dumps(result, indent=2))
        print(metrics.format_report(best["report"]))
        print(f"best eval {cfg.metric} {result[cfg.metric]:.4f} at epoch {best['epoch']}; model in {cfg.output}")
    return result


def parse_args(argv: Sequence[str] | None = None) -> FinetuneConfig:
    p = argparse.ArgumentParser(
        prog="bert-finetune",
        description="Fine-tune a pretrained BERT on a classification (CSV/JSONL) or tagging (CoNLL BIO) task; "
        "write the best model as a Hugging Face directory and DIR/eval_report.json.",
    )
    defaults = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    doc = _field_docs()
    for name, f in defaults.items():
        flags = ["--" + name.replace("_", "-")] + (["--deepspeed_config"] if name == "deepspeed_config" else [])
        required = f.default is dataclasses.MISSING
        if f.type == "bool":
            p.add_argument(*flags, action="store_true", help=doc[name])
            continue
        kind = {"int": int, "float | None": float, "int | None": int}.get(f.type, str)
        choices = {"task": list(TASKS), "metric": sorted({m for v in METRICS.values() for m in v})}
        extra = {"choices": choices[name]} if name in choices else {}
        default = None if required else f.default
        shown = doc[name] if default is None else f"{doc[name]} (default: {default})"
        p.add_argument(*flags, type=kind, required=required, default=default, help=shown, **extra)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = vars(p.parse_args(argv))
    args.pop("local_rank")
    return FinetuneConfig(**args)


def _field_docs() -> dict[str, str]:
    """Each field's docstring, read from the source, so --help and the dataclass say the same thing."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(FinetuneConfig)).body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = b.value.value
    return docs


def _main(argv: Sequence[str] | None = None) -> int:
    main(parse_args(argv))
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    rc = run_cli(_main, argv)
    if rc == 0:
        from pretrain.engine import shutdown

        shutdown()
    raise SystemExit(rc)


if __name__ == "__main__":
    cli()
