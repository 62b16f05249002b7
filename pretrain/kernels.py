"""Fast paths shared by both model families (pretrain/model.py, pretrain/modernbert.py), each with a plain-PyTorch
fallback that tests compare it against.

- `FastPaths` is every switch decided once for a device and compute dtype (`resolve`, docs/STYLE.md habit 12): an
  impossible request is a one-line UserError, a fallback one warning naming its cause; kernels only read it.
  `PathChoice` keeps the decisions of one model; under ZeRO-3 (`set_weights_partitioned`) the paths that
  read `module.weight` without calling the module are not chosen (the model knows nothing of the engine).
- `Packing` describes an unpadded batch: the T real tokens of a (B, S) batch as rows of a (T, C) tensor, cut
  into sequences: one per row, or one per document when the batch carries `document_ids` (several documents
  packed into one row attend only within themselves, and positions restart at each document).
- `attention` takes packed q|k|v rows. Unpadded on CPU it runs small groups of consecutive sequences, each
  padded only to its own longest member (long sequences alone). Unpadded on CUDA in fp16/bf16 it calls
  variable-length flash attention (the `flash-attn` package when installed, else PyTorch's
  `torch.nn.attention.varlen`, which has no dropout). Otherwise it re-pads q|k|v for the score matrix only
  and runs batched `scaled_dot_product_attention` with a mask. A sliding window (ModernBERT's local layers)
  is a `window` radius: query i sees key j when |i - j| <= window; on CPU a long sequence's window runs in
  blocks of queries against the keys they reach, so the scores outside the band are never computed.
  `use_sdpa=False` swaps SDPA for explicit softmax math everywhere but inside varlen kernels.
- `dense_gelu`, `dense_residual_norm`, `geglu`, `rotary` and `layer_norm` are the pointwise tails of linear
  layers. Ops backends: "plain" (eager PyTorch's best on CPU), "compile" (the bias and pointwise ops as one
  `torch.compile`d function), "apex" (apex's fused LayerNorm; CUDA only); "auto" resolves to apex on CUDA when
  importable, else plain.
- `Linear` is nn.Linear taking the GEMM the paths chose: on an x86 CPU in float32, "onednn" runs the forward
  and both backward products through oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, strided operands,
  no copies) instead of torch's BLAS. MKL, torch's BLAS, takes its AVX2 kernels on AMD CPUs; oneDNN's use
  AVX-512 there, twice the speed (docs/PERFORMANCE.md). In a model torch.compile traces, inductor chooses.
- `TiedEmbedding` and `TiedDecoder` are nn.Embedding and kernels.Linear that, while a pretraining forward sets one
  `TiedGrad` on both (`sparse_embedding_grad`), build their shared weight's gradient in one buffer.
"""

from __future__ import annotations

import functools
import itertools
import math
import platform
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import UserError

try:  # optional CUDA packages; never required
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine
except ImportError:
    fused_layer_norm_affine = None
try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

BACKENDS = ("auto", "plain", "compile", "apex")
WINDOW_BLOCK = 128  # queries per CPU attention call when a sliding window lets a long sequence skip keys
SCORE_BUDGET = 1 << 14  # padded score entries per head in one CPU attention call (1 x 128^2, 4 x 64^2, 16 x 32^2)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_backend(fused_ops: str) -> None:
    """Config-time check of `fused_ops` (no device needed): a one-line error for an impossible request."""
    if fused_ops not in BACKENDS:
        raise UserError(f"--model-set fused_ops must be one of {', '.join(BACKENDS)}, not {fused_ops!r}")
    if fused_ops == "apex" and fused_layer_norm_affine is None:
        raise UserError("--model-set fused_ops=apex needs NVIDIA apex, which is not installed; use auto or plain")


@dataclass(frozen=True)
class FastPaths:
    """The resolved switches of one model on one device and compute dtype."""

    unpad: bool = True  # layers run on the real tokens only
    attention: str = "grouped"  # "flash-attn varlen" | "torch varlen" | "grouped" (CPU varlen) | "padded"
    sdpa: bool = True  # scaled_dot_product_attention (False: explicit softmax) outside varlen kernels
    ops: str = "plain"  # "plain" | "compile" | "apex"
    fused_qkv: bool = True  # one GEMM on concatenated q/k/v weights (BERT; ModernBERT's Wqkv is one module)
    sparse_mlm_head: bool = True  # MLM head on masked positions only
    sparse_last_layer: bool = True  # the last layer past attention on the heads' rows only (with sparse_mlm_head)
    sparse_embedding_grad: bool = False  # the tied token embedding's gradient as rows (PreTrainingModel)
    gemm: str = "torch"  # linear layers' matrix products: "onednn" (oneDNN's matmul) | "torch" (torch's BLAS)
    deterministic: bool = False  # flash-attn's deterministic backward (ModernBERT's deterministic_flash_attn)

    def describe(self) -> dict[str, str]:
        """For the printed configuration."""
        return {
            "unpad": "real tokens only" if self.unpad else "every position",
            "attention": self.attention + (" + SDPA" if self.sdpa and "varlen" not in self.attention else ""),
            "ops": self.ops,
            "qkv": "one GEMM" if self.fused_qkv else "one per projection",
            "mlm_head": "masked positions only" if self.sparse_mlm_head else "every position",
            "last_layer": "the heads' rows past attention" if self.sparse_last_layer else "every row",
            "embedding_grad": "looked-up rows into the decoder's" if self.sparse_embedding_grad else "dense",
            "gemm": "oneDNN" if self.gemm == "onednn" else "torch",
        }


def resolve(config, device: torch.device, dtype: torch.dtype, partitioned: bool = False) -> FastPaths:
    """Decide every switch of `config` (unpad, use_sdpa, fused_ops, sparse_mlm_head, sparse_last_layer,
    sparse_embedding_grad, onednn_gemm, fused_qkv, attention_dropout) for `device` and compute `dtype`;
    `partitioned`: weights exist only while their module is called (ZeRO-3). sparse_embedding_grad is a CPU path:
    on CUDA zeroing and adding a dense vocabulary x hidden gradient costs well under a millisecond, so the
    well-trodden dense kernel stays. onednn_gemm is a float32 x86 CPU path (`_resolve_gemm`)."""
    device = torch.device(device)
    fused_qkv = getattr(config, "fused_qkv", False)
    if fused_qkv and partitioned:
        _fallback("fused_qkv=true", "the query, key and value weights")
        fused_qkv = False
    return FastPaths(
        unpad=config.unpad,
        attention=_resolve_attention(config, device, dtype),
        sdpa=config.use_sdpa,
        ops=_resolve_ops(config.fused_ops, device, partitioned),
        fused_qkv=fused_qkv,
        sparse_mlm_head=config.sparse_mlm_head,
        sparse_last_layer=config.last_layer_on_heads_rows,
        sparse_embedding_grad=config.sparse_embedding_grad and device.type == "cpu",
        gemm=_resolve_gemm(config.onednn_gemm, device, dtype),
        deterministic=getattr(config, "deterministic_flash_attn", False),
    )


def _fallback(request: str, reads: str) -> None:
    warnings.warn(
        f"--model-set {request} falls back to the plain path: it reads {reads} outside their modules, which "
        "partitioned weights (ZeRO-3) do not allow",
        stacklevel=3,
    )


def _resolve_attention(config, device: torch.device, dtype: torch.dtype) -> str:
    if not config.unpad:
        return "padded"
    if device.type != "cuda":
        return "grouped"
    if dtype not in LOW_PRECISION:
        why = f"varlen kernels need fp16 or bf16 and the model computes in {str(dtype).removeprefix('torch.')}"
    elif flash_attn_varlen_func is not None:
        return "flash-attn varlen"
    elif torch_varlen() is None:
        why = "neither flash-attn nor torch.nn.attention.varlen is available"
    elif config.attention_dropout > 0:
        why = (
            f"flash-attn is not installed and torch's varlen kernel has no dropout (attention_dropout="
            f"{config.attention_dropout}); install flash-attn or --model-set attention_dropout=0"
        )
    else:
        return "torch varlen"
    warnings.warn(
        f"unpadded attention pads each batch back for SDPA: {why}; the other layers stay unpadded", stacklevel=2
    )
    return "padded"


def _resolve_ops(backend: str, device: torch.device, partitioned: bool) -> str:
    check_backend(backend)
    if backend == "apex" and device.type != "cuda":
        raise UserError(f"--model-set fused_ops=apex needs a CUDA device, not {device.type}; use auto or plain")
    if backend in ("compile", "apex") and partitioned:
        _fallback(f"fused_ops={backend}", "linear and LayerNorm weights")
        return "plain"
    if backend == "auto":
        return "apex" if fused_layer_norm_affine is not None and device.type == "cuda" and not partitioned else "plain"
    return backend


def _resolve_gemm(onednn: bool, device: torch.device, dtype: torch.dtype) -> str:
    """oneDNN's matmul for float32 on x86 CPUs; elsewhere torch's (CUDA's cuBLAS; bf16 on CPU goes to oneDNN
    already; on ARM oneDNN's float32 GEMM may trail the platform's BLAS, and is not measured here)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if not (onednn and device.type == "cpu" and dtype == torch.float32 and x86):
        return "torch"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not torch.backends.mkldnn.is_available():
        warnings.warn(
            "--model-set onednn_gemm=true falls back to torch's GEMM: this torch build has no oneDNN matmul "
            "(torch.ops.mkldnn._linear_pointwise)",
            stacklevel=3,
        )
        return "torch"
    return "onednn"


@functools.cache
def torch_varlen():
    """torch.nn.attention.varlen.varlen_attn, or None; imported on first CUDA use (it imports torch._dynamo)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


class PathChoice:
    """The fast paths of one model, decided once per (device type, compute dtype) and then only looked up."""

    def __init__(self, config):
        self.config = config
        self.partitioned = False
        self._chosen: dict[tuple[str, torch.dtype], FastPaths] = {}

    def set_partitioned(self, partitioned: bool) -> None:
        self.partitioned = partitioned
        self._chosen.clear()

    def get(self, device: torch.device, dtype: torch.dtype) -> FastPaths:
        key = (torch.device(device).type, dtype)
        if key not in self._chosen:
            self._chosen[key] = resolve(self.config, torch.device(device), dtype, self.partitioned)
        return self._chosen[key]

    def for_input(self, input_ids: Tensor, weight: Tensor) -> FastPaths:
        """The paths of a forward pass: the input's device, autocast's dtype if on, else the weights'."""
        kind = input_ids.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
        return self.get(input_ids.device, dtype)


class FastPathsMixin:
    """`resolve_fast_paths` and `set_weights_partitioned` for a model holding its `PathChoice` as `self.paths`."""

    paths: PathChoice

    def resolve_fast_paths(self, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
        """Decide every fast path for `device` and compute `dtype` now (UserError for an impossible request, one
        warning per fallback); forward then only follows the decision. Returns it for the printed configuration."""
        return self.paths.get(device, dtype).describe()

    def set_weights_partitioned(self, partitioned: bool) -> None:
        """Weights are gathered only while their module is called (ZeRO-3): take the paths that call modules."""
        self.paths.set_partitioned(partitioned)


@dataclass
class Packing:
    """Where the T kept token rows of a (B, S) batch sit, cut into N sequences (rows or documents)."""

    batch: int
    seq_len: int
    paths: FastPaths
    real: Tensor  # (B, S) bool, True = real token
    indices: Tensor | None  # (T,) ascending flat positions of the kept rows; None = all B*S positions kept
    positions: Tensor  # (T,) position of each kept row within its sequence (restarts at each document)
    sequence_of: Tensor | None  # (B, S) sequence number of every position; None when each row is one sequence
    cu_seqlens: Tensor  # (N + 1,) int32 offsets of each sequence's real tokens (for varlen attention)
    lengths: list[int]  # real tokens per sequence
    uniform: bool  # every sequence is a whole row of S real tokens (nothing to unpad or to separate)
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, attention_mask: Tensor, document_ids: Tensor | None, paths: FastPaths) -> Packing:
        """Keep the real tokens (mask == 1) when `paths.unpad`, else every position. With `document_ids` (B, S),
        a new sequence starts wherever the id changes between neighbouring real tokens of a row."""
        B, S = attention_mask.shape
        real = attention_mask.bool()
        pos = torch.arange(S, device=real.device)
        if document_ids is None:
            sequence_of, positions, lengths = None, pos.expand(B, S), real.sum(1)
        else:
            starts = real & ((pos == 0) | (document_ids != document_ids.roll(1, dims=1)))  # (B, S)
            sequence_of = starts.flatten().cumsum(0).view(B, S) - 1
            positions = pos - torch.where(starts | (pos == 0), pos, 0).cummax(1).values
            lengths = torch.bincount(sequence_of[real], minlength=int(starts.sum()))
            if bool((starts.sum(1) == 1).all()):  # one document per row: nothing to separate
                sequence_of = None
        as_list = lengths.tolist()
        padded = sum(as_list) < B * S
        indices = real.flatten().nonzero().squeeze(1) if paths.unpad and padded else None
        positions = positions.flatten() if indices is None else positions.flatten()[indices]
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        uniform = len(as_list) == B and not padded
        return cls(B, S, paths, real, indices, positions, sequence_of, cu_seqlens, as_list, uniform)

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def kept_positions(self) -> Tensor:
        """(T,) flat positions of the kept rows."""
        if self.indices is None:
            return torch.arange(self.batch * self.seq_len, device=self.real.device)
        return self.indices

    def keep(self, flat: Tensor) -> Tensor:
        """(B*S, ...) -> (T, ...) the kept rows of a flattened batch tensor."""
        return flat if self.indices is None else flat[self.indices]

    def pad(self, rows: Tensor) -> Tensor:
        """(T, C) kept rows -> (B*S, C), zeros at the removed positions."""
        return _scatter(rows, self.indices, self.batch * self.seq_len)

    unpad = keep  # (B*S, C) -> (T, C)

    def rows_of(self, positions: Tensor) -> Tensor:
        """Row numbers of flat B*S positions; each position must be a kept (real) token."""
        return positions if self.indices is None else torch.searchsorted(self.indices, positions)

    def first_rows(self) -> Tensor:
        """(B,) rows of each batch row's first token ([CLS]; right padding assumed)."""
        starts = torch.arange(self.batch, device=self.real.device) * self.seq_len
        return self.rows_of(starts)

    def row_mean(self, x: Tensor) -> Tensor:
        """(T, H) -> (B, H): the mean over each batch row's real tokens."""
        kept = self.kept_positions()
        weight = self.keep(self.real.flatten()).to(x.dtype)[:, None]  # 0 on padding rows when nothing is unpadded
        sums = x.new_zeros(self.batch, x.shape[1]).index_add_(0, kept // self.seq_len, x * weight)
        return sums / self.real.sum(1, keepdim=True).to(x.dtype)

    def rotary(self, theta: float, dim: int) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (T, dim) float32, of RoPE with base `theta` at every kept row's position (cached)."""
        key = ("rotary", theta, dim)
        if key not in self._cache:
            inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=self.real.device, dtype=torch.float32) / dim)
            angles = self.positions.float()[:, None] * inv_freq  # (T, dim / 2)
            angles = torch.cat([angles, angles], dim=1)
            self._cache[key] = (angles.cos(), angles.sin())
        return self._cache[key]

    def padded_mask(self, window: int | None) -> Tensor | None:
        """(B, 1, 1 or S, S) bool, True = may attend, for attention over the padded (B, S) batch (cached)."""
        key = ("mask", window)
        if key not in self._cache:
            nothing = self.sequence_of is None and window is None and bool(self.real.all())
            self._cache[key] = None if nothing else _mask(self.real, self.sequence_of, window)
        return self._cache[key]


def _scatter(rows: Tensor, indices: Tensor | None, total: int) -> Tensor:
    """(T, C) rows -> (total, C) with row i at position indices[i] and zeros elsewhere."""
    if indices is None:
        return rows
    return rows.new_zeros(total, rows.shape[1]).index_put((indices,), rows)


def _mask(real: Tensor, sequence_of: Tensor | None, window: int | None) -> Tensor:
    """(n, 1, 1 or L, L) keys that query i may see: real, in its sequence, within the window. A padded query sees
    every real key, so no row is fully masked (that would give NaN, which even a zero gradient carries on)."""
    if sequence_of is None and window is None:
        return real[:, None, None, :]
    allowed = real[:, None, :]  # (n, 1, L)
    if sequence_of is not None:
        allowed = allowed & (sequence_of[:, :, None] == sequence_of[:, None, :])
    if window is not None:
        pos = torch.arange(real.shape[1], device=real.device)
        allowed = allowed & ((pos[:, None] - pos[None, :]).abs() <= window)
    return (allowed | (~real[:, :, None] & real[:, None, :]))[:, None]  # (n, 1, L, L)


def attention(qkv: Tensor, pack: Packing, num_heads: int, dropout_p: float, window: int | None = None) -> Tensor:
    """(T, 3H) packed q|k|v rows -> (T, H) attention context, each query within its sequence (and window)."""
    kind = pack.paths.attention
    if "varlen" in kind:
        T = qkv.shape[0]
        return _varlen_attention(qkv.view(T, 3, num_heads, -1), pack, dropout_p, window, kind).flatten(1)
    if kind == "grouped" and not pack.uniform:
        return _attention_grouped(qkv, pack, num_heads, dropout_p, window)
    q, k, v = _split_heads(pack.pad(qkv), pack.batch, num_heads)  # (B, nh, S, d) each
    return pack.unpad(_core(q, k, v, pack.padded_mask(window), dropout_p, pack.paths.sdpa))  # (T, H)


def _attention_grouped(qkv: Tensor, pack: Packing, num_heads: int, dropout_p: float, window: int | None) -> Tensor:
    """CPU varlen: runs of consecutive sequences share one SDPA call, padded only to their own longest member,
    while (sequences x longest^2) stays under SCORE_BUDGET; a long sequence goes alone. Small, cache-sized score
    matrices and little padding beat one masked (B, nh, S, S) call on CPU, and grouping keeps the number of
    calls (each a thread barrier) low when the batch holds many short sequences. A sliding window over a
    sequence longer than 3 x WINDOW_BLOCK runs in bands (`_banded`)."""
    offsets = [0, *itertools.accumulate(pack.lengths)]
    out = []
    for first, last in _groups(pack.lengths):
        rows = qkv[offsets[first] : offsets[last]]  # (sum of lengths, 3H)
        lengths = torch.tensor(pack.lengths[first:last], device=qkv.device)
        real = torch.arange(max(pack.lengths[first:last]), device=qkv.device) < lengths[:, None]  # (g, longest)
        indices = None if bool(real.all()) else real.flatten().nonzero().squeeze(1)
        q, k, v = _split_heads(_scatter(rows, indices, real.numel()), last - first, num_heads)  # (g, nh, L, d)
        if window is not None and last - first == 1 and real.shape[1] > 3 * WINDOW_BLOCK:
            ctx = _banded(q, k, v, window, dropout_p, pack.paths.sdpa)  # (longest, H)
        else:
            mask = None if indices is None and window is None else _mask(real, None, window)
            ctx = _core(q, k, v, mask, dropout_p, pack.paths.sdpa)  # (g * longest, H)
        out.append(ctx if indices is None else ctx[indices])
    return torch.cat(out)  # (T, H)


def _banded(q: Tensor, k: Tensor, v: Tensor, window: int, dropout_p: float, use_sdpa: bool) -> Tensor:
    """A sliding window over one long sequence, q, k, v (1, nh, L, d) -> (L, H): blocks of WINDOW_BLOCK queries,
    each against only the keys its window reaches (the block and `window` on either side), so the scores
    outside the band are never computed."""
    L, out = q.shape[2], []
    for a in range(0, L, WINDOW_BLOCK):
        b = min(a + WINDOW_BLOCK, L)
        lo, hi = max(0, a - window), min(L, b + window)
        keys = torch.arange(lo, hi, device=q.device)
        mask = (keys[None, :] - keys[a - lo : b - lo, None]).abs() <= window  # (b - a, hi - lo)
        out.append(_core(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi], mask, dropout_p, use_sdpa))
    return torch.cat(out)


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


def _core(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, use_sdpa: bool) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, nh, S, d) heads -> (B * S, H) rows."""
    if use_sdpa:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    else:
        ctx = _plain_attention(q, k, v, mask, dropout_p)
    return ctx.transpose(1, 2).flatten(0, 1).flatten(1)


def _plain_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, nh, S, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = F.dropout(scores.softmax(-1), dropout_p)
    return probs @ v


def _varlen_attention(qkv: Tensor, pack: Packing, dropout_p: float, window: int | None, kind: str) -> Tensor:
    """CUDA: (T, 3, nh, d) -> (T, nh, d) without touching padding (the kernel was chosen by `resolve`)."""
    q, k, v = qkv.unbind(1)
    cu, n = pack.cu_seqlens, pack.max_len
    sides = (-1, -1) if window is None else (window, window)
    if kind == "flash-attn varlen":
        deterministic = pack.paths.deterministic
        return flash_attn_varlen_func(q, k, v, cu, cu, n, n, dropout_p, window_size=sides, deterministic=deterministic)
    return torch_varlen()(q, k, v, cu, cu, n, n, window_size=sides)


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
        return fused_layer_norm_affine(x, norm.weight, bias, norm.normalized_shape, norm.eps)
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
    """kernels.Linear whose backward, while `tied` is set, leaves its weight's gradient to the tied embedding's."""

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
