"""ModernBERT's fast paths against its plain path; fast paths decided once (both families); ModernBERT's FLOPs."""

import dataclasses
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from common.errors import UserError
from pretrain import models
from pretrain.models import attention, kernels
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.kernels import KernelOptions
from pretrain.models.modernbert import ModernBertConfig, ModernBertForMaskedLM

BASE = ModernBertConfig(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    local_attention=8, pad_token_id=0, embedding_dropout=0.1, attention_dropout=0.1, mlp_dropout=0.1,
)  # fmt: skip
PLAIN = {
    "use_sdpa": False,
    "unpad": False,
    "sparse_mlm_head": False,
    "fused_ops": "plain",
    "sparse_embedding_grad": False,
    "sparse_last_layer": False,
    "onednn_gemm": False,
}
FAST = KernelOptions()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def batch(B: int = 4, S: int = 24, device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([S, 17, 9, 3][:B])
    mask = (torch.arange(S) < lengths[:, None]).long()
    masked = torch.cat([torch.tensor([0, 2]) + b * S for b in range(B)])
    b = {
        "input_ids": torch.randint(1, BASE.vocab_size, (B, S), generator=gen) * mask,
        "attention_mask": mask,
        "masked_positions": masked,
        "mlm_labels": torch.randint(1, BASE.vocab_size, (len(masked),), generator=gen),
    }
    return {k: v.to(device) for k, v in b.items()}


def step(options: KernelOptions, b: dict, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Loss, MLM logits and grads of one forward+backward from seed-0 weights, in eval mode (no dropout)."""
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(BASE, options).to(device).eval()
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        out = model(**b)
    out.loss.backward()
    return out.loss.float(), out.mlm_logits.float(), {n: p.grad.float() for n, p in model.named_parameters()}


def assert_same_step(fast, plain, **tol) -> None:
    torch.testing.assert_close(fast[0], plain[0], **tol)
    torch.testing.assert_close(fast[1], plain[1], **tol)
    for name, g in plain[2].items():
        torch.testing.assert_close(fast[2][name], g, **tol, msg=lambda m, name=name: f"{name}: {m}")


SWITCHES = ["use_sdpa", "unpad", "sparse_mlm_head", "sparse_embedding_grad", "onednn_gemm", "all"]


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_matches_plain(switch):
    plain = KernelOptions(**PLAIN)
    fast = FAST if switch == "all" else dataclasses.replace(plain, **{switch: getattr(FAST, switch)})
    assert_same_step(step(fast, batch()), step(plain, batch()), rtol=1e-5, atol=1e-6)


def test_dropout_is_live_in_training_and_off_in_eval():
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(BASE).train()
    losses = [model(**batch()).loss for _ in range(2)]
    assert torch.isfinite(losses[0]) and losses[0] != losses[1]
    model.eval()
    assert model(**batch()).loss == model(**batch()).loss


@pytest.mark.slow
def test_torch_compile_ops_match_plain():
    b = batch()
    compiled, plain = KernelOptions(fused_ops="compile"), KernelOptions(fused_ops="plain")
    assert_same_step(step(compiled, b), step(plain, b), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_varlen_window_attention_on_cuda_matches_padded():
    b = batch(device="cuda")
    fast = step(FAST, b, "cuda", torch.bfloat16)
    assert_same_step(fast, step(KernelOptions(unpad=False), b, "cuda", torch.bfloat16), rtol=2e-2, atol=2e-2)


def resolved(model, device: str, dtype: torch.dtype) -> tuple[dict, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = model.resolve_fast_paths(torch.device(device), dtype)
    return paths, [str(w.message) for w in caught]


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_fast_paths_are_decided_once_and_said_once(family):
    config = models.load_config("tiny" if family == "bert" else "modernbert-tiny", ["vocab_size=64", "pad_token_id=0"])
    model = models.build_pretraining_model(config, KernelOptions(fused_ops="compile"))
    paths, said = resolved(model, "cpu", torch.float32)
    assert paths["attention"] == "grouped + SDPA" and paths["ops"] == "compile" and said == []
    model.set_weights_partitioned(True)  # ZeRO-3: only paths that call modules
    paths, said = resolved(model, "cpu", torch.float32)
    assert paths["ops"] == "plain" and paths["qkv"] == "one per projection"
    assert len(said) == (2 if family == "bert" else 1) and all("ZeRO-3" in s for s in said)  # one per fallback
    ids = torch.randint(1, 64, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # forward only follows the decision: no second warning
        model(ids, masked_positions=torch.tensor([1, 9]), mlm_labels=torch.tensor([3, 4])).loss.backward()
        model(ids)


def test_cuda_fallbacks_name_their_cause(monkeypatch):
    """Resolution needs only the device's kind, so the CUDA decisions are checked here without a GPU."""
    bert = BertForPreTraining(BertConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2))
    _, said = resolved(bert, "cuda", torch.float32)
    assert len(said) == 1 and "need fp16 or bf16" in said[0] and "float32" in said[0]
    monkeypatch.setattr(kernels, "flash_attn_varlen_func", None)
    monkeypatch.setattr(kernels, "torch_varlen", lambda: object())
    paths, said = resolved(bert, "cuda", torch.bfloat16)  # attention_dropout 0.1, torch's kernel has none
    assert paths["attention"] == "padded + SDPA" and len(said) == 1 and "attention_dropout=0" in said[0]
    modern = ModernBertForMaskedLM(dataclasses.replace(BASE, attention_dropout=0.0))
    on_cpu = resolved(modern, "cpu", torch.float32)[0]
    on_cuda = {**on_cpu, "attention": "torch varlen", "embedding_grad": "dense", "gemm": "torch"}  # CPU paths
    assert resolved(modern, "cuda", torch.bfloat16) == (on_cuda, [])
    monkeypatch.setattr(kernels, "flash_attn_varlen_func", object())
    assert resolved(bert, "cuda", torch.float16)[0]["attention"] == "flash-attn varlen"
    monkeypatch.setattr(kernels, "fused_layer_norm_affine", object())  # as if apex were installed
    with pytest.raises(UserError, match="fused_ops=apex needs a CUDA device"):
        ModernBertForMaskedLM(BASE, KernelOptions(fused_ops="apex")).resolve_fast_paths("cpu", torch.float32)


def test_flops_formula_matches_counted_matmuls():
    """The documented formula against torch's FLOP counter on a forward+backward of one sequence (MLM loss only),
    plain attention and torch's GEMM (the counter sees neither CPU's fused SDPA nor oneDNN's matmul). The counter
    sees every score of the dense masked attention, so here the window covers the sequence; the window's pair
    count A is checked against the attention mask the model builds."""
    s, P, L, h, i, V = 30, 6, 4, 64, 96, 500
    ids = torch.randint(1, 500, (1, s))
    every_row = 24 * L * s * h * h + 18 * L * s * h * i + 12 * h * L * s * s + 6 * P * h * (h + V)
    last_layer_on_the_masked_rows = every_row - (s - P) * (6 * h * h + 18 * h * i)
    for sparse_last_layer, documented in [(False, every_row), (True, last_layer_on_the_masked_rows)]:
        options = KernelOptions(**{**PLAIN, "sparse_mlm_head": True, "sparse_last_layer": sparse_last_layer})
        config = dataclasses.replace(BASE, vocab_size=500, local_attention=64)
        model = ModernBertForMaskedLM(config, options)
        with FlopCounterMode(display=False) as counter:
            model(ids, masked_positions=torch.arange(1, 1 + P), mlm_labels=ids[0, 1 : 1 + P]).loss.backward()
        assert models.flops_per_sequence(config, s, P, options) == documented == counter.get_total_flops()
    for s, radius in [(30, 4), (7, 4), (200, 64)]:
        mask = attention._mask(torch.ones(1, s, dtype=torch.bool), None, radius)
        local = dataclasses.replace(config, local_attention=2 * radius, global_attn_every_n_layers=L)
        G = 1  # layer 0 only
        scores = 12 * h * (G * s * s + (L - G) * int(mask.sum()))
        assert local.training_flops(s, 0, sparse_last_layer=False) == 24 * L * s * h * h + 18 * L * s * h * i + scores
