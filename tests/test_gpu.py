"""The GPU half of the suite: fused paths in bf16 and fp16, DeepSpeed's fused LAMB against ours, fp16 with
dynamic loss scaling, ZeRO-1/2 checkpoint and resume on one GPU.

Every test but the first runs only where CUDA is (marked `gpu`); `scripts/gpu_check.sh` runs them, on a user's
GPU box as on ours. Set BERT_GPU_DATA=PREFIX (a `bert-prep build` output of real text; the script makes one)
for the fp16 training runs; without it they train on the small grammar corpus of the CPU tests.

Low-precision comparisons measure their tolerance instead of guessing it: the fast path and the plain path
both run under bf16/fp16 autocast and are each compared with the plain path in float64; the fast path passes
when its error is at most a few times the plain path's own rounding error plus a couple of units of the format.
A real bug (attending to padding, a wrong row gathered) gives errors of order one and fails.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_train import ROOT, ds_config_json, finish, interrupt_when, losses, make_dataset

from pretrain.models import kernels
from pretrain.models.bert import BertConfig, BertForPreTraining

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PLAIN = {"use_sdpa": False, "unpad": False, "sparse_mlm_head": False, "fused_qkv": False, "fused_ops": "plain"}
PLAIN |= {"sparse_last_layer": False}
FAST = {  # each fused path alone on top of the plain model, then all of them (the default config)
    "sdpa": {"use_sdpa": True},
    "unpad_varlen": {"unpad": True, "use_sdpa": True},
    "sparse_mlm_head": {"sparse_mlm_head": True},
    "sparse_last_layer": {"sparse_mlm_head": True, "sparse_last_layer": True},
    "fused_qkv": {"fused_qkv": True},
    "compile_ln_gelu": {"fused_ops": "compile"},
    "apex_ln": {"fused_ops": "apex"},
    "all": {k: getattr(kernels.KernelOptions(), k) for k in PLAIN},
}
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff of each format
GPU_MODEL = BertConfig(vocab_size=1024, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024)


def random_batch(config: BertConfig, B: int, S: int, seed: int, device: str) -> dict:
    """Right-padded sequences of random lengths (one full), ~15% masked positions, random NSP labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(S // 4, S + 1, (B,), generator=g)
    lengths[0] = S
    mask = (torch.arange(S) < lengths[:, None]).long()
    ids = torch.randint(5, config.vocab_size, (B, S), generator=g) * mask
    picks = [
        torch.randperm(int(n) - 1, generator=g)[: max(1, int(n) * 15 // 100)] + 1 + b * S for b, n in enumerate(lengths)
    ]
    masked = torch.cat(picks).sort().values
    b = {
        "input_ids": ids,
        "token_type_ids": (torch.arange(S) >= lengths[:, None] // 2).long() * mask,
        "attention_mask": mask,
        "masked_positions": masked,
        "mlm_labels": torch.randint(5, config.vocab_size, (len(masked),), generator=g),
        "nsp_labels": torch.randint(0, 2, (B,), generator=g),
    }
    return {k: v.to(device) for k, v in b.items()}


def run(config: BertConfig, options: dict, b: dict, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Loss, logits and every gradient of one forward+backward from seed-0 weights, eval mode (no dropout)."""
    torch.manual_seed(0)
    model = BertForPreTraining(config, kernels.KernelOptions(**options)).to(device).eval()
    if dtype == torch.float64:
        model = model.double()
    with torch.autocast(device, dtype=dtype, enabled=dtype in UNIT):
        out = model(**b)
    out.loss.backward()
    got = {"loss": out.loss, "mlm_logits": out.mlm_logits, "nsp_logits": out.nsp_logits}
    got.update({f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    return {k: v.detach().double() for k, v in got.items()}


def rel_errors(got: dict, ref: dict) -> dict[str, float]:
    """||x - ref|| / ||ref|| per output (inf where x is not finite). A gradient that is zero in exact arithmetic
    (the key bias: softmax ignores it) is measured against a hundredth of the median gradient norm instead."""
    floor = 0.01 * torch.tensor([r.norm() for k, r in ref.items() if k.startswith("grad")]).median().item()
    out = {}
    for k, r in ref.items():
        denom = max(r.norm().item(), floor if k.startswith("grad") else 1e-30)
        out[k] = (got[k] - r).norm().item() / denom if torch.isfinite(got[k]).all() else math.inf
    return out


def check_low_precision(
    config: BertConfig, fast: dict, plain: dict, b: dict, device: str, dtype, fast_batch=None
) -> None:
    """`fast` and `plain`: KernelOptions fields."""
    ref = run(config, plain, b, device, torch.float64)
    e_plain = rel_errors(run(config, plain, b, device, dtype), ref)
    e_fast = rel_errors(run(config, fast, fast_batch or b, device, dtype), ref)
    allowed = {k: 5 * e_plain[k] + 2 * UNIT[dtype] for k in ref}
    bad = {
        k: f"{e_fast[k]:.2e} > {allowed[k]:.2e} (plain {e_plain[k]:.2e})" for k in ref if not e_fast[k] <= allowed[k]
    }
    assert not bad, f"{len(bad)} of {len(ref)} outputs off: " + "; ".join(f"{k}: {v}" for k, v in list(bad.items())[:5])


def test_low_precision_check_passes_the_fast_paths_and_catches_a_bug_on_cpu_bf16():
    """The comparison the GPU tests rely on, on CPU in bf16: it accepts the fast paths and rejects a model that
    attends to padding (the fast run is handed an all-ones attention mask)."""
    config = dataclasses.replace(GPU_MODEL, num_layers=1, hidden_size=128, intermediate_size=512)
    b = random_batch(config, 4, 64, seed=int.from_bytes(os.urandom(4), "little"), device="cpu")
    check_low_precision(config, FAST["all"], PLAIN, b, "cpu", torch.bfloat16)
    leaky = dict(b, attention_mask=torch.ones_like(b["attention_mask"]))
    with pytest.raises(AssertionError, match="outputs off"):
        check_low_precision(config, PLAIN, PLAIN, b, "cpu", torch.bfloat16, fast_batch=leaky)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", list(FAST))
@pytest.mark.gpu
@needs_cuda
def test_fused_path_matches_plain_in_low_precision(path, dtype):
    if FAST[path].get("fused_ops") == "apex" and kernels.fused_layer_norm_affine is None:
        pytest.skip("needs NVIDIA apex")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; the seed is in a failure's message
    b = random_batch(GPU_MODEL, 8, 128, seed, "cuda")
    try:
        check_low_precision(GPU_MODEL, {**PLAIN, **FAST[path]}, PLAIN, b, "cuda", dtype)
    except AssertionError as e:
        raise AssertionError(f"seed {seed}: {e}") from None


@pytest.mark.gpu
@needs_cuda
def test_deepspeed_fused_lamb_matches_ours():
    """Same parameters, same gradients, five steps: DeepSpeed's CUDA kernel and pretrain.runtime.lamb.Lamb agree to 1e-6
    relative, and both agree with the float64 recomputation of the kernel's formulas."""
    from deepspeed.ops.lamb import FusedLamb
    from test_lamb import HP, make_problem, reference_lamb

    from pretrain.runtime.lamb import Lamb

    params, grads = make_problem(seed=int.from_bytes(os.urandom(4), "little"), steps=5)
    ours = [torch.nn.Parameter(p.clone().cuda()) for p in params]
    theirs = [torch.nn.Parameter(p.clone().cuda()) for p in params]
    opts = [Lamb(ours, **HP), FusedLamb(theirs, bias_correction=True, **HP)]
    for step_grads in grads:
        for ps, opt in zip((ours, theirs), opts):
            for p, g in zip(ps, step_grads):
                p.grad = g.clone().cuda()
            opt.step()
    want = reference_lamb(params, grads, **HP)
    for a, b, w in zip(ours, theirs, want):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b.detach().cpu().double(), w, rtol=1e-5, atol=1e-6)


def _engine(stage: int, precision: str, lr: float = 1e-3, **fp16):
    from pretrain.runtime import engine as eng

    cfg = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Lamb", "params": {"lr": lr, "weight_decay": 0.01, "betas": [0.9, 0.999]}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 1, **fp16}
    torch.manual_seed(0)
    model = BertForPreTraining(dataclasses.replace(GPU_MODEL, hidden_dropout=0.0, attention_dropout=0.0))
    return eng.initialize(model, cfg)


def _train_step(engine, b: dict) -> float:
    loss = engine(**b).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


@pytest.mark.gpu
@needs_cuda
def test_engine_fused_lamb_at_stage0_matches_our_lamb_under_zero1():
    """The two optimizers the engine picks on a GPU (DeepSpeed's kernel at stage 0, ours on ZeRO-1's flat fp32
    partition) take the same steps on the same model and batches."""
    from deepspeed.ops.lamb import FusedLamb

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    batches = [random_batch(GPU_MODEL, 8, 64, seed, "cuda") for seed in range(3)]
    weights = []
    for stage in (0, 1):
        engine = _engine(stage, "fp32")
        assert isinstance(engine.basic_optimizer, FusedLamb) == (stage == 0)
        for b in batches:
            _train_step(engine, b)
        weights.append({n: p.detach().float().clone() for n, p in engine.module.named_parameters()})
    moved = 0
    torch.manual_seed(0)
    start = dict(BertForPreTraining(GPU_MODEL).named_parameters())
    for n, w in weights[0].items():
        torch.testing.assert_close(weights[1][n], w, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        moved += not torch.equal(w.cpu(), start[n].detach())
    assert moved > len(start) // 2  # the comparison is between trained weights, not two copies of the start


@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.gpu
@needs_cuda
def test_fp16_overflow_is_skipped_and_the_loss_scale_drops(stage):
    """An inf planted in one gradient: that step changes no weight, counts as skipped and halves the scale;
    the next clean step trains again."""
    engine = _engine(stage, "fp16")
    b = random_batch(GPU_MODEL, 8, 64, 0, "cuda")
    for _ in range(40):  # until a step applies: the first ones may overflow at the initial scale
        skipped = engine.skipped_steps
        _train_step(engine, b)
        if engine.skipped_steps == skipped:
            break
    scale, skipped = engine.optimizer.loss_scale, engine.skipped_steps
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}

    def poison(grad):
        grad = grad.clone()
        grad.view(-1)[7] = float("inf")
        return grad

    handle = engine.module.bert.embeddings.word_embeddings.weight.register_hook(poison)
    loss = _train_step(engine, b)
    handle.remove()
    assert math.isfinite(loss)
    assert engine.skipped_steps == skipped + 1 and engine.optimizer.loss_scale == scale / 2
    for n, p in engine.module.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} changed on a skipped step"
    _train_step(engine, b)
    assert engine.skipped_steps == skipped + 1
    assert any(not torch.equal(p.detach(), before[n]) for n, p in engine.module.named_parameters())


def gpu_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    for key in ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> tuple[str, int, int]:
    """(prefix, vocab size, seq len): BERT_GPU_DATA when set (real text), else the CPU tests' grammar corpus."""
    prefix = os.environ.get("BERT_GPU_DATA")
    if prefix:
        return prefix, json.loads(Path(prefix + ".json").read_text())["tokenizer"]["vocab_size"], 128
    return make_dataset(tmp_path_factory.mktemp("gpu_data"), num_docs=200), 200, 64


def launch(data: tuple, save: Path, model: str, ds: str, steps: int) -> subprocess.Popen:
    prefix, vocab, seq_len = data
    cmd = [sys.executable, "-m", "pretrain.train", "--deepspeed_config", ds, "--model", model]
    cmd += ["--model-set", f"vocab_size={vocab}", "--data", prefix, "--seq-len", str(seq_len)]
    cmd += ["--train-steps", str(steps), "--save", str(save), "--log-every", "10", "--num-workers", "2"]
    log = open(save.parent / f"{save.name}.log", "a")
    return subprocess.Popen(cmd, cwd=ROOT, env=gpu_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def records(save: Path) -> list[dict]:
    return [r for r in map(json.loads, (save / "metrics.jsonl").read_text().splitlines()) if "split" not in r]


@pytest.mark.parametrize("model", ["tiny", "base"])
@pytest.mark.gpu
@needs_cuda
def test_fp16_with_dynamic_loss_scaling_trains_without_diverging(text_data, tmp_path, model):
    """300 steps of the shipped BERT-base phase-1 fp16 settings (loss scaling, hysteresis, LAMB at stage 0 on
    DeepSpeed's kernel, its learning rate) at a batch of 32 with a 300-step schedule: every loss finite, no
    spike above the start in the second half, few steps skipped, the MLM loss down by half a nat or more
    (tiny drops by about one in fp32 on CPU at these settings)."""
    ds = json.loads((ROOT / "ds_configs" / "bert_base_phase1_fp16.json").read_text())
    ds.update(train_batch_size=32, train_micro_batch_size_per_gpu=32, steps_per_print=10**9)
    ds["scheduler"]["params"] = {"warmup_proportion": 0.1, "power": 1.0}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    save, steps = tmp_path / "run", 300
    finish(launch(text_data, save, model, str(tmp_path / "ds.json"), steps), save, timeout=900)
    rs = records(save)
    assert [r["step"] for r in rs] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in rs)
    first, last = (sum(r["mlm_loss"] for r in part) / 20 for part in (rs[:20], rs[-20:]))
    assert last < first - 0.5, f"MLM loss {first:.3f} -> {last:.3f}"
    assert max(r["loss"] for r in rs[steps // 2 :]) < sum(r["loss"] for r in rs[:20]) / 20, "a loss spike"
    assert rs[-1]["skipped_steps"] <= steps // 10 and rs[-1]["loss_scale"] >= 1.0
    print(
        f"{model}: MLM loss {first:.3f} -> {last:.3f}, {rs[-1]['skipped_steps']} skipped, scale {rs[-1]['loss_scale']}"
    )


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.gpu
@needs_cuda
def test_zero_on_one_gpu_resumes_with_the_same_losses(text_data, tmp_path, stage):
    """fp16 + ZeRO-1/2 (our LAMB on the flat partition), dropout on: a run SIGTERM'd mid-way and relaunched logs
    the losses of a run never interrupted."""
    ds = ds_config_json(tmp_path / "ds.json", micro_batch=16, stage=stage, lr=1e-3)
    cfg = json.loads(Path(ds).read_text())
    cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2}
    Path(ds).write_text(json.dumps(cfg))
    steps, straight, interrupted = 80, tmp_path / "straight", tmp_path / "interrupted"
    finish(launch(text_data, straight, "tiny", ds, steps), straight)
    proc = launch(text_data, interrupted, "tiny", ds, steps)
    interrupt_when(proc, interrupted, 10)
    resumed_at = len(losses(interrupted))
    assert 0 < resumed_at < steps, "the signal did not stop the run early"
    finish(launch(text_data, interrupted, "tiny", ds, steps), interrupted)
    want, got = losses(straight), losses(interrupted)
    assert sorted(got) == list(range(1, steps + 1))
    torch.testing.assert_close(
        [got[s] for s in sorted(got)],
        [want[s] for s in sorted(want)],
        rtol=1e-4,
        atol=0.0,
        msg=lambda m: f"resumed at step {resumed_at}: {m}",
    )
    assert records(interrupted)[-1]["loss_scale"] == records(straight)[-1]["loss_scale"]
