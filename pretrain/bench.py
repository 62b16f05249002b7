"""bert-bench: time full training steps (forward, backward, AdamW step) of our model, optionally beside HF's.

Either family (`--model tiny`, `--model modernbert-base`, ...); `--compare-hf` times the transformers class of
the same family (BertForPreTraining or ModernBertForMaskedLM, sdpa attention) with the same weights.

Synthetic batches (the same ones, in the same order, for both models):
- Padding: `realistic` draws each sequence's real length as BERT's data generator shapes it: with
  probability 0.1 (BERT's short_seq_prob) uniform in [8, S], otherwise uniform in [S/2, S] (pairs stop at a
  sentence boundary or a document end before the target); the longest is set to S, since batches are padded
  to their longest sequence. The mean fill is about 73% of S. `none` makes every sequence S tokens long.
- Segments: the first half of each sequence is sentence A, the rest B; NSP labels are random.
- Masking: `--mask-prob` (BERT 15%, ModernBERT 30%, as their recipes) of each sequence's real tokens (at
  least one, never [CLS]) become [MASK] and carry a label. ModernBERT ignores the segments and NSP labels.
- 8 distinct batches are cycled, so unpadding sees changing shapes.
`--data PREFIX` times the first 8 micro-batches of a real dataset instead (pretrain.data).

Optimizer: torch.optim.AdamW(fused=True) for both models.
Timing: warm-up steps first, then the timed steps alternate between the models step by step, so load from
other processes hits both alike; the reported step time is the median step. FLOPs count useful work
only (`flops_per_sequence` on each sequence's real length, P = its masked tokens), the same for both
models, so TFLOP/s ratios equal speed ratios. HF computes its MLM logits on every position, as it does
(ModernBERT's `sparse_prediction` stays at its default, off). Our fast paths are resolved once for the device
and precision (`resolve_fast_paths`) and printed with the results.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm import tqdm

from common.errors import UserError, run_cli
from common.files import write_json_atomic
from common.flags import accept_launcher_arguments, add_arguments, option
from common.log import get_logger
from pretrain.bench_batches import data_batches, hf_inputs, synthetic_batch
from pretrain.models import ModelFlags, build_pretraining_model
from pretrain.recipe import FAMILY_RECIPES, add_recipe_arguments, parse_with_recipe
from pretrain.runtime import dist
from pretrain.runtime.ds_config import load_ds_config, resolve_batch
from pretrain.runtime.throughput import batch_flops, device_peak

log = get_logger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHUNK = 1  # timed steps per turn: the models alternate step by step


class Runner:
    """One model, its AdamW optimizer and its step times; `step(batch)` is a full training step."""

    fast_paths: dict[str, str] | None = None  # ours: the resolved fast paths, for the report

    def __init__(self, name: str, model: torch.nn.Module, loss_fn: Callable, precision: str, device: torch.device):
        self.name, self.model, self.loss_fn, self.device = name, model.to(device).train(), loss_fn, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # fused on CPU and CUDA
        self.autocast = precision != "fp32"
        self.dtype = DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.times: list[float] = []
        self.peak_mem = 0

    def step(self, batch: dict) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            loss = self.loss_fn(self.model, batch)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def timed_chunk(self, batches: list[dict], start: int, count: int, record: bool) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(start, start + count):
            t0 = time.perf_counter()
            self.step(batches[i % len(batches)])
            _sync(self.device)
            if record:
                self.times.append(time.perf_counter() - t0)
        if self.device.type == "cuda":
            self.peak_mem = max(self.peak_mem, torch.cuda.max_memory_allocated())


class EngineRunner(Runner):
    """A Runner whose step goes through a DeepSpeed engine: optimizer, precision and ZeRO stage from the JSON."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn: Callable, ds_config: dict, device: torch.device):
        from pretrain.runtime import engine as eng

        self.name, self.loss_fn, self.device = name, loss_fn, device
        self.engine = eng.initialize(model.to(device), copy.deepcopy(ds_config), total_steps=10**9)
        self.model = self.engine
        self.times, self.peak_mem = [], 0

    def step(self, batch: dict) -> None:
        loss = self.loss_fn(self.engine, batch)
        self.engine.backward(loss)
        self.engine.step()


def loader_throughput(prefix: str, seq_len: int, micro_batch: int, seed: int, batches: int = 50) -> float:
    """Samples/s that the training data loader alone sustains on this rank (no model), after one warm-up batch."""
    from pretrain.data import PretrainingData
    from pretrain.data_config import DataConfig

    rank, world = dist.rank(), dist.world_size()
    data = PretrainingData(DataConfig(prefixes=[prefix], seq_len=seq_len, seed=seed, num_workers=0))
    loader = data.loader("train", micro_batch, rank, world)
    next(loader)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * micro_batch / (time.perf_counter() - t0)


def aggregate(result: dict, peak_tflops: float | None) -> dict:
    """Whole-job numbers under the launcher: rates summed over ranks, the slowest step, the largest memory."""
    world = dist.world_size()
    if world == 1:
        return result
    seq, tok, tflops = dist.all_reduce([result["seq_per_s"], result["tokens_per_s"], result["tflops"]])
    step_s, mem = dist.all_reduce([result["step_s"], float(result["peak_mem_bytes"] or 0)], op="max")
    return {
        **result,
        "step_s": step_s,
        "seq_per_s": seq,
        "tokens_per_s": tok,
        "tflops": tflops,
        "mfu": tflops / (peak_tflops * world) if peak_tflops else None,
        "peak_mem_bytes": int(mem) if result["peak_mem_bytes"] is not None else None,
        "world_size": world,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(runners: list[Runner], batches: list[dict], steps: int, warmup: int) -> None:
    """Warm every runner up, then time `steps` steps each in alternating chunks."""
    for r in runners:
        r.timed_chunk(batches, 0, warmup, record=False)
    with tqdm(total=steps * len(runners), desc="timed steps", unit="step", disable=dist.rank() != 0) as bar:
        for start in range(warmup, warmup + steps, CHUNK):
            for r in runners:
                count = min(CHUNK, warmup + steps - start)
                r.timed_chunk(batches, start, count, record=True)
                bar.update(count)


def summarize(r: Runner, config, batches: list[dict], peak_tflops: float | None, options=None) -> dict:
    step_s = statistics.median(r.times)
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    tflops = statistics.mean(batch_flops(config, b, options) for b in batches) / step_s / 1e12
    return {
        "step_s": step_s,
        "seq_per_s": batches[0]["input_ids"].shape[0] / step_s,
        "tokens_per_s": tokens / step_s,
        "tflops": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "peak_mem_bytes": r.peak_mem if r.device.type == "cuda" else None,
    }


def ours_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch["ours"]).loss


def hf_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch["hf"]).loss


def build_runners(config, args: BenchConfig, device: torch.device, ds_config: dict | None = None) -> list[Runner]:
    """Ours (and HF's with --compare-hf) with the same weights; through DeepSpeed engines when `ds_config`.
    Our fast paths are resolved here for the device and precision (`runners[0].fast_paths`)."""

    def runner(name: str, model: torch.nn.Module, loss_fn: Callable) -> Runner:
        if ds_config is not None:
            return EngineRunner(name, model, loss_fn, ds_config, device)
        return Runner(name, model, loss_fn, args.precision, device)

    ours = build_pretraining_model(config, args.kernel_options())
    hf = None
    if args.compare_hf:
        import transformers

        hf = getattr(transformers, ours.HF_CLASS)._from_config(config.to_hf(), attn_implementation="sdpa")
        hf.load_state_dict(ours.state_dict(), strict=True)
    runners = [runner("ours", ours, ours_loss)]  # the engine first: under ZeRO-3 it changes what is possible
    runners[0].fast_paths = ours.resolve_fast_paths(device, DTYPES[args.precision])
    if args.compile:
        runners[0].model.compile()  # the model, or DeepSpeed's engine (engine.compile), in place
    if hf is not None:
        runners.append(runner("hf", hf, hf_loss))
    return runners


@dataclass(kw_only=True)
class BenchConfig(ModelFlags):
    """One benchmark: every field is a flag of `bert-bench` (common.flags)."""

    seq_len: int = 128
    """Padded sequence length S."""
    micro_batch: int = 32
    """Sequences per step."""
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    """Autocast dtype (fp16 needs CUDA)."""
    steps: int = 20
    """Timed steps per model."""
    warmup: int = 3
    """Untimed steps per model first."""
    padding: Literal["realistic", "none"] = "realistic"
    """Synthetic lengths: realistic (BERT's data generator's: 10% short, the rest in [S/2, S], about 73% fill)
    or none (every sequence --seq-len tokens)."""
    mask_prob: float | None = None
    """Share of real tokens masked (default: the model family's recipe, as bert-pretrain: 0.15 for BERT, 0.30
    for ModernBERT)."""
    data: str | None = option(None, metavar="PREFIX")
    """Time on batches of this dataset instead of synthetic ones."""
    compare_hf: bool = False
    """Also time the transformers model of the same family (BertForPreTraining or ModernBertForMaskedLM, sdpa)
    on the same batches."""
    compile: bool = False
    """torch.compile our model (HF's stays eager)."""
    json: str | None = option(None, metavar="OUT")
    """Write the results as JSON to OUT."""
    peak_tflops: float | None = None
    """Device peak TFLOP/s for MFU (default: the GPU table; none on CPU)."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Torch device."""
    seed: int = 0
    """Seed for weights and batches."""
    threads: int | None = None
    """CPU threads for torch (default: all cores, shared by local ranks)."""
    deepspeed_config: str | None = option(
        None, flag="--deepspeed_config", aliases=("--deepspeed-config",), metavar="X.json"
    )
    """Step through DeepSpeed engines built from this JSON (its micro-batch, optimizer, precision and ZeRO stage;
    gradient accumulation is set to 1); under the deepspeed launcher, rates are summed over all ranks."""


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    p = argparse.ArgumentParser(
        prog="bert-bench",
        description="Time full pretraining steps (forward, backward, AdamW) of BERT or ModernBERT on synthetic "
        "MLM(+NSP) batches.",
    )
    add_arguments(p, BenchConfig)
    add_recipe_arguments(p)
    accept_launcher_arguments(p)
    return parse_with_recipe(BenchConfig, p, argv, foreign=pretraining_only())


def pretraining_only() -> frozenset[str]:
    """The keys of a pretraining recipe that bert-bench skips: bert-pretrain's fields it has not, and three that
    mean something else here (`warmup` counts untimed steps, `data` is one PREFIX to time, `deepspeed_config`
    switches to timing DeepSpeed engines); the model, its objective, batch, precision and seed apply."""
    from common.flags import file_keys
    from pretrain.train_config import TrainConfig

    ours = file_keys(BenchConfig())
    return frozenset(k for k in file_keys(TrainConfig()) if k not in ours) | {"warmup", "data", "deepspeed_config"}


def validate(args: BenchConfig, config, device: torch.device) -> None:
    if args.precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    if not 8 <= args.seq_len <= config.max_position_embeddings:
        raise UserError(f"--seq-len must be in [8, {config.max_position_embeddings}] for this --model")
    if args.micro_batch < 1 or args.steps < 1 or args.warmup < 0:
        raise UserError("--micro-batch and --steps must be at least 1 and --warmup at least 0")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config, device = args.model_config(), torch.device(args.device)
    validate(args, config, device)
    ds_config = None
    if args.deepspeed_config:
        ds_config = load_ds_config(args.deepspeed_config)
        dist.init_distributed()
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        args.micro_batch = resolve_batch(ds_config, dist.world_size())[1]
        # a timed step is a full optimizer step: accumulation would hide the optimizer in the median step time
        ds_config.update(gradient_accumulation_steps=1, train_batch_size=args.micro_batch * dist.world_size())
        args.precision = "bf16" if ds_config.get("bf16", {}).get("enabled") else args.precision
        args.precision = "fp16" if ds_config.get("fp16", {}).get("enabled") else args.precision
    if args.threads:  # after init_distributed, whose share of the cores per local rank it overrides
        torch.set_num_threads(args.threads)
    rank, world = dist.rank(), dist.world_size()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    if args.data:
        ours = data_batches(args.data, config, args.micro_batch, args.seq_len, args.seed, args.mask_prob)
    else:  # the family recipe's rate, as bert-pretrain's (pretrain.recipe)
        p = args.mask_prob if args.mask_prob is not None else FAMILY_RECIPES[config.model_type]["mask_prob"]
        ours = [synthetic_batch(config, args.micro_batch, args.seq_len, args.padding, gen, p) for _ in range(8)]
    batches = [{"ours": _to(b, device), "hf": _to(hf_inputs(b, config.model_type), device)} for b in ours]
    runners = build_runners(config, args, device, ds_config)
    run(runners, batches, args.steps, args.warmup)
    peak = device_peak(device, args.precision, args.peak_tflops)
    options = args.kernel_options()
    results = {r.name: aggregate(summarize(r, config, ours, peak, options), peak) for r in runners}
    results["fast_paths"] = runners[0].fast_paths
    if "hf" in results:
        results["speedup_vs_hf"] = results["ours"]["seq_per_s"] / results["hf"]["seq_per_s"]
    if args.data:
        loader = loader_throughput(args.data, args.seq_len, args.micro_batch, args.seed)
        results["loader_samples_per_s"] = dist.all_reduce([loader])[0]
    if rank != 0:
        return 0
    log.info(report(results, args, device) + (f"  ({world} ranks, rates summed)" if world > 1 else ""))
    if args.json:
        record = {"args": dataclasses.asdict(args), "config": dataclasses.asdict(config)}
        record["options"] = dataclasses.asdict(options)  # the kernels, not part of the config
        write_json_atomic(args.json, {**results, **record})
    return 0


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def report(results: dict, args: BenchConfig, device: torch.device) -> str:
    lines = [
        f"bert-bench --model {args.model} seq {args.seq_len} batch {args.micro_batch} {args.precision} on {device}"
        + (" (ours compiled)" if args.compile else "")
    ]
    for name in ("ours", "hf"):
        if name in results:
            r = results[name]
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            mem = f"{r['peak_mem_bytes'] / 2**30:.2f} GiB" if r["peak_mem_bytes"] is not None else "n/a (CPU)"
            lines.append(
                f"  {name:4s} step {1000 * r['step_s']:8.1f} ms  {r['seq_per_s']:8.1f} seq/s  "
                f"{r['tokens_per_s']:9.0f} tok/s  {r['tflops']:7.3f} TFLOP/s  MFU {mfu}  peak mem {mem}"
            )
    if "speedup_vs_hf" in results:
        lines.append(f"  speedup vs HF: {results['speedup_vs_hf']:.2f}x")
    if "fast_paths" in results:
        lines.append("  our fast paths: " + ", ".join(f"{k} {v}" for k, v in results["fast_paths"].items()))
    if "loader_samples_per_s" in results:
        lines.append(f"  data loader alone: {results['loader_samples_per_s']:.0f} samples/s (no model)")
    return "\n".join(lines)


def cli() -> None:
    rc = run_cli(main, after_success=dist.shutdown)
    sys.exit(rc)


if __name__ == "__main__":
    cli()
