"""`bert-embed train`: contrastive fine-tuning of a pretrained encoder into a sentence-embedding model.

    bert-embed train --init-from CKPT_OR_HF_DIR --train pairs.jsonl --output DIR [--grad-cache] [--symmetric]
    deepspeed --num_gpus 8 --module embed.cli train ...   (negatives gathered across the ranks)

Design choices:
- It trains through `pretrain.runtime.engine.initialize` like pretraining and fine-tuning: precision, ZeRO stage,
  optimizer and schedule come from the DeepSpeed JSON (default ds_configs/finetune_cpu.json); --batch and --lr
  override its micro batch and learning rate, and the learning rate defaults as fine-tuning's does
  (`finetune.run.default_lr`). Records go to OUTPUT/metrics.jsonl through `pretrain.metrics.Metrics`.
- The contrastive batch (whose passages are each query's negatives) is one micro-batch per rank, gathered over
  the ranks. With --grad-cache it is the whole accumulation window instead: micro x accumulation steps x ranks,
  run as GradCache chunks of one micro-batch each, so the JSON's `gradient_accumulation_steps` is how many
  times larger than memory allows the batch gets; gradients equal those of the whole batch at once.
- --simcse: unsupervised SimCSE; --train is a text file (one text a line) and each text's positive is itself,
  encoded a second time under a different dropout mask.
- The output directory is a sentence-transformers model (embed.model.save_sentence_transformers), written at
  the end of training by rank 0 (every rank gathers under ZeRO-3); with --dev, each epoch is evaluated on a
  BEIR dev split (a record with "split": "eval" in metrics.jsonl) and --best keeps the best epoch instead.
- Checkpoints and resume are pretraining's (embed.checkpoints, OUTPUT/checkpoints): SIGTERM/SIGINT
  (pretrain.stop) stops every rank after the step in progress, which is saved; a checkpoint also every
  --save-every steps and at the end. Relaunching the same command resumes exactly (same losses, same weights);
  OUTPUT/checkpoints holds the run's lock (pretrain.runlock), so two runs never write one --output.
- The resolved configuration (flags, DeepSpeed JSON, model, tokenizer fingerprint, data fingerprint,
  provenance) is printed at start (--print-recipe: only that), saved with every checkpoint and in
  train_report.json, as pretraining's recipe record; a relaunch that differs refuses in one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch

from common.errors import UserError
from common.files import write_json_atomic
from common.flags import option
from common.log import get_logger
from embed import checkpoints, data, loss
from embed.model import EmbeddingModel, Prefixes, TextEncoder, encode, save_sentence_transformers
from finetune.config import DEFAULT_DS_CONFIG  # fine-tuning's JSON, package data (found in a wheel install)
from pretrain.runtime import dist
from pretrain.stop import StopFlag

log = get_logger(__name__)


@dataclass(kw_only=True)
class EmbedTrainConfig:
    """Contrastive fine-tuning of a pretrained encoder into a sentence-embedding model.

    Pairs from JSON lines ({"query", "positive", "negatives"}) or a BEIR directory (its qrels/train.tsv);
    InfoNCE over in-batch and hard negatives; writes a sentence-transformers model to --output."""

    init_from: str
    """Pretraining --save directory, one checkpoint tag directory, or a Hugging Face BERT/ModernBERT directory."""
    train: str
    """JSON-lines pairs or a BEIR directory (--simcse: a text file, one text a line)."""
    output: str
    """Directory for the sentence-transformers model, metrics.jsonl and train_report.json."""
    epochs: int = 1
    """Passes over the training pairs."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (default: the epochs' worth)."""
    lr: float | None = None
    """Peak learning rate (default: the DeepSpeed JSON's, else 5e-5 x 768 / hidden size)."""
    batch: int | None = None
    """Micro batch of pairs per process (default: the DeepSpeed JSON's)."""
    deepspeed_config: str = option(DEFAULT_DS_CONFIG, flag="--deepspeed_config", aliases=("--deepspeed-config",))
    """DeepSpeed JSON: optimizer, schedule, precision, ZeRO stage, accumulation (the GradCache chunks)."""
    temperature: float = 0.05
    """Softmax temperature of the cosine scores (sentence-transformers' scale 20)."""
    symmetric: bool = False
    """Add the passage->query loss (each positive against the batch's queries) and average the two."""
    pooling: Literal["mean", "cls"] = "mean"
    """Embedding of a text: the mean of its token rows, or its first ([CLS]) token's row."""
    query_prefix: str = ""
    """Text put before every query (e.g. "query: "), saved as the sentence-transformers prompt."""
    passage_prefix: str = ""
    """Text put before every passage (e.g. "passage: ")."""
    query_len: int = 64
    """Longest query in tokens (longer ones are cut)."""
    passage_len: int = 256
    """Longest passage in tokens (longer ones are cut)."""
    negatives: int | None = None
    """Hard negatives used per pair (default: all the file gives)."""
    grad_cache: bool = False
    """One contrastive batch per optimizer step (micro x accumulation x ranks), run in micro-batch chunks."""
    simcse: bool = False
    """Unsupervised SimCSE: each text of --train is its own positive under another dropout mask."""
    dev: str | None = None
    """BEIR directory evaluated after every epoch (nDCG@10, Recall@100, MRR@10 of its qrels/dev.tsv)."""
    best: bool = False
    """Keep the epoch with the best --dev nDCG@10 in --output (default: the last step's model)."""
    random_init: bool = False
    """The architecture of --init-from with random weights (the baseline that shows what pretraining buys)."""
    tokenizer: str | None = None
    """Tokenizer directory (default: the one in --init-from, else its pretraining dataset's)."""
    trust_checkpoint: bool = False
    """Load --init-from without the weights_only check (docs/CHECKPOINTS.md): only for files of known origin."""
    allow_tokenizer_change: bool = False
    """Accept a --tokenizer whose fingerprint differs from the one --init-from was pretrained with."""
    seed: int = 42
    """Seed of the data order and dropout."""
    log_every: int = 10
    """Steps between console lines (every step goes to metrics.jsonl)."""
    save_every: int = 0
    """Steps between checkpoints in OUTPUT/checkpoints (0: only when a signal stops the run, and at the end)."""
    keep_last: int = 1
    """Checkpoints kept in OUTPUT/checkpoints (the newest good ones; 0: all)."""
    print_recipe: bool = False
    """Print the resolved configuration (flags, DeepSpeed JSON, model, tokenizer, data, provenance) and exit."""

    def validate(self) -> None:
        if self.temperature <= 0:
            raise UserError("--temperature must be positive")
        if min(self.epochs, self.query_len, self.passage_len, self.batch or 1, self.log_every) < 1:
            raise UserError("--epochs, --query-len, --passage-len, --batch and --log-every must be at least 1")
        if min(self.save_every, self.keep_last) < 0:
            raise UserError("--save-every and --keep-last must be 0 or more")
        if self.negatives is not None and self.negatives < 0:
            raise UserError("--negatives must be 0 or more")
        if self.best and not self.dev:
            raise UserError("--best keeps the best epoch on a dev set; pass --dev BEIR_DIR")


def read_training(cfg: EmbedTrainConfig) -> list[data.Pair]:
    if not cfg.simcse:
        pairs = data.training_pairs(cfg.train)
        return [dataclasses.replace(p, negatives=p.negatives[: cfg.negatives]) for p in pairs]
    if not Path(cfg.train).is_file():
        raise UserError(f"--simcse --train {cfg.train} is not a text file")
    texts = [line.strip() for line in Path(cfg.train).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise UserError(f"{cfg.train} holds no text")
    return [data.Pair(t, t) for t in texts]


class Contrastive:
    """What a step needs: the engine, the text encoder and the loss settings; `forward` and `loss` of chunks."""

    def __init__(self, cfg: EmbedTrainConfig, engine, texts: TextEncoder):
        self.cfg, self.engine, self.texts = cfg, engine, texts
        self.query_kind = "passage" if cfg.simcse else "query"

    def forward(self, pairs: list[data.Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries (b, H), passages (b + K*b, H): positives, then negative k of every pair, for k = 0..K-1)."""
        device = self.engine.device
        q = self.engine(**{k: v.to(device) for k, v in self.texts([p.query for p in pairs], self.query_kind).items()})
        texts = [p.positive for p in pairs] + [p.negatives[k] for k in range(len(pairs[0].negatives)) for p in pairs]
        passages = self.engine(**{k: v.to(device) for k, v in self.texts(texts, "passage").items()})
        return q, passages

    def loss(self, pairs: list[data.Pair], chunks: list[list[data.Pair]], embeddings: list[tuple]) -> torch.Tensor:
        """The loss of the whole global batch: this rank's `pairs` (in `chunks`) and every other rank's."""
        device = embeddings[0][0].device
        queries = torch.cat([q for q, _ in embeddings])
        positives = torch.cat([p[: len(c)] for c, (_, p) in zip(chunks, embeddings)])
        negatives = torch.cat([p[len(c) :] for c, (_, p) in zip(chunks, embeddings)])
        negative_texts = [n for c in chunks for k in range(len(c[0].negatives)) for n in (p.negatives[k] for p in c)]
        keys = [loss.text_keys(t).to(device) for t in ([p.query for p in pairs], [p.positive for p in pairs])]
        negative_keys = loss.text_keys(negative_texts).to(device)
        gather = dist.all_gather_with_local_grad
        query_keys, positive_keys = gather(keys[0]), gather(keys[1])
        passages = torch.cat([gather(positives), gather(negatives)])
        mask = loss.false_negative_mask(query_keys, torch.cat([positive_keys, gather(negative_keys)]))
        return loss.info_nce(gather(queries), passages, self.cfg.temperature, self.cfg.symmetric, mask)

    def step(self, pairs: list[data.Pair], micro: int) -> torch.Tensor:
        """One optimizer step over `pairs` (micro x accumulation of this rank); returns the mean loss."""
        chunks = [pairs[i : i + micro] for i in range(0, len(pairs), micro)]
        world = dist.world_size()  # the engine averages gradients over ranks: undo it for the global loss
        if self.cfg.grad_cache:
            accum = self.engine.gradient_accumulation_steps()

            def backward(surrogate: torch.Tensor) -> None:
                self.engine.backward(surrogate * accum)  # the engine divides by the accumulation steps
                self.norm = pretrain_step(self.engine)

            return loss.grad_cache(self.forward, chunks, lambda e: self.loss(pairs, chunks, e), backward, world)
        losses = []
        for chunk in chunks:
            value = self.loss(chunk, [chunk], [self.forward(chunk)])
            self.engine.backward(value * world)
            self.norm = pretrain_step(self.engine)
            losses.append(value.detach())
        return torch.stack(losses).mean()


def pretrain_step(engine) -> float | None:
    from pretrain.runtime.engine import step

    return step(engine)


def main(cfg: EmbedTrainConfig) -> dict:
    """Train (or resume from OUTPUT/checkpoints), write the sentence-transformers model to cfg.output, and return
    the run's report."""
    from data_prep.tokenizer import load as load_tokenizer
    from finetune.run import ds_config, load_pretrained
    from pretrain import runlock
    from pretrain.runtime.dist import init_distributed

    cfg.validate()
    pairs = read_training(cfg)  # bad input stops before the model loads
    dev = data.read_beir(cfg.dev, "dev") if cfg.dev else None
    source = SimpleNamespace(
        init_from=cfg.init_from,
        seq_len=max(cfg.query_len, cfg.passage_len),
        tokenizer=cfg.tokenizer,
        trust_checkpoint=cfg.trust_checkpoint,
        allow_tokenizer_change=cfg.allow_tokenizer_change,
    )
    config, weights, tok_dir = load_pretrained(source)  # finetune.run's: verified, safely loaded, identity-checked
    tok = load_tokenizer(tok_dir)
    if config.model_type == "modernbert":  # it reads no segment ids
        tok.model_input_names = [n for n in tok.model_input_names if n != "token_type_ids"]
    if len(tok) > config.vocab_size:
        raise UserError(f"tokenizer {tok_dir} has {len(tok)} tokens, the model {config.vocab_size}; pass --tokenizer")
    ds, lr = ds_config(cfg, config.hidden_size)
    cfg = dataclasses.replace(cfg, lr=lr)
    init_distributed()
    resolved = checkpoints.resolved_config(cfg, config, ds, tok_dir, pairs)
    if cfg.print_recipe:
        print(json.dumps(resolved, indent=2))
        return {"steps": 0, "config": resolved}
    log.info("resolved configuration:\n" + json.dumps(resolved, indent=2))
    found = checkpoints.starting_point(cfg.output, resolved)  # a relaunch of another run refuses here
    stop = StopFlag()
    stop.install()
    try:
        with runlock.hold(str(checkpoints.directory(cfg.output))):  # one writer per --output
            run = _Run(cfg, resolved, (config, weights, tok, ds), pairs, found)
            try:
                return run.train(stop, dev)
            finally:
                run.metrics.close()
    finally:
        stop.uninstall()


class _Run:
    """One launch of a run: the engine, where the run stands (`state`, a pretraining TrainState), its metrics."""

    def __init__(self, cfg: EmbedTrainConfig, resolved: dict, model_parts: tuple, pairs: list, found):
        from pretrain.metrics import Metrics
        from pretrain.runtime.checkpoint import Retention, TrainState
        from pretrain.runtime.ds_config import resolve_batch
        from pretrain.runtime.engine import initialize
        from pretrain.runtime.integrity import LossWatch

        config, weights, tok, ds = model_parts
        self.cfg, self.pairs, self.tok = cfg, pairs, tok
        _, self.micro, accum = resolve_batch(ds, dist.world_size())
        self.per_step = self.micro * accum
        self.steps_per_epoch = math.ceil(len(pairs) / (self.per_step * dist.world_size()))
        self.total = min(cfg.epochs * self.steps_per_epoch, cfg.max_steps or math.inf)
        torch.manual_seed(cfg.seed)
        model = EmbeddingModel(config, cfg.pooling)
        if not cfg.random_init and found is None:  # a resume loads the checkpoint's weights instead
            model.load_pretrained(weights)
        self.engine = initialize(model, ds, total_steps=self.total)
        self.prefixes = Prefixes(cfg.query_prefix, cfg.passage_prefix)
        self.run = Contrastive(cfg, self.engine, TextEncoder(tok, self.prefixes, cfg.query_len, cfg.passage_len))
        self.state = TrainState(world_size=dist.world_size(), config=resolved)
        if found is not None:
            saved = checkpoints.load(self.engine, cfg.output, cfg.trust_checkpoint)
            self.state = dataclasses.replace(saved, world_size=dist.world_size(), config=resolved)
            if saved.config.get("progress"):
                resolved["progress"] = saved.config["progress"]
        self.progress = checkpoints.progress(self.state)
        self.keep = Retention(keep_last=cfg.keep_last)
        self.watch = LossWatch()  # marks a checkpoint saved at a non-finite or spiking loss, as pretraining's
        self.metrics = Metrics(cfg.output, self.state.step, resolved, tensorboard=False, wandb_project=None)
        self.start = time.monotonic() - self.state.elapsed_s

    def save_checkpoint(self) -> None:
        self.state.elapsed_s = time.monotonic() - self.start
        checkpoints.save(self.engine, self.cfg.output, self.state, self.keep, self.watch)

    def train(self, stop: StopFlag, dev: data.Beir | None) -> dict:
        cfg, state, progress = self.cfg, self.state, self.progress
        if progress["done"] and state.step >= self.total:
            log.info(f"{cfg.output} is complete at step {state.step}; raise --epochs or --max-steps to train on")
            return checkpoints.finished_report(cfg.output) or {"steps": state.step}
        progress["done"] = False
        save = partial(save_model, cfg, self.engine, self.tok, self.prefixes)
        evaluated = progress["dev"][-1] if progress["dev"] else {}
        if evaluated.get("step") == state.step:  # a finished run resumed: its last evaluation, cut from metrics.jsonl
            self.metrics.write(
                {"step": state.step, "split": "eval", **{k: v for k, v in evaluated.items() if k != "epoch"}}
            )
        # a checkpoint at an epoch's last step precedes that epoch's --dev evaluation: resume there evaluates it
        for epoch in range(max(state.step - 1, 0) // self.steps_per_epoch, cfg.epochs):
            if state.step >= self.total and epoch * self.steps_per_epoch >= state.step:
                break
            if self.train_epoch(epoch, stop):
                self.save_checkpoint()
                log.info(f"stopping at step {state.step} (signal); relaunch the same command to resume")
                return {"steps": state.step, "stopped_by": "signal"}
            if dev is not None and evaluated.get("step") != state.step:
                self.evaluate(dev, epoch, save)
        if not cfg.best:
            save(state.step)
        progress["done"] = True
        self.save_checkpoint()  # the finished run: a relaunch with more --epochs or --max-steps continues it
        report = {"steps": state.step, "final_loss": self.watch.last, "pairs": len(self.pairs),
                  "dev": progress["dev"], "best": progress["best"], "config": state.config}  # fmt: skip
        if dist.is_rank0():
            write_json_atomic(Path(cfg.output, "train_report.json"), report)
            log.info(f"sentence-transformers model in {cfg.output}")
        return report

    def evaluate(self, dev: data.Beir, epoch: int, save) -> None:
        """The --dev scores after `epoch`, recorded; with --best, the model written when they are the best."""
        cfg, step, progress = self.cfg, self.state.step, self.progress
        found = evaluate_dev(self.engine, dev, TextEncoder(self.tok, self.prefixes, cfg.passage_len, cfg.passage_len))
        self.metrics.write({"step": step, "split": "eval", **found})
        progress["dev"].append({"epoch": epoch + 1, "step": step, **found})
        log.info(f"epoch {epoch + 1}: dev nDCG@10 {found['ndcg_at_10']:.4f}")
        if cfg.best and (progress["best"] is None or found["ndcg_at_10"] > progress["best"]["ndcg_at_10"]):
            progress["best"] = progress["dev"][-1]
            save(step)

    def train_epoch(self, epoch: int, stop: StopFlag) -> bool:
        """The rest of one pass over the pairs (or up to the last step); every step a record in metrics.jsonl and
        a checkpoint every --save-every steps. True when a signal stopped it (at a step boundary)."""
        from finetune.run import epoch_order

        cfg, state, world = self.cfg, self.state, dist.world_size()
        order = epoch_order(len(self.pairs), epoch, cfg.seed, self.per_step, dist.rank(), world)
        first = max(state.step - epoch * self.steps_per_epoch, 0) * self.per_step
        for i in range(first, len(order), self.per_step):
            if state.step >= self.total:
                return False
            value = self.run.step([self.pairs[j] for j in order[i : i + self.per_step]], self.micro)
            value, signalled = dist.all_reduce([float(value), float(stop.signal is not None)])
            state.step += 1
            state.consumed_samples += self.per_step * world
            record = {"step": state.step, "epoch": epoch + 1, "loss": value / world, "lr": self.engine.get_lr()[0],
                      "grad_norm": self.run.norm, "samples": state.consumed_samples,
                      "seconds": time.monotonic() - self.start}  # fmt: skip
            self.metrics.write(record)
            self.watch.add(record["loss"])
            if state.step % cfg.log_every == 0 or state.step == self.total:
                log.info(f"step {state.step}/{self.total}: loss {record['loss']:.4f}")
            if stop.note(signalled):
                return True
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < self.total:
                self.save_checkpoint()
        return False


def evaluate_dev(engine, dev: data.Beir, texts: TextEncoder) -> dict[str, float]:
    """nDCG@10, Recall@100, MRR@10 of the model now on the dev set (every rank computes it; no gather needed)."""
    from embed.evaluate import DEPTH, dense_run, measure

    qids, dids = list(dev.queries), list(dev.corpus)
    queries = encode(engine, [dev.queries[q] for q in qids], texts, "query")
    corpus = encode(engine, [dev.corpus[d] for d in dids], texts, "passage")
    return measure(dev.qrels, dense_run(queries, corpus, qids, dids, DEPTH))


def save_model(cfg: EmbedTrainConfig, engine, tok, prefixes: Prefixes, step: int) -> None:
    """The sentence-transformers directory of the model now; every rank calls it (ZeRO-3 gathers)."""
    from pretrain.runtime.engine import full_state_dict

    weights = full_state_dict(engine)
    if dist.is_rank0():
        extra = {"init_from": cfg.init_from, "random_init": cfg.random_init, "steps": step}
        save_sentence_transformers(engine.module, weights, cfg.output, tok, prefixes, cfg.passage_len, extra)
