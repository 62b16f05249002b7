"""Each fast-path switch (KernelOptions) gives the numbers of its plain-PyTorch fallback (loss, logits, grads)."""

import dataclasses
import json
import os
import platform
import subprocess
import sys
import warnings

import pytest
import torch

from pretrain import models
from pretrain.models import attention, fused, kernels
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.kernels import KernelOptions
from pretrain.models.modernbert import ModernBertConfig

BASE = BertConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
MODERN_SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
PLAIN = {"use_sdpa": False, "unpad": False, "sparse_mlm_head": False, "fused_qkv": False, "fused_ops": "plain"}
PLAIN |= {"sparse_embedding_grad": False, "sparse_last_layer": False, "onednn_gemm": False}
FAST = KernelOptions()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def batch(B: int = 4, S: int = 24, seed: int = 0, device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([S, 17, 9, 3][:B])
    mask = (torch.arange(S) < lengths[:, None]).long()
    masked = torch.cat([torch.tensor([1, 2]) + b * S for b in range(B)])
    b = {
        "input_ids": torch.randint(1, BASE.vocab_size, (B, S), generator=gen) * mask,
        "token_type_ids": (torch.arange(S) >= lengths[:, None] // 2).long() * mask,
        "attention_mask": mask,
        "masked_positions": masked,
        "mlm_labels": torch.randint(1, BASE.vocab_size, (len(masked),), generator=gen),
        "nsp_labels": torch.tensor([0, 1, 1, 0][:B]),
    }
    return {k: v.to(device) for k, v in b.items()}


def step(
    options: KernelOptions, b: dict, device: str = "cpu", dtype: torch.dtype = torch.float32, config: BertConfig = BASE
):
    """Loss, MLM logits and grads of one forward+backward from seed-0 weights, in eval mode (no dropout)."""
    torch.manual_seed(0)
    model = BertForPreTraining(config, options).to(device).eval()
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        out = model(**b)
    out.loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters()}
    return out.loss.float(), out.mlm_logits.float(), grads


def assert_same_step(fast, plain, **tol) -> None:
    torch.testing.assert_close(fast[0], plain[0], **tol)
    torch.testing.assert_close(fast[1], plain[1], **tol)
    for name, g in plain[2].items():
        torch.testing.assert_close(fast[2][name], g, **tol, msg=lambda m, name=name: f"{name}: {m}")


SWITCHES = ["use_sdpa", "unpad", "sparse_mlm_head", "fused_qkv", "sparse_embedding_grad", "onednn_gemm"]


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_alone_matches_plain(switch):
    plain = KernelOptions(**PLAIN)
    fast = dataclasses.replace(plain, **{switch: getattr(FAST, switch)})
    b = batch()
    assert_same_step(step(fast, b), step(plain, b), rtol=1e-5, atol=1e-6)


def test_all_fast_paths_together_match_plain():
    b = batch()
    assert_same_step(step(FAST, b), step(KernelOptions(**PLAIN), b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_embedding_grad_as_rows_into_the_decoders_gradient_only_beside_the_mlm_loss(family, monkeypatch):
    """The rows path (values: the switch test above) adds the lookup's rows into the very buffer of the tied
    decoder's weight gradient, which becomes the weight's dense .grad (no second vocabulary x hidden buffer); a
    backward without the tied decoder (the encoder alone, no MLM labels) keeps the plain lookup, and CUDA resolves
    to the plain path."""
    config = BASE if family == "bert" else ModernBertConfig(**{**MODERN_SHAPE, "pad_token_id": 0})
    torch.manual_seed(0)
    model = models.build_pretraining_model(config)
    embedding, decoder = model.get_submodule(model.EMBEDDING), model.get_submodule(model.DECODER)
    products = []
    add = fused.TiedGrad.add
    monkeypatch.setattr(fused.TiedGrad, "add", lambda self, g: (products.append(g.data_ptr()), add(self, g)))
    b = batch()
    rows_path = {300: True, **({512: False, 2: False} if family == "bert" else {})}  # word embedding: rows
    loss = model(**b).loss
    assert lookups(loss) == rows_path
    loss.backward()
    assert embedding.weight.grad.layout == torch.strided and [embedding.weight.grad.data_ptr()] == products
    assert embedding.tied is None and decoder.tied is None
    assert lookups(model(**b).loss) == rows_path and embedding.tied is None  # on again for the next forward, then off
    plain = KernelOptions(sparse_embedding_grad=False)
    assert lookups(models.build_pretraining_model(config, plain)(**b).loss)[300] is False
    b["input_ids"][0, 5] = config.pad_token_id  # a real token with the padding id: its row gets no lookup gradient

    def weight_grad(options):
        torch.manual_seed(0)
        m = models.build_pretraining_model(config, options).eval()
        m(**b).loss.backward()
        return m.get_submodule(m.EMBEDDING).weight.grad

    torch.testing.assert_close(weight_grad(FAST), weight_grad(plain), rtol=1e-5, atol=1e-6)
    for backward in (
        lambda: model(b["input_ids"], b["token_type_ids"], b["attention_mask"]).mlm_logits.sum().backward(),
        lambda: getattr(model, "bert", getattr(model, "model", None))(b["input_ids"])[0].sum().backward(),
    ):
        model.zero_grad(set_to_none=True)
        backward()
        assert embedding.weight.grad.layout == torch.strided
    embedding.weight.requires_grad_(False)  # frozen: the decoder's backward computes no product for it
    model.zero_grad(set_to_none=True)
    products.clear()
    model(**b).loss.backward()
    assert embedding.weight.grad is None and products == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the varlen fallback's warning on a machine without flash-attn
        assert not kernels.resolve(config, FAST, torch.device("cuda"), torch.bfloat16).sparse_embedding_grad
    assert kernels.resolve(config, FAST, torch.device("cpu"), torch.float32).sparse_embedding_grad


@pytest.mark.parametrize("family", ["bert", "modernbert"])
@pytest.mark.parametrize("packed", [False, True])
def test_sparse_last_layer_matches_every_row_and_runs_on_the_heads_rows_only(family, packed):
    """The last layer past attention on the rows the heads read gives the loss, logits and every gradient of the
    last layer on every row (padding, packed documents, ModernBERT's window), and it carries exactly those rows:
    the masked ones ([CLS] first for BERT's NSP), while the layers before it carry all T real rows."""
    shape = dict(MODERN_SHAPE, pad_token_id=0, local_attention=8) if family == "modernbert" else {}
    config = BASE if family == "bert" else ModernBertConfig(**shape)
    b = batch()
    if packed:  # two documents in the first row: attention and [CLS] stay per row, keys per document
        b["document_ids"] = (torch.arange(24) >= 10).long().expand(4, 24) * b["attention_mask"]
    every_row = KernelOptions(sparse_last_layer=False)

    def step_of(options):
        torch.manual_seed(0)
        model = models.build_pretraining_model(config, options).eval()
        layers = model.bert.encoder.layer if family == "bert" else model.model.layers
        ffn_out = (lambda layer: layer.output.dense) if family == "bert" else (lambda layer: layer.mlp.Wo)
        rows = []
        for layer in layers:
            ffn_out(layer).register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
        out = model(**b)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return (out.loss, out.mlm_logits, grads), rows

    fast, fast_rows = step_of(FAST)
    plain, plain_rows = step_of(every_row)
    assert_same_step(fast, plain, rtol=1e-5, atol=1e-6)
    real, N, L = int(b["attention_mask"].sum()), len(b["masked_positions"]), len(plain_rows)
    heads_rows = N + 4 if family == "bert" else N
    assert plain_rows == [real] * L and fast_rows == [real] * (L - 1) + [heads_rows]
    no_sparse_head = KernelOptions(sparse_mlm_head=False)
    assert not kernels.resolve(config, no_sparse_head, torch.device("cpu"), torch.float32).sparse_last_layer
    assert step_of(no_sparse_head)[1] == [real] * L  # the head reads every row, so the last layer gives them all


def lookups(loss: torch.Tensor) -> dict[int, bool]:
    """Each embedding lookup in `loss`'s autograd graph: its table's row count -> whether it adds its rows into the
    tied decoder's gradient."""
    found, todo, seen = {}, [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "EmbeddingBackward0":
            found[node._saved_weight_sym_argsize_0] = False
        elif type(node).__name__ == "_TiedLookupBackward":
            found[node.shape[0]] = True
        todo.extend(next_node for next_node, _ in node.next_functions)
    return found


x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN GEMM: x86 only")


def onednn_calls(fn) -> int:
    """How many oneDNN matmuls `fn()` runs (torch.ops.mkldnn._linear_pointwise, forward and backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == "mkldnn::_linear_pointwise" for e in prof.events())


@x86
@pytest.mark.parametrize("layout", ["contiguous", "column slice", "3-D", "no rows"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_linear_against_float64(layout, with_bias):
    """fused.linear through oneDNN: output and the three gradients within float32 rounding of a float64
    recomputation, for any strides of the input, and all three products in oneDNN (the private op it relies on
    changing in a torch upgrade fails here, not silently)."""
    gen = torch.Generator().manual_seed(0)
    x = {
        "contiguous": torch.randn(37, 48, generator=gen),
        "column slice": torch.randn(37, 80, generator=gen)[:, 16:64],
        "3-D": torch.randn(3, 11, 48, generator=gen),
        "no rows": torch.randn(0, 48, generator=gen),
    }[layout].requires_grad_()
    w = torch.randn(56, 48, generator=gen).requires_grad_()
    b = torch.randn(56, generator=gen).requires_grad_() if with_bias else None
    r = torch.randn(*x.shape[:-1], 56, generator=gen)
    leaves = [t for t in (x, w, b) if t is not None]

    def run(gemm, dtype):
        args = [t.detach().to(dtype).requires_grad_() for t in leaves]
        y = fused.linear(args[0], args[1], args[2] if with_bias else None, gemm)
        (y * r.to(dtype)).sum().backward()
        return [y, *(a.grad for a in args)]

    calls = onednn_calls(lambda: run("onednn", torch.float32))
    assert calls == (0 if layout == "no rows" else 3)  # forward, input gradient, weight gradient; none is empty
    for got, want in zip(run("onednn", torch.float32), run("torch", torch.float64)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@x86
@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_onednn_gemm_carries_every_layer_product_and_is_decided_for_x86_float32(family, monkeypatch):
    """With the switch on, each of the encoder's and the MLM head's linear layers runs its forward and both
    backward products in oneDNN (values against torch's GEMM: the switch test above); off, none does. Only float32
    on an x86 CPU takes it; a torch without the op falls back with one warning."""
    config = BASE if family == "bert" else ModernBertConfig(**{**MODERN_SHAPE, "pad_token_id": 0})
    b = batch()
    for onednn, per_layer in ((True, 3 * 4), (False, 0)):  # BERT: q|k|v, attention out, intermediate, output
        model = models.build_pretraining_model(config, KernelOptions(onednn_gemm=onednn))
        calls = onednn_calls(lambda m=model: m(**b).loss.backward())
        assert calls == per_layer * config.num_hidden_layers + (3 * 2 if onednn else 0)  # + transform, decoder

    def gemm(device="cpu", dtype=torch.float32):
        return kernels.resolve(config, FAST, torch.device(device), dtype).gemm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the varlen fallback's warning on a machine without flash-attn
        assert gemm() == "onednn" and gemm("cuda") == gemm("cuda", torch.bfloat16) == "torch"
    assert gemm(dtype=torch.bfloat16) == gemm(dtype=torch.float64) == "torch"  # bf16 goes to oneDNN anyway
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert gemm() == "torch"
    monkeypatch.undo()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="onednn_gemm=true falls back to torch's GEMM"):
        assert gemm() == "torch"


def test_unpad_without_padding_and_with_dropout_in_training():
    b = batch()
    b["attention_mask"].fill_(1)  # nothing to remove: the packing is the identity
    assert_same_step(step(FAST, b), step(KernelOptions(unpad=False), b), rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    model = BertForPreTraining(BASE).train()
    losses = [model(**batch()).loss for _ in range(2)]
    assert torch.isfinite(losses[0]) and losses[0] != losses[1]  # dropout is live in training


def test_packing_round_trip():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    pack = attention.Packing.build(mask, None, kernels.FastPaths(unpad=True))
    assert pack.indices.tolist() == [0, 1, 2, 4, 8, 9, 10, 11] and pack.positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert pack.cu_seqlens.tolist() == [0, 3, 4, 8] and pack.max_len == 4
    assert pack.first_rows().tolist() == [0, 3, 4]
    assert pack.rows_of(torch.tensor([2, 9, 11])).tolist() == [2, 5, 7]
    full = torch.arange(12.0)[:, None]
    assert torch.equal(pack.pad(pack.unpad(full)).flatten(), full.flatten() * mask.flatten())


@pytest.mark.slow
def test_torch_compile_ops_match_plain():
    b = batch()
    compiled, plain = KernelOptions(fused_ops="compile"), KernelOptions(fused_ops="plain")
    assert_same_step(step(compiled, b), step(plain, b), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_varlen_attention_on_cuda_matches_padded_sdpa():
    b = batch(device="cuda")
    unpadded = dataclasses.replace(BASE, attention_dropout=0.0)  # torch's varlen kernel has no dropout
    fast = step(FAST, b, "cuda", torch.bfloat16, unpadded)
    plain = step(KernelOptions(unpad=False), b, "cuda", torch.bfloat16, unpadded)
    assert_same_step(fast, plain, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(kernels.fused_layer_norm_affine is None, reason="needs NVIDIA apex")
def test_apex_ops_match_plain_on_cuda():
    b = batch(device="cuda")
    fast = step(KernelOptions(fused_ops="apex"), b, "cuda")
    assert_same_step(fast, step(KernelOptions(fused_ops="plain"), b, "cuda"), rtol=1e-4, atol=1e-5)


ZERO_SCRIPT = """
import dataclasses, json, sys, torch
sys.path.insert(0, "tests")
from test_model_fastpaths import BASE, batch
from pretrain.runtime import engine
from pretrain import models
modern = models.load_config("modernbert-tiny", ["vocab_size=300", "hidden_size=64", "num_attention_heads=2",
                                                "local_attention=8", "pad_token_id=0"])
compiled = models.kernel_options("modernbert-tiny", ["fused_ops=compile"])
losses = {}
for family, config, options in (("bert", dataclasses.replace(BASE, hidden_dropout=0.0, attention_dropout=0.0), None),
                                ("modernbert", modern, compiled)):
    for stage in (0, 3):
        torch.manual_seed(0)
        cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "steps_per_print": 10**9}
        e = engine.initialize(models.build_pretraining_model(config, options), cfg, total_steps=3)
        losses[f"{family} {stage}"] = []
        for _ in range(3):
            loss = e(**batch()).loss
            e.backward(loss)
            e.step()
            losses[f"{family} {stage}"].append(loss.item())
print(json.dumps(losses))
"""


@pytest.mark.slow
def test_weight_reading_paths_under_zero3_train_like_stage0():
    """ZeRO-3 gathers weights per called module: the engine tells the model (set_weights_partitioned), whose
    paths that read weights outside a module call (BERT's fused QKV, compiled ops) step aside, not crash.
    Both families (ModernBERT's tied decoder too) make the losses of stage 0."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.getcwd()}
    run = subprocess.run([sys.executable, "-c", ZERO_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = json.loads(run.stdout.strip().splitlines()[-1])
    for family in ("bert", "modernbert"):
        assert losses[f"{family} 3"] == pytest.approx(losses[f"{family} 0"], rel=1e-5)
    assert "fused_qkv=true falls back" in run.stderr and "fused_ops=compile falls back" in run.stderr


def test_cpu_banded_window_matches_the_masked_window_and_skips_the_keys_outside_it(monkeypatch):
    """A sliding window over a long sequence runs in blocks of queries against the keys they reach: the same
    context and grads as the masked full square (float64), with every score it computes inside the band."""
    S, window, lengths = 700, 40, torch.tensor([700, 300, 90, 60])
    mask = (torch.arange(S) < lengths[:, None]).long()
    packed = attention.Packing.build(mask, None, kernels.FastPaths(unpad=True, attention="grouped"))
    padded = attention.Packing.build(mask, None, kernels.FastPaths(unpad=False, attention="padded", sdpa=False))
    scores = []
    core = attention._core
    count = lambda q, k, *a: (scores.append((q.shape[2], k.shape[2])), core(q, k, *a))[1]  # noqa: E731
    monkeypatch.setattr(attention, "_core", count)
    qkv = torch.randn(int(lengths.sum()), 3 * 32, dtype=torch.float64, requires_grad=True)
    banded = attention.attention(qkv, packed, 4, 0.0, window)
    (g1,) = torch.autograd.grad((banded * banded).sum(), qkv)
    block = attention.WINDOW_BLOCK
    assert scores[:6] == [(block, block + window)] + [(block, block + 2 * window)] * 4 + [(60, 60 + window)]
    assert scores[6:] == [(300, 300), (90, 90)]  # up to 3 blocks long: the masked square (90 and 60 share one)
    full = attention.attention(packed.pad(qkv), padded, 4, 0.0, window)[packed.indices]
    (g2,) = torch.autograd.grad((full * full).sum(), qkv)
    torch.testing.assert_close(banded, full)
    torch.testing.assert_close(g1, g2)


def test_cpu_varlen_groups_match_padded_attention():
    """Long sequences alone, short ones grouped (see attention.SCORE_BUDGET): same context and grads as padded SDPA."""
    S, lengths = 400, torch.tensor([400, 380, 30, 20, 10])
    assert list(attention._groups(lengths.tolist())) == [(0, 1), (1, 2), (2, 5)]
    mask = (torch.arange(S) < lengths[:, None]).long()
    packed = attention.Packing.build(mask, None, kernels.FastPaths(unpad=True, attention="grouped"))
    padded = attention.Packing.build(mask, None, kernels.FastPaths(unpad=False, attention="padded", sdpa=False))
    qkv = torch.randn(int(lengths.sum()), 3 * 32, dtype=torch.float64, requires_grad=True)
    grouped = attention.attention(qkv, packed, 4, 0.0)
    (g1,) = torch.autograd.grad((grouped * grouped).sum(), qkv)
    full = attention.attention(packed.pad(qkv), padded, 4, 0.0)[packed.indices]
    (g2,) = torch.autograd.grad((full * full).sum(), qkv)
    torch.testing.assert_close(grouped, full)
    torch.testing.assert_close(g1, g2)
