"""Fast paths for pretrain/model.py, each with a plain-PyTorch fallback that tests compare it against.

- `Packing` describes an unpadded batch: the T real tokens of a (B, S) batch as rows of a (T, C) tensor.
  `Packing.from_mask(mask, unpad=False)` keeps every position, which is the plain path.
- `attention` takes packed q|k|v rows. Unpadded on CPU it runs small groups of consecutive sequences, each
  padded only to its own longest member (long sequences alone, unmasked). Unpadded on CUDA in fp16/bf16 it
  calls variable-length flash attention (the `flash-attn` package when installed, else PyTorch's
  `torch.nn.attention.varlen`, which has no dropout and so is used only when attention dropout is off).
  Otherwise it re-pads q|k|v for the score matrix only and runs batched `scaled_dot_product_attention` with
  a key mask. `use_sdpa=False` swaps SDPA for explicit softmax math everywhere but inside varlen kernels.
- `dense_gelu` and `dense_residual_norm` are the pointwise tails of BERT's linear layers. Backends:
  "plain" (F.linear with its bias, then the op: eager PyTorch's best on CPU), "compile" (the bias and
  pointwise ops as one `torch.compile`d function), "apex" (apex's fused LayerNorm; CUDA only), and "auto"
  (apex when importable and the tensors are on CUDA, else plain).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # optional CUDA packages; never required
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine
except ImportError:
    fused_layer_norm_affine = None
try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None
try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

BACKENDS = ("auto", "plain", "compile", "apex")
SCORE_BUDGET = 1 << 17  # padded score entries per head in one CPU attention call (8 x 128^2, 2 x 256^2, 1 x 362^2)


@dataclass
class Packing:
    """Where the T kept token rows of a (B, S) batch sit; `indices is None` means all B*S positions are kept."""

    batch: int
    seq_len: int
    indices: Tensor | None  # (T,) ascending flat positions of the kept tokens
    key_mask: Tensor | None  # (B, 1, 1, S) bool, True = real key; None when the batch has no padding
    cu_seqlens: Tensor  # (B + 1,) int32 row offsets of each sequence (for varlen attention)
    lengths: list[int]  # real tokens per sequence
    max_len: int  # longest real sequence

    @classmethod
    def from_mask(cls, attention_mask: Tensor, unpad: bool) -> Packing:
        """Pack the real tokens (mask == 1) when `unpad`, else keep every position."""
        B, S = attention_mask.shape
        real = attention_mask.bool()
        lengths = real.sum(1)  # (B,)
        as_list = lengths.tolist()
        has_padding = min(as_list) < S
        indices = real.flatten().nonzero().squeeze(1) if unpad and has_padding else None
        key_mask = real[:, None, None, :] if has_padding else None
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return cls(B, S, indices, key_mask, cu_seqlens, as_list, max(as_list))

    def kept_positions(self) -> Tensor:
        """(T,) flat positions of the kept tokens."""
        if self.indices is None:
            return torch.arange(self.batch * self.seq_len, device=self.cu_seqlens.device)
        return self.indices

    def pad(self, rows: Tensor) -> Tensor:
        """(T, C) kept rows -> (B*S, C), zeros at the removed positions."""
        if self.indices is None:
            return rows
        full = rows.new_zeros(self.batch * self.seq_len, rows.shape[1])
        return full.index_put((self.indices,), rows)

    def unpad(self, full: Tensor) -> Tensor:
        """(B*S, C) -> (T, C) kept rows."""
        return full if self.indices is None else full[self.indices]

    def rows_of(self, positions: Tensor) -> Tensor:
        """Row numbers of flat B*S positions; each position must be a kept (real) token."""
        return positions if self.indices is None else torch.searchsorted(self.indices, positions)

    def first_rows(self) -> Tensor:
        """(B,) rows of each sequence's first token ([CLS]; right padding assumed)."""
        starts = torch.arange(self.batch, device=self.cu_seqlens.device) * self.seq_len
        return self.rows_of(starts)


def attention(qkv: Tensor, pack: Packing, num_heads: int, dropout_p: float, use_sdpa: bool) -> Tensor:
    """(T, 3H) packed q|k|v rows -> (T, H) attention context."""
    if pack.indices is not None and not qkv.is_cuda:
        return _attention_grouped(qkv, pack, num_heads, dropout_p, use_sdpa)
    if pack.indices is not None and qkv.dtype in (torch.float16, torch.bfloat16):
        out = _varlen_attention(qkv.view(qkv.shape[0], 3, num_heads, -1), pack, dropout_p)  # (T, nh, d)
        if out is not None:
            return out.flatten(1)
    q, k, v = _split_heads(pack.pad(qkv), pack.batch, num_heads)  # (B, nh, S, d) each
    return pack.unpad(_core(q, k, v, pack.key_mask, dropout_p, use_sdpa))  # (T, H)


def _attention_grouped(qkv: Tensor, pack: Packing, num_heads: int, dropout_p: float, use_sdpa: bool) -> Tensor:
    """CPU varlen: runs of consecutive sequences share one SDPA call, padded only to their own longest member,
    while (sequences x longest^2) stays under SCORE_BUDGET; a long sequence goes alone, unmasked. Small,
    cache-sized score matrices and little padding beat one masked (B, nh, S, S) call on CPU, and grouping
    keeps the number of calls (each a thread barrier) low when the batch holds many short sequences."""
    offsets = [0, *itertools.accumulate(pack.lengths)]
    out = []
    for first, last in _groups(pack.lengths):
        rows = qkv[offsets[first] : offsets[last]]  # (sum of lengths, 3H)
        lengths = torch.tensor(pack.lengths[first:last], device=qkv.device)
        group = Packing.from_mask(torch.arange(max(pack.lengths[first:last])) < lengths[:, None], unpad=True)
        q, k, v = _split_heads(group.pad(rows), last - first, num_heads)  # (g, nh, longest, d) each
        out.append(group.unpad(_core(q, k, v, group.key_mask, dropout_p, use_sdpa)))
    return torch.cat(out)  # (T, H)


def _groups(lengths: list[int]) -> Iterator[tuple[int, int]]:
    """[first, last) runs of consecutive sequences with (last - first) * longest^2 <= SCORE_BUDGET."""
    first, longest = 0, 0
    for i, n in enumerate(lengths):
        if i > first and (i - first + 1) * max(longest, n) ** 2 > SCORE_BUDGET:
            yield first, i
            first, longest = i, 0
        longest = max(longest, n)
    yield first, len(lengths)


def _split_heads(qkv: Tensor, batch: int, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(batch * S, 3H) -> q, k, v of shape (batch, nh, S, d)."""
    return qkv.view(batch, -1, 3, num_heads, qkv.shape[1] // 3 // num_heads).permute(2, 0, 3, 1, 4)


def _core(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, dropout_p: float, use_sdpa: bool) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, nh, S, d) heads -> (B * S, H) rows."""
    if use_sdpa:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
    else:
        ctx = _plain_attention(q, k, v, key_mask, dropout_p)
    return ctx.transpose(1, 2).flatten(0, 1).flatten(1)


def _plain_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, dropout_p: float) -> Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, nh, S, S)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
    probs = F.dropout(scores.softmax(-1), dropout_p)
    return probs @ v


def _varlen_attention(qkv: Tensor, pack: Packing, dropout_p: float) -> Tensor | None:
    """CUDA: (T, 3, nh, d) -> (T, nh, d) without touching padding, or None when no varlen kernel can do it."""
    q, k, v = qkv.unbind(1)
    cu, n = pack.cu_seqlens, pack.max_len
    if flash_attn_varlen_func is not None:
        return flash_attn_varlen_func(q, k, v, cu, cu, n, n, dropout_p=dropout_p)
    if varlen_attn is not None and dropout_p == 0.0:
        return varlen_attn(q, k, v, cu, cu, n, n)
    return None


def dense_gelu(x: Tensor, dense: nn.Linear, backend: str) -> Tensor:
    """gelu(x W^T + b): BERT's intermediate layer and MLM transform."""
    if _resolve(backend, x) == "compile" and not partitioned(dense.weight):
        return _compiled(_bias_gelu)(F.linear(x, dense.weight), dense.bias)
    return F.gelu(dense(x))


def dense_residual_norm(
    x: Tensor, dense: nn.Linear, residual: Tensor, norm: nn.LayerNorm, dropout_p: float, backend: str
) -> Tensor:
    """LayerNorm(dropout(x W^T + b) + residual): BERT's attention output and layer output."""
    backend = _resolve(backend, x)
    if backend == "compile" and not partitioned(dense.weight):
        fused = _compiled(_bias_dropout_residual_norm)
        return fused(F.linear(x, dense.weight), dense.bias, residual, norm.weight, norm.bias, norm.eps, dropout_p)
    return layer_norm(F.dropout(dense(x), dropout_p) + residual, norm, backend)


def layer_norm(x: Tensor, norm: nn.LayerNorm, backend: str) -> Tensor:
    """LayerNorm over the last dimension, through apex's fused kernel when that backend is chosen."""
    if _resolve(backend, x) == "apex":
        return fused_layer_norm_affine(x, norm.weight, norm.bias, norm.normalized_shape, norm.eps)
    return norm(x)


def partitioned(weight: Tensor) -> bool:
    """True under DeepSpeed ZeRO-3, which gathers a module's weights only while that module is called: code that
    reads `module.weight` without calling the module must then take the plain path."""
    return hasattr(weight, "ds_status")


def _resolve(backend: str, x: Tensor) -> str:
    if backend == "auto":
        return "apex" if fused_layer_norm_affine is not None and x.is_cuda else "plain"
    if backend == "apex" and fused_layer_norm_affine is None:
        raise RuntimeError("fused_ops='apex' needs NVIDIA apex; install it or set fused_ops to 'auto' or 'plain'")
    return backend


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
