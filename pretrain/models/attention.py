"""Unpadded batches and the attention kernel over them (the paths are chosen in pretrain/models/kernels.py).

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
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.models import kernels  # read at call time: the optional packages, as resolved there
from pretrain.models.kernels import FastPaths

WINDOW_BLOCK = 128  # queries per CPU attention call when a sliding window lets a long sequence skip keys


SCORE_BUDGET = 1 << 14  # padded score entries per head in one CPU attention call (1 x 128^2, 4 x 64^2, 16 x 32^2)


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
        flash = kernels.flash_attn_varlen_func
        return flash(q, k, v, cu, cu, n, n, dropout_p, window_size=sides, deterministic=pack.paths.deterministic)
    return kernels.torch_varlen()(q, k, v, cu, cu, n, n, window_size=sides)
