"""Sample construction as pure functions of keys and counts (pretrain.data's docstring has the whole design).

- `permute`: a keyed Feistel permutation of range(n), O(1) per index: global sample `g` is
  `(epoch = g // N, index = P_epoch(g % N))` with no per-epoch index array in memory.
- `build_sample_map`: chunk boundaries fixed once per (dataset, split), (document, first sentence, end sentence,
  target length) rows built with vectorized numpy; `split_documents`: which documents are held out.
- `assemble`, `pair_lengths`, `truncate`: `[CLS] A [SEP] B [SEP]` with the longer side cut in closed form (the
  same final lengths as BERT's token-by-token loop).
"""

from __future__ import annotations

import functools

import numpy as np


def permute(i: int, n: int, key: tuple[int, ...]) -> int:
    """Position of `i` under a keyed pseudo-random bijection of range(n): a 4-round Feistel network on the
    smallest even number of bits that covers n, cycle-walking back into range. Plain ints: O(1), ~10 us."""
    if n <= 1:
        return i
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    low = (1 << half) - 1
    keys = _round_keys(key)
    while True:
        left, right = i >> half, i & low
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & low)
        i = (left << half) | right
        if i < n:
            return i


@functools.lru_cache(maxsize=64)
def _round_keys(key: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(k) for k in np.random.SeedSequence(list(key)).generate_state(4, np.uint64))


def _mix(v: int) -> int:
    """splitmix64 finalizer: a cheap, well-mixed 64-bit hash."""
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & _U64
    return v ^ (v >> 31)


def split_documents(num_docs: int, eval_fraction: float, key: list[int]) -> dict[str, np.ndarray]:
    """Sorted document ids of each split; the eval share is drawn from the seed (at least 2 documents
    when eval_fraction > 0, so that NSP can draw a random other document, if 2 remain for training)."""
    n_eval = int(round(eval_fraction * num_docs))
    if eval_fraction > 0 and num_docs >= 4:
        n_eval = max(n_eval, 2)
    n_eval = min(n_eval, max(num_docs - 2, 0))
    order = np.random.default_rng(key).permutation(num_docs)
    return {"train": np.sort(order[n_eval:]), "eval": np.sort(order[:n_eval])}


def build_sample_map(
    cum: np.ndarray,
    doc_index: np.ndarray,
    docs: np.ndarray,
    max_tokens: int,
    short_seq_prob: float,
    min_sentences: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(document, first sentence, end sentence, target length) of every chunk of `docs`, an (n, 4) array.

    All documents advance one chunk per iteration, so the loop runs as often as the longest document
    has chunks, each iteration vectorized over documents."""
    lo, hi = doc_index[docs], doc_index[docs + 1]
    keep = hi - lo >= min_sentences
    doc, s, end = docs[keep], lo[keep], hi[keep]
    rows = []
    while len(s):
        short = rng.random(len(s)) < short_seq_prob
        target = np.where(short, rng.integers(2, max_tokens + 1, len(s)), max_tokens)
        e = np.maximum(np.searchsorted(cum, cum[s] + target, side="left"), s + min_sentences)
        e = np.where(end - e < min_sentences, end, e)  # never leave a tail too short for a chunk
        rows.append(np.stack([doc, s, e, target], axis=1))
        more = e < end
        doc, s, end = doc[more], e[more], end[more]
    dtype = np.int32 if len(cum) < 2**31 else np.int64  # 16 bytes per sample for any realistic corpus
    if not rows:
        return np.zeros((0, 4), dtype=dtype)
    out = np.concatenate(rows)
    return out[np.argsort(out[:, 1], kind="stable")].astype(dtype)


def assemble(
    a: np.ndarray, b: np.ndarray | None, label: int, seq_len: int, special: dict[str, int], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """`[CLS] A [SEP] B [SEP]` (or `[CLS] A [SEP]`) with token types, truncated to `seq_len`."""
    cls, sep = np.array([special["cls"]]), np.array([special["sep"]])
    if b is None:
        (a,) = truncate([a], [min(len(a), seq_len - 2)], rng)
        ids = np.concatenate([cls, a, sep])
        types = np.zeros(len(ids), dtype=np.int64)
    else:
        a, b = truncate([a, b], pair_lengths(len(a), len(b), seq_len - 3), rng)
        ids = np.concatenate([cls, a, sep, b, sep])
        types = np.r_[np.zeros(len(a) + 2, dtype=np.int64), np.ones(len(b) + 1, dtype=np.int64)]
    return {"input_ids": ids.astype(np.int64), "token_type_ids": types, "nsp_label": np.array(label, dtype=np.int64)}


def pair_lengths(la: int, lb: int, max_tokens: int) -> list[int]:
    """Final lengths of BERT's `truncate_seq_pair` (cut the longer side, B on ties) in closed form."""
    excess = la + lb - max_tokens
    if excess <= 0:
        return [la, lb]
    if la - lb >= excess:
        return [la - excess, lb]
    if lb - la >= excess:
        return [la, lb - excess]
    return [max_tokens - max_tokens // 2, max_tokens // 2]


def truncate(parts: list[np.ndarray], keep: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Cut each part to its length, each token from the front or the back with probability 1/2."""
    out = []
    for x, n in zip(parts, keep):
        front = int(rng.binomial(len(x) - n, 0.5)) if len(x) > n else 0
        out.append(x[front : front + n])
    return out


_U64 = (1 << 64) - 1
