"""The contrastive loss (InfoNCE over in-batch and hard negatives) and gradient caching.

Design choices:
- Scores are cosine similarities divided by the temperature (sentence-transformers' MultipleNegativesRankingLoss
  with scale = 1 / temperature; tests check ours against it). Candidates are every passage of the batch: the
  positives first, then the hard negatives, so query i's positive is column i.
- False negatives are masked, not scored: a candidate whose text equals row i's positive, or an in-batch
  positive whose query equals query i, is another correct answer, and scoring it as a negative would push the
  model away from it. Texts are compared by a stable 56-bit hash (`text_keys`), which crosses ranks.
- Symmetric: the mean of the query->passage loss and the passage->query loss (each positive against every
  query of the batch), as sentence-transformers' symmetric variant.
- Across ranks the embeddings are gathered and every rank computes the loss of the whole global batch; the
  gathered copy carries gradient into this rank's own rows only (`pretrain.runtime.dist.all_gather_with_local_grad`).
  The engine averages gradients over ranks, so the caller multiplies the loss by the world size to get the
  gradient of the global loss itself.
- GradCache (Gao et al. 2021): the embeddings of a large batch are computed in chunks without a graph, the loss
  and its gradient with respect to those embeddings are taken on the whole batch, then each chunk is run again
  with a graph and back-propagates its slice of that gradient. Each chunk's random state (dropout) is recorded
  on the first pass and restored for the second, so both passes see the same network.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def text_keys(texts: Sequence[str]) -> Tensor:
    """(N,) int64 stable hashes of the texts (equal texts, equal keys, on every rank and run)."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=7).digest(), "little") for t in texts])


def false_negative_mask(query_keys: Tensor, passage_keys: Tensor) -> Tensor:
    """(B, P) bool, True where column j is another correct answer for query i (never the diagonal).
    passage_keys: (P,) positives (the first B) then hard negatives."""
    b = query_keys.shape[0]
    same_text = passage_keys[None, :] == passage_keys[:b, None]  # (B, P)
    same_query = torch.zeros_like(same_text)
    same_query[:, :b] = query_keys[None, :] == query_keys[:, None]
    mask = same_text | same_query
    mask[:, :b].fill_diagonal_(False)
    return mask


def info_nce(
    queries: Tensor,
    passages: Tensor,
    temperature: float,
    symmetric: bool = False,
    mask: Tensor | None = None,
) -> Tensor:
    """queries (B, H), passages (P, H) with P >= B, row i's positive at passages[i]; mask (B, P) True = leave out.
    -> the mean cross-entropy of each query's positive among its candidates (and, symmetric, of each positive's
    query among the queries, averaged with it)."""
    dtype = torch.promote_types(queries.dtype, torch.float32)  # bf16/fp16 embeddings: the scores in fp32
    q, p = F.normalize(queries.to(dtype), dim=-1), F.normalize(passages.to(dtype), dim=-1)
    scores = q @ p.T / temperature  # (B, P)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    labels = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(scores, labels)
    if symmetric:  # (B, B): positive j against every query; the same masked pairs are left out
        loss = (loss + F.cross_entropy(scores[:, : q.shape[0]].T, labels)) / 2
    return loss


def rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def grad_cache(
    forward: Callable[[object], tuple[Tensor, ...]],
    chunks: Sequence[object],
    loss_fn: Callable[[list[tuple[Tensor, ...]]], Tensor],
    backward: Callable[[Tensor], None],
    loss_scale: float = 1.0,
) -> Tensor:
    """One GradCache step. `forward(chunk)` -> that chunk's embedding tensors; `loss_fn(per-chunk embeddings)` ->
    the loss of the whole batch; `backward(surrogate)` back-propagates one chunk's re-run (the engine's backward
    and step, so gradients accumulate over the chunks). `loss_scale` multiplies the loss's gradient (the world
    size across ranks). Returns the loss, detached."""
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(rng_state())
            cached.append(tuple(e.detach().requires_grad_() for e in forward(chunk)))
    loss = loss_fn(cached)
    (loss * loss_scale).backward()
    after = rng_state()
    for chunk, state, leaves in zip(chunks, states, cached):
        set_rng_state(state)
        embeddings = forward(chunk)
        backward(sum((e * leaf.grad.to(e.dtype)).sum() for e, leaf in zip(embeddings, leaves)))
    set_rng_state(after)
    return loss.detach()
