"""The pointwise tails of linear layers, `Linear` and the tied embedding and decoder, each on the backend the
paths chose (pretrain/models/kernels.py).

- `dense_gelu`, `dense_residual_norm`, `geglu`, `rotary` and `layer_norm` are the pointwise tails of linear
  layers. Ops backends: "plain" (eager PyTorch's best on CPU), "compile" (the bias and pointwise ops as one
  `torch.compile`d function), "apex" (apex's fused LayerNorm; CUDA only); "auto" resolves to apex on CUDA when
  importable, else plain.
- `Linear` is nn.Linear taking the GEMM the paths chose: on an x86 CPU in float32, "onednn" runs the forward
  and both backward products through oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, strided operands,
  no copies) instead of torch's BLAS. MKL, torch's BLAS, takes its AVX2 kernels on AMD CPUs; oneDNN's use
  AVX-512 there, twice the speed (docs/PERFORMANCE.md). In a model torch.compile traces, inductor chooses.
- `TiedEmbedding` and `TiedDecoder` are nn.Embedding and fused.Linear that, while a pretraining forward sets one
  `TiedGrad` on both (`sparse_embedding_grad`), build their shared weight's gradient in one buffer.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models import kernels  # read at call time: the optional packages, as resolved there
from pretrain.models.kernels import FastPaths


def rotary(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, ops: str) -> Tensor:
    """(T, 3H) q|k|v -> the same with RoPE applied to q and k (in at least float32, as transformers does)."""
    if ops == "compile":
        return _compiled(_rotary)(qkv, cos, sin, num_heads)
    return _rotary(qkv, cos, sin, num_heads)


def _rotary(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int) -> Tensor:
    T = qkv.shape[0]
    x = qkv.view(T, 3, num_heads, -1)
    qk, half = x[:, :2].to(torch.promote_types(qkv.dtype, torch.float32)), x.shape[-1] // 2  # (T, 2, nh, d)
    turned = torch.cat([-qk[..., half:], qk[..., :half]], dim=-1)  # rotate_half
    qk = qk * cos[:, None, None, :] + turned * sin[:, None, None, :]
    return torch.cat([qk.to(qkv.dtype), x[:, 2:]], dim=1).view(T, -1)


def geglu(y: Tensor, ops: str) -> Tensor:
    """(T, 2I) -> (T, I): gelu(first half) * second half (ModernBERT's MLP)."""
    return _compiled(_geglu)(y) if ops == "compile" else _geglu(y)


def _geglu(y: Tensor) -> Tensor:
    a, gate = y.chunk(2, dim=-1)
    return F.gelu(a) * gate


def dense_gelu(x: Tensor, dense: Linear, paths: FastPaths) -> Tensor:
    """gelu(x W^T + b): BERT's intermediate layer and both families' MLM transform."""
    if paths.ops == "compile" and dense.bias is not None:
        return _compiled(_bias_gelu)(linear(x, dense.weight, None, paths.gemm), dense.bias)
    return F.gelu(dense(x, paths.gemm))


def dense_residual_norm(
    x: Tensor, dense: Linear, residual: Tensor, norm: nn.LayerNorm, dropout_p: float, paths: FastPaths
) -> Tensor:
    """LayerNorm(dropout(x W^T + b) + residual): BERT's attention output and layer output."""
    if paths.ops == "compile":
        fused = _compiled(_bias_dropout_residual_norm)
        y = linear(x, dense.weight, None, paths.gemm)
        return fused(y, dense.bias, residual, norm.weight, norm.bias, norm.eps, dropout_p)
    return layer_norm(F.dropout(dense(x, paths.gemm), dropout_p) + residual, norm, paths.ops)


def layer_norm(x: Tensor, norm: nn.LayerNorm, ops: str) -> Tensor:
    """LayerNorm over the last dimension, through apex's fused kernel when that backend was chosen."""
    if ops == "apex":
        bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.weight)  # ModernBERT's norms: no bias
        return kernels.fused_layer_norm_affine(x, norm.weight, bias, norm.normalized_shape, norm.eps)
    return norm(x)


def _bias_gelu(y: Tensor, bias: Tensor) -> Tensor:
    return F.gelu(y + bias)


def _bias_dropout_residual_norm(
    y: Tensor, bias: Tensor, residual: Tensor, weight: Tensor, norm_bias: Tensor, eps: float, dropout_p: float
) -> Tensor:
    return F.layer_norm(F.dropout(y + bias, dropout_p) + residual, weight.shape, weight, norm_bias, eps)


@functools.cache
def _compiled(fn):
    """One torch.compile per function, dynamic in the token count (it changes every batch when unpadded)."""
    return torch.compile(fn, dynamic=True)


class TiedGrad:
    """The dense gradient of a vocabulary matrix that one pretraining forward uses twice, as the MLM decoder and as
    the token embedding: the decoder's backward, which runs first, leaves its product here; the embedding's
    backward adds the looked-up rows into it in place and hands autograd the sum as the weight's one gradient.
    Autograd's own sum of the two would be a second vocabulary x hidden buffer (PreTrainingModel._embedding_grad)."""

    def __init__(self) -> None:
        self.grad: Tensor | None = None

    def add(self, grad: Tensor) -> None:
        self.grad = grad if self.grad is None else self.grad.add_(grad)

    def take(self, shape: torch.Size, like: Tensor) -> Tensor:
        grad, self.grad = self.grad, None
        return like.new_zeros(shape) if grad is None else grad


class TiedEmbedding(nn.Embedding):
    """nn.Embedding whose backward, while `tied` is set, adds its rows into the tied decoder's gradient."""

    tied: TiedGrad | None = None

    def forward(self, ids: Tensor) -> Tensor:
        if self.tied is None:
            return super().forward(ids)
        return _TiedLookup.apply(ids, self.weight, self.padding_idx, self.tied)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, gemm: str) -> Tensor:
    """F.linear through the GEMM the paths chose (`FastPaths.gemm`); plain F.linear in a model torch.compile
    traces, whose products inductor chooses."""
    if gemm == "torch" or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias, gemm, None)


class Linear(nn.Linear):
    """nn.Linear whose call takes the GEMM the paths chose; called as a module, so ZeRO-3 gathers its weight."""

    def forward(self, x: Tensor, gemm: str = "torch") -> Tensor:
        return linear(x, self.weight, self.bias, gemm)


class TiedDecoder(Linear):
    """fused.Linear whose backward, while `tied` is set, leaves its weight's gradient to the tied embedding's."""

    tied: TiedGrad | None = None

    def forward(self, x: Tensor, gemm: str = "torch") -> Tensor:
        if self.tied is None:
            return super().forward(x, gemm)
        return _Linear.apply(x, self.weight, self.bias, gemm, self.tied)


def _gemm(a: Tensor, b: Tensor, gemm: str, bias: Tensor | None = None) -> Tensor:
    """a b^T (+ bias): (..., K), (N, K) -> (..., N), either operand any strides (transposed views included)."""
    if gemm == "onednn" and a.numel() and b.numel():  # (oneDNN has no product over an empty dimension)
        return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")
    return F.linear(a, b, bias)


class _Linear(torch.autograd.Function):
    """F.linear with its three products through `gemm`; with a TiedGrad, the weight's gradient is left in it."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, gemm: str, tied: TiedGrad | None) -> Tensor:
        ctx.save_for_backward(x, weight)  # the weight itself, never a view: ZeRO-3 refills it before backward
        ctx.gemm, ctx.tied, ctx.bias_dtype = gemm, tied, None if bias is None else bias.dtype
        return _gemm(x, weight, gemm, bias)  # in autocast's dtype when it is on (torch's GEMM)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        rows, dtype = grad.flatten(0, -2), grad.dtype  # (N, V) in the dtype the product was computed in
        grad_weight = None
        if ctx.needs_input_grad[1]:  # (a frozen weight gets none)
            grad_weight = _gemm(rows.t(), x.flatten(0, -2).to(dtype).t(), ctx.gemm).to(weight.dtype)  # (V, H)
            if ctx.tied is not None:  # the embedding's backward hands autograd the sum
                ctx.tied.add(grad_weight)
                grad_weight = None
        grad_x = _gemm(grad, weight.to(dtype).t(), ctx.gemm).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = rows.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, padding_idx: int | None, tied: TiedGrad) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.tied, ctx.padding_idx, ctx.shape = tied, padding_idx, weight.shape
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        ids, rows = ids.flatten(), grad.flatten(0, -2)
        if ctx.padding_idx is not None:  # as nn.Embedding: the padding row gets no gradient
            kept = ids != ctx.padding_idx
            ids, rows = ids[kept], rows[kept]
        weight_grad = ctx.tied.take(ctx.shape, rows)
        return None, weight_grad.index_add_(0, ids, rows.to(weight_grad.dtype)), None, None
