"""Time to equal held-out loss: our training step against a plain Hugging Face loop, one after the other.

    python scripts/bench_hf_loop.py --data runs/demo/data/corpus --model tiny --steps 300 --eval-every 25

Both runs train the same model (our preset with the dataset's vocabulary and, by default, no dropout, as the
demo's BERT recipe: with dropout the two loops draw different masks and their curves part by chance;
transformers' BertForPreTraining, sdpa attention, loaded with our initial weights) on the same micro-batches in
the same order (pretrain.data: NSP pairs, 15% masking, built before either run so loading costs neither), with
the same objective (MLM + NSP)
and the same optimizer settings (the DeepSpeed JSON's AdamW, its weight decay on matrices only, warmup and
linear decay, gradient clipping):
- ours: `pretrain.runtime.engine.initialize` (DeepSpeed engine, the JSON's optimizer and schedule) on our model with its
  fast paths, as `bert-pretrain` steps it;
- HF: `transformers.BertForPreTraining` with `torch.optim.AdamW`, a `LambdaLR` of the same shape and
  `clip_grad_norm_`: the loop a user writes from the transformers documentation.
The two runs take turns, `--eval-every` steps each (as bert-bench alternates its timed steps), so a change in
the machine's load hits both alike; at the end of each turn both compute the held-out MLM loss on the same
batches with the same function (not timed). The target is the higher of the two final losses (or
`--target-loss`); each run's time to it is its training wall time (evaluation excluded) at its first evaluation
at or below it. The first steps of each include their one-time costs (kernel selection, allocator warm-up).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.bench_batches import hf_inputs  # noqa: E402
from pretrain.data import PretrainingData, eval_batches  # noqa: E402
from pretrain.data_config import DataConfig  # noqa: E402
from pretrain.models import build_pretraining_model, load_config  # noqa: E402
from pretrain.runtime import dist  # noqa: E402
from pretrain.runtime import engine as eng  # noqa: E402
from pretrain.runtime.ds_config import compute_dtype, load_ds_config  # noqa: E402


def mlm_loss(logits: torch.Tensor, batch: dict) -> float:
    """Summed cross-entropy over the masked positions; `logits` are (P, V) at `masked_positions`."""
    return torch.nn.functional.cross_entropy(logits.float(), batch["mlm_labels"], reduction="sum").item()


@torch.no_grad()
def held_out_loss(model, evals: list[dict], hf: bool) -> float:
    module = getattr(model, "module", model)
    module.eval()
    total = count = 0.0
    for batch in evals:
        if hf:
            logits = model(**hf_inputs(batch)).prediction_logits  # (B, S, V): every position
            logits = logits.reshape(-1, logits.shape[-1])[batch["masked_positions"]]
        else:
            logits = model(**batch).mlm_logits  # (P, V): our head runs on masked positions only
        total += mlm_loss(logits, batch)
        count += batch["mlm_labels"].numel()
    module.train()
    return total / count


def schedule(params: dict, steps: int):
    """The JSON's WarmupPolyDecay as a LambdaLR factor (pretrain.runtime.schedules.WarmupPolyDecay, steps as
    progress)."""
    warmup, power = params.get("warmup_proportion", 0.01), params.get("power", 1.0)

    def factor(step: int) -> float:
        p = min(step / steps, 1.0)
        return p / warmup if p < warmup else ((1.0 - p) / (1.0 - warmup)) ** power

    return factor


class Run:
    """One side of the race: a step function, the model to evaluate, its training seconds and its curve."""

    def __init__(self, name: str, step_fn, model, hf: bool):
        self.name, self.step_fn, self.model, self.hf = name, step_fn, model, hf
        self.seconds, self.curve = 0.0, []

    def evaluate(self, step: int, evals: list[dict]) -> None:
        self.curve.append({"step": step, "seconds": self.seconds, "loss": held_out_loss(self.model, evals, self.hf)})
        print(
            f"{self.name:>4} step {step:>5} {self.seconds:8.1f} s  held-out MLM loss {self.curve[-1]['loss']:.4f}",
            flush=True,
        )

    def train(self, batches: list[dict]) -> None:
        for batch in batches:
            t0 = time.perf_counter()
            self.step_fn(batch)
            self.seconds += time.perf_counter() - t0


def race(runs: list[Run], batches: list[dict], evals: list[dict], every: int) -> None:
    """The runs take turns, `every` steps each, each evaluated after its turn."""
    for run in runs:
        run.evaluate(0, evals)
    for start in range(0, len(batches), every):
        for run in runs:
            run.train(batches[start : start + every])
            run.evaluate(min(start + every, len(batches)), evals)


def ours_run(model, ds: dict, steps: int) -> Run:
    engine = eng.initialize(model, ds, total_steps=steps)
    model.resolve_fast_paths(engine.device, compute_dtype(ds))

    def step(batch):
        engine.backward(engine(**batch).loss)
        engine.step()

    return Run("ours", step, engine, hf=False)


def hf_run(model, ds: dict, steps: int) -> Run:
    opt_params = dict(ds["optimizer"]["params"])
    groups = eng.param_groups(model, opt_params.get("weight_decay", 0.0))
    optimizer = torch.optim.AdamW(groups, lr=opt_params["lr"], betas=tuple(opt_params["betas"]), eps=opt_params["eps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(ds["scheduler"]["params"], steps))
    clip = ds.get("gradient_clipping", 0.0)

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        model(**hf_inputs(batch)).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()

    return Run("hf", step, model, hf=True)


def time_to(curve: list[dict], target: float) -> float:
    return next((p["seconds"] for p in curve if p["loss"] <= target), math.inf)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, metavar="PREFIX", help="a bert-prep build dataset")
    p.add_argument("--model", default="tiny", help="model preset (its shape; the vocabulary is the data's)")
    p.add_argument(
        "--model-set",
        nargs="*",
        default=["hidden_dropout=0", "attention_dropout=0"],
        metavar="KEY=VALUE",
        help="model fields changed from the preset (default: no dropout, as the demo's BERT recipe; with dropout the "
        "two loops draw different masks, so their curves part by chance)",
    )
    p.add_argument("--deepspeed-config", default=str(ROOT / "ds_configs" / "demo.json"), metavar="X.json")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-samples", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--target-loss", type=float, default=None, help="default: the higher of the two final losses")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: all cores)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", default=None, metavar="OUT", help="write both curves and the result here")
    args = p.parse_args()

    ds = load_ds_config(args.deepspeed_config)
    ds.update(gradient_accumulation_steps=1)
    micro = ds["train_micro_batch_size_per_gpu"]
    ds["train_batch_size"] = micro
    data = PretrainingData(DataConfig([args.data], seq_len=args.seq_len, seed=args.seed, num_workers=0))
    ids = data.special_tokens
    config = load_config(args.model, [f"vocab_size={data.vocab_size}", f"pad_token_id={ids['pad']}", *args.model_set])
    batches = [data.batch("train", i * micro, micro) for i in range(args.steps)]
    evals = eval_batches(data, micro, 0, 1, args.eval_samples)
    dist.init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    ours = build_pretraining_model(config)
    import transformers

    hf = transformers.BertForPreTraining._from_config(config.to_hf(), attn_implementation="sdpa")
    hf.load_state_dict(ours.state_dict(), strict=True)  # the same initial weights
    print(
        f"{args.steps} steps of {micro} x {args.seq_len}, {torch.get_num_threads()} threads, turns of {args.eval_every}"
    )
    runs = [ours_run(ours, ds, args.steps), hf_run(hf.train(), ds, args.steps)]
    race(runs, batches, evals, args.eval_every)
    curves = {run.name: run.curve for run in runs}
    target = args.target_loss or max(c[-1]["loss"] for c in curves.values())
    times = {k: time_to(c, target) for k, c in curves.items()}
    print(
        f"time to held-out MLM loss {target:.4f}: ours {times['ours']:.1f} s, HF loop {times['hf']:.1f} s, "
        f"ours {times['hf'] / times['ours']:.2f}x faster"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"target": target, "times": times, "curves": curves, **vars(args)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
