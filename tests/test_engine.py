"""pretrain.runtime.engine: optimizer choice, schedules, batch checks, and LAMB and StableAdamW under ZeRO 0-3 with two
CPU processes.

The two-process part is one `deepspeed` launch (this file's `__main__`) that trains the same small model
under every ZeRO stage and writes the weights after each step; the tests compare them with stage 0 and with
an in-process, non-distributed run on the full batch: of the same LAMB, and of torch-optimi's StableAdamW.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from fixtures_train import free_port, run_env

from common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
STEPS, WORLD, MB = 3, 2, 4
STAGES = [0, 1, 2, 3]
BF16_STAGES = [0, 1, 2, 3]  # stage 0: DeepSpeed's bf16 optimizer (flat, ZeRO-1 style)
STABLE = {"lr": 0.05, "weight_decay": 0.01, "betas": [0.9, 0.99], "decouple_lr": True}
WSD = {"warmup_proportion": 0.0, "decay_proportion": 0.5, "decay": "1-sqrt"}  # lr factors 1, 1, 1 - sqrt(1/3)


def stable_config(stage: int) -> dict:
    """StableAdamW (ModernBERT's recipe: no gradient clipping, its update clipping instead) on a WSD schedule."""
    return {
        **ds_config(stage),
        "optimizer": {"type": "StableAdamW", "params": STABLE},
        "scheduler": {"type": "WarmupStableDecay", "params": WSD},
        "gradient_clipping": 0.0,
    }


def loss_scale(step: int) -> float:
    """StableAdamW runs scale the loss 1, 5, 9: growing gradients, so its per-tensor update clipping bites."""
    return 1.0 + 4.0 * step


def ds_config(stage: int, bf16: bool = False) -> dict:
    return {
        "train_batch_size": MB * WORLD,
        "train_micro_batch_size_per_gpu": MB,
        "optimizer": {"type": "Lamb", "params": {"lr": 0.05, "weight_decay": 0.01, "betas": [0.9, 0.99]}},
        "scheduler": {"type": "WarmupPolyDecay", "params": {"warmup_proportion": 0.3, "power": 0.5}},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }


class Tiny(torch.nn.Module):
    """Tensors of odd sizes so ZeRO partitions split some of them across the two ranks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(37, 12)
        self.fc1 = torch.nn.Linear(12, 29)
        self.norm = torch.nn.LayerNorm(29)
        self.fc2 = torch.nn.Linear(29, 5)

    def forward(self, x, y):
        h = self.norm(torch.relu(self.fc1(self.emb(x).mean(1))))
        return torch.nn.functional.cross_entropy(self.fc2(h), y)


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 37, (MB, 6), generator=g), torch.randint(0, 5, (MB,), generator=g)


MODERN_STAGES = [0, 2, 3]


def modern_bert() -> torch.nn.Module:
    """A tiny ModernBERT (tied decoder, global and local layers) for LAMB under ZeRO."""
    from pretrain.models import build_pretraining_model, load_config

    torch.manual_seed(0)
    shape = ["vocab_size=37", "pad_token_id=0", "hidden_size=16", "num_attention_heads=2", "intermediate_size=24"]
    return build_pretraining_model(load_config("modernbert-tiny", [*shape, "num_hidden_layers=3", "local_attention=4"]))


def modern_batch(step: int, rank: int) -> dict:
    """Two documents packed in each row (`document_ids`), three masked tokens per row."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(1, 37, (MB, 8), generator=g)
    masked = (torch.tensor([1, 4, 6]) + 8 * torch.arange(MB)[:, None]).flatten()
    docs = (torch.arange(8) >= 3).long().expand(MB, -1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "document_ids": docs,
            "masked_positions": masked, "mlm_labels": ids.flatten()[masked]}  # fmt: skip


def full_weights(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights: the fp32 master copy under bf16, gathered under ZeRO-3."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    if engine.bfloat16_enabled() and engine.zero_optimization_stage() == 0:  # one fp32 copy per tensor
        opt = engine.optimizer
        master = {id(a): b for x, y in zip(opt.fp16_groups, opt.fp32_groups) for a, b in zip(x, y)}
        return {k: master[id(v)].detach().clone() for k, v in engine.module.named_parameters()}
    if engine.bfloat16_enabled():
        return {k: safe_get_full_fp32_param(v).clone() for k, v in engine.module.named_parameters()}
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().float().clone() for k, v in engine.module.named_parameters()}


def worker(out: str) -> None:
    """Run under `deepspeed --num_gpus 2`: every stage, STEPS steps, weights after each step from rank 0, and a
    checkpoint of each run in OUT.d/<run>."""
    from pretrain.runtime import checkpoint, dist
    from pretrain.runtime import engine as eng

    results = {}
    runs = [*STAGES, *(f"bf16-{s}" for s in BF16_STAGES), *(f"stable-{s}" for s in STAGES)]
    for stage in [*runs, *(f"modernbert-{s}" for s in MODERN_STAGES)]:
        engine, history, norms = train_run(eng, str(stage))
        rank = engine.global_rank
        results[stage], results[f"norms-{stage}"] = history, norms
        results[f"full-{stage}"] = eng.full_state_dict(engine)  # every rank calls it; ZeRO-3 gathers to rank 0
        checkpoint.save(engine, f"{out}.d/{stage}", checkpoint.TrainState(step=STEPS, world_size=WORLD))
        engine.destroy()
    results["shm_buffer"] = Path("/dev/shm", dist.shm_buffer_name(rank)).exists()  # before shutdown removes it
    if rank == 0:
        torch.save(results, out)
    dist.shutdown()


def train_run(eng, run: str):
    """STEPS steps of one run of the worker: (engine, weights after each step, gradient norms)."""
    bf16, stable, modern = run.startswith("bf16"), run.startswith("stable"), run.startswith("modernbert")
    config = stable_config(int(run[-1])) if stable else ds_config(int(run[-1]), bf16=bf16)
    engine = eng.initialize(modern_bert() if modern else Tiny(), config, total_steps=STEPS)
    history, norms = [], []
    for step in range(STEPS):
        if modern:
            loss = engine(**modern_batch(step, engine.global_rank)).loss
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = engine(*batch(step, engine.global_rank)) * (loss_scale(step) if stable else 1.0)
        engine.backward(loss)
        norms.append(eng.step(engine))
        history.append(full_weights(engine))
    return engine, history, norms


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "weights.pt"
    env = run_env()
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(WORLD), "--master_port", str(port), __file__, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # dist.shutdown removed the 69 MB shared-memory buffer DeepSpeed's CPU comm op made for each rank
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return {**torch.load(out), "dir": Path(f"{out}.d")}


def single_process_reference(stable: bool = False):
    """Plain torch, no DeepSpeed: the whole global batch in one process, gradients averaged like data parallel;
    LAMB (ours: tests/test_lamb.py checks it against a float64 recomputation) or torch-optimi's StableAdamW."""
    import optimi

    from pretrain.runtime.engine import param_groups
    from pretrain.runtime.lamb import Lamb
    from pretrain.runtime.schedules import WarmupPolyDecay, WarmupStableDecay

    model = Tiny()
    if stable:
        groups = param_groups(model, STABLE["weight_decay"])
        with warnings.catch_warnings():  # optimi's note that 0.01 is a high weight decay once not scaled by lr
            warnings.simplefilter("ignore")
            opt = optimi.StableAdamW(groups, lr=STABLE["lr"], betas=STABLE["betas"], decouple_lr=True, triton=False)
        sched = WarmupStableDecay(opt, STEPS, **WSD)
    else:
        params = ds_config(0)["optimizer"]["params"]
        opt = Lamb(param_groups(model, params["weight_decay"]), lr=params["lr"], betas=params["betas"])
        sched = WarmupPolyDecay(opt, STEPS, warmup_proportion=0.3, power=0.5)
    history, norms = [], []
    for step in range(STEPS):
        opt.zero_grad()
        loss = sum(model(*batch(step, r)) for r in range(WORLD)) / WORLD * (loss_scale(step) if stable else 1.0)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0 if not stable else float("inf"))))
        opt.step()
        sched.step()
        history.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return history, norms


@pytest.mark.slow
def test_stage0_two_processes_matches_single_process_lamb(two_process_runs):
    for got, want in zip(two_process_runs[0], single_process_reference()[0]):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_makes_the_same_lamb_updates_as_stage0(two_process_runs, stage):
    """LAMB's per-tensor trust ratios survive ZeRO flattening (DeepSpeed issues #88/#490)."""
    for step, (got, want) in enumerate(zip(two_process_runs[stage], two_process_runs[0])):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"stage {stage} step {step} {k}")


@pytest.mark.slow
def test_stable_adamw_two_processes_matches_optimi_in_one(two_process_runs):
    """Our StableAdamW under DeepSpeed, data parallel, is torch-optimi's on the whole batch (WSD schedule too)."""
    for step, (got, want) in enumerate(zip(two_process_runs["stable-0"], single_process_reference(stable=True)[0])):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"step {step} {k}")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_makes_the_same_stable_adamw_updates_as_stage0(two_process_runs, stage):
    """StableAdamW's update clipping (an rms per tensor) stays per tensor on ZeRO's flat partitions."""
    for step, (got, want) in enumerate(zip(two_process_runs[f"stable-{stage}"], two_process_runs["stable-0"])):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"stage {stage} step {step} {k}")


@pytest.mark.slow
@pytest.mark.parametrize("stage", MODERN_STAGES[1:])
def test_zero_stage_makes_the_same_lamb_updates_for_modernbert(two_process_runs, stage):
    """ModernBERT's tied decoder and packed documents change nothing: per-tensor LAMB at ZeRO 2/3 is stage 0's."""
    want_run = two_process_runs["modernbert-0"]
    assert not torch.equal(want_run[0]["model.embeddings.tok_embeddings.weight"], want_run[-1][
        "model.embeddings.tok_embeddings.weight"])  # fmt: skip
    for step, (got, want) in enumerate(zip(two_process_runs[f"modernbert-{stage}"], want_run)):
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"stage {stage} step {step} {k}")


@pytest.mark.slow
@pytest.mark.parametrize("run, tol", [("bf16-0", 0.25), ("bf16-2", 0.1)])
def test_bf16_runs_make_the_fp32_updates_up_to_bf16_rounding(two_process_runs, run, tol):
    """bf16 compute with fp32 master weights (stage 0: bf16 gradient accumulation, hence the looser bound)."""
    got, want = two_process_runs[run], two_process_runs[0]
    for k in want[0]:
        moved, moved_bf16 = want[-1][k] - want[0][k], got[-1][k] - got[0][k]
        assert (moved_bf16 - moved).norm() < tol * moved.norm(), k


@pytest.mark.slow
@pytest.mark.parametrize("run", [0, 2, 3, "bf16-0", "bf16-1", "bf16-2", "bf16-3"])
def test_checkpoints_give_the_optimizers_fp32_master_weights(two_process_runs, run, tmp_path):
    """What bert-export, --init-from and bert-finetune read (weights.master_weights) is the optimizer's fp32
    copy itself (DeepSpeed's safe_get_full_fp32_param in the worker), not the 16-bit module weights: DeepSpeed
    names bf16 optimizer shards bf16_zero_pp_rank_*, which a zero_pp_rank_* glob misses."""
    from pretrain.runtime.weights import master_weights

    tag_dir = two_process_runs["dir"] / str(run) / "step_00000003"
    got, want = master_weights(tag_dir), two_process_runs[run][-1]
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k].float(), want[k]), (run, k)
    if str(run).startswith("bf16"):  # the masters are not what bf16 can hold: reading the module would round them
        assert any(not torch.equal(v, v.bfloat16().float()) for v in got.values())
        for f in tag_dir.glob("*_optim_states.pt"):
            f.unlink()
        if run == "bf16-0":  # stage 0 keeps its optimizer, and so the masters, in the module's file
            states = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
            torch.save({**states, "optimizer": None}, tag_dir / "mp_rank_00_model_states.pt")
        refusal = "holds only torch.bfloat16 weights and no fp32 master copy" if run != "bf16-3" else "neither"
        with pytest.raises(UserError, match=refusal):  # only 16-bit weights are left: refused, never rounded
            master_weights(tag_dir)


@pytest.mark.slow
@pytest.mark.parametrize("run, tol", [(0, 1e-5), (1, 1e-5), (2, 1e-5), (3, 1e-5), ("bf16-0", 0.05), ("bf16-2", 0.05)])
def test_every_stage_reports_the_gradient_norm_torch_computes(two_process_runs, run, tol):
    """pretrain.runtime.engine.step's norm (logged as grad_norm): ours at stage 0 in fp32, DeepSpeed's elsewhere,
    all equal to torch's clip_grad_norm_ of the same global batch in one process (bf16: up to its rounding)."""
    want = single_process_reference()[1]
    assert two_process_runs[f"norms-{run}"] == pytest.approx(want, rel=tol)


@pytest.mark.slow
@pytest.mark.parametrize("run", [0, 2, 3, "bf16-3"])
def test_full_state_dict_is_the_whole_model_at_every_stage(two_process_runs, run):
    """engine.full_state_dict (fine-tuning's saves) relies on ZeRO-3's private _zero3_consolidated_16bit_state_dict;
    a DeepSpeed upgrade that changes it fails here."""
    got, want = two_process_runs[f"full-{run}"], two_process_runs[run][-1]
    assert got.keys() == want.keys()
    for k in want:  # bf16: the gathered 16-bit weights are the masters rounded
        torch.testing.assert_close(got[k].float(), want[k], rtol=0, atol=0 if run != "bf16-3" else 2e-2)


@pytest.mark.slow
def test_deepspeeds_shared_memory_buffer_has_the_name_shutdown_removes(two_process_runs):
    """dist.shm_buffer_name rebuilds the name from DeepSpeed's shm.cpp: when an upgrade renames the buffer, the
    69 MB per rank would leak again silently, so its presence during the run is checked, not only its absence after."""
    assert two_process_runs["shm_buffer"]


def test_weights_actually_move_so_the_comparisons_mean_something(two_process_runs):
    for run in (0, "stable-0"):
        first, last = two_process_runs[run][0], two_process_runs[run][-1]
        assert all(not torch.equal(first[k], last[k]) for k in first)
    import optimi  # and StableAdamW's update clipping changes them: optimi's AdamW (no clipping) moves elsewhere

    model = Tiny()
    opt = optimi.AdamW(model.parameters(), lr=STABLE["lr"], betas=STABLE["betas"], weight_decay=0.0, triton=False)
    for step in range(STEPS):
        opt.zero_grad()
        (sum(model(*batch(step, r)) for r in range(WORLD)) / WORLD * loss_scale(step)).backward()
        opt.step()
    clipped = single_process_reference(stable=True)[0][-1]
    assert not torch.allclose(model.fc1.weight, clipped["fc1.weight"], rtol=1e-3)


def test_poly_schedule_warmup_then_decay_to_zero():
    from pretrain.runtime.schedules import WarmupPolyDecay

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    s = WarmupPolyDecay(opt, total_steps=10, warmup_proportion=0.2, power=2.0)
    lrs = [s.get_last_lr()[0]]
    for _ in range(10):
        s.step()
        lrs.append(s.get_last_lr()[0])
    want = [2.0 * (t / 10 / 0.2 if t < 2 else ((1 - t / 10) / 0.8) ** 2) for t in range(11)]
    assert lrs == pytest.approx(want)
    time_driven = WarmupPolyDecay(opt, total_steps=10, warmup_proportion=0.2, progress=lambda step: 0.6)
    assert time_driven.get_last_lr()[0] == pytest.approx(2.0 * 0.4 / 0.8)


def test_warmup_stable_decay_schedule():
    """Linear warmup, the peak, then a linear or 1-sqrt decay to min_lr_ratio x peak over the last share."""
    from pretrain.runtime.schedules import WarmupStableDecay

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)

    def want(t: int, shape) -> float:  # total 20 steps: warmup 4, stable to step 12, decay 12 -> 20
        if t < 4:
            return 2.0 * t / 4
        return 2.0 if t <= 12 else 2.0 * (0.1 + 0.9 * (1 - shape((t - 12) / 8)))

    for decay, shape in (("linear", lambda q: q), ("1-sqrt", lambda q: q**0.5)):
        s = WarmupStableDecay(opt, 20, warmup_proportion=0.2, decay_proportion=0.4, decay=decay, min_lr_ratio=0.1)
        lrs = [s.get_last_lr()[0]]
        for _ in range(20):
            s.step()
            lrs.append(s.get_last_lr()[0])
        assert lrs == pytest.approx([want(t, shape) for t in range(21)])
    constant = WarmupStableDecay(opt, 20, warmup_proportion=0.1)  # ModernBERT's phase 1: no decay at all
    constant.load_state_dict({"last_step": 19, "base_lrs": [2.0]})
    assert constant.get_last_lr()[0] == 2.0
    by_clock = WarmupStableDecay(opt, 1000, warmup_proportion=0.1, decay_proportion=0.5, progress=lambda step: 0.75)
    assert by_clock.get_last_lr()[0] == pytest.approx(2.0 * (1 - 0.5**0.5))  # --time-budget: 3/4 of it spent


def test_weight_decay_excludes_biases_and_layernorm():
    from pretrain.runtime.engine import param_groups

    model = Tiny()
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["emb.weight", "fc1.weight", "fc2.weight"]
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("bias") or n.startswith("norm") for n in (names[id(p)] for p in no_decay["params"]))


def test_cpu_gets_our_lamb_with_the_json_hyperparameters():
    from pretrain.runtime.engine import build_optimizer
    from pretrain.runtime.lamb import Lamb

    cfg = ds_config(2)
    cfg["optimizer"]["params"].update(max_coeff=5.0, min_coeff=0.1, eps=1e-6)
    opt, _ = build_optimizer(Tiny(), cfg)
    assert isinstance(opt, Lamb) and "optimizer" not in cfg
    assert opt.defaults["max_coeff"] == 5.0 and opt.defaults["min_coeff"] == 0.1 and opt.defaults["eps"] == 1e-6


@pytest.mark.parametrize(
    ("env", "shared"),
    [
        ({"LOCAL_SIZE": "2"}, True),  # the deepspeed launcher's two local ranks
        ({"LOCAL_WORLD_SIZE": "2"}, True),  # torchrun's
        ({"LOCAL_SIZE": "1"}, False),
        ({}, False),
        ({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "3"}, False),  # the user's setting stands
    ],
)
def test_local_cpu_ranks_share_the_cores(monkeypatch, env, shared):
    from pretrain.runtime.dist import share_cpu_cores

    for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(13)
        share_cpu_cores()
        assert torch.get_num_threads() == (max(1, len(os.sched_getaffinity(0)) // 2) if shared else 13)
    finally:
        torch.set_num_threads(before)


def test_stable_adamw_and_fully_decoupled_adamw_are_ours_on_every_device(monkeypatch):
    """StableAdamW has no DeepSpeed kernel; AdamW's "decouple_lr" (wd not scaled by lr) is StableAdamW without its
    clipping. Plain AdamW stays DeepSpeed's on a GPU and torch's on CPU: decoupled weight decay scaled by lr."""
    from pretrain.runtime import engine as eng
    from pretrain.runtime.optim import StableAdamW

    for gpu in (False, True):
        monkeypatch.setattr(eng, "on_gpu", lambda gpu=gpu: gpu)
        cfg = stable_config(2)
        opt, _ = eng.build_optimizer(Tiny(), cfg)
        assert type(opt) is StableAdamW and opt.update_clipping and opt.defaults["decouple_lr"]
        assert opt.defaults["max_lr"] == STABLE["lr"] and "optimizer" not in cfg
        adamw = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 1e-5, "decouple_lr": True, "torch_adam": True}}
        opt, _ = eng.build_optimizer(Tiny(), {**ds_config(0), "optimizer": adamw})
        assert type(opt) is StableAdamW and not opt.update_clipping and opt.defaults["decouple_lr"]
        plain = {**ds_config(0), "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}}
        opt, _ = eng.build_optimizer(Tiny(), plain)
        assert (opt is None) if gpu else type(opt) is torch.optim.AdamW


def test_gpu_stage0_lamb_is_deepspeeds_kernel_or_ours_when_the_kernel_does_not_load(monkeypatch):
    """On a GPU, stage-0 fp32/fp16 LAMB goes to DeepSpeed's fused kernel; where that JIT build fails (no nvcc,
    say) training must not die: our Lamb takes over with the same hyperparameters and a warning says why."""
    from pretrain.runtime import engine as eng
    from pretrain.runtime.lamb import Lamb

    monkeypatch.setattr(eng, "on_gpu", lambda: True)
    monkeypatch.setattr(eng, "fused_lamb_loads", lambda: True)
    cfg = ds_config(0)
    opt, _ = eng.build_optimizer(Tiny(), cfg)
    assert opt is None and cfg["optimizer"]["type"] == "Lamb"  # left to DeepSpeed

    monkeypatch.undo()
    monkeypatch.setattr(eng, "on_gpu", lambda: True)
    eng.fused_lamb_loads.cache_clear()  # the real probe: on this CPU machine the kernel cannot load
    with pytest.warns(UserWarning, match="fused LAMB did not load"):
        opt, _ = eng.build_optimizer(Tiny(), cfg)
    eng.fused_lamb_loads.cache_clear()
    assert isinstance(opt, Lamb) and "optimizer" not in cfg and opt.defaults["weight_decay"] == 0.01


@pytest.mark.parametrize(
    "patch, words",
    [
        ({"fp16": {"enabled": True}}, "fp16"),
        ({"train_batch_size": 7}, "train_batch_size"),
        ({"optimizer": {"type": "Lion"}}, "Lion"),
        ({"optimizer": {"type": "StableAdamW", "params": {"lr": 1e-3, "kahan_sum": True}}}, "kahan_sum"),
        ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "decouple_lr": True}}}, "AdamW"),
        ({"scheduler": {"type": "WarmupStableDecay", "params": {"decay": "cosine"}}}, "cosine"),
        ({"scheduler": {"type": "WarmupStableDecay", "params": {"decay_steps": 5}}}, "decay_steps"),
        ({"scheduler": {"type": "WarmupStableDecay", "params": {"warmup_proportion": 0.6, "decay_proportion": 0.6}}},
         "warmup_proportion \\+ decay_proportion"),
    ],
)  # fmt: skip
def test_bad_configs_are_one_line_user_errors(tmp_path, patch, words):
    from pretrain.runtime.ds_config import load_ds_config, resolve_batch
    from pretrain.runtime.engine import build_optimizer
    from pretrain.runtime.schedules import SCHEDULES

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**ds_config(0), **patch}))
    with pytest.raises(UserError, match=words):
        cfg = load_ds_config(path)
        resolve_batch(cfg, WORLD)
        opt, _ = build_optimizer(Tiny(), cfg)
        sched = cfg["scheduler"]
        SCHEDULES[sched["type"]].from_config(opt, 10, sched.get("params", {}))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    sys.path.insert(0, str(ROOT))
    worker(parser.parse_args().out)
