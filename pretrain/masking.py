"""Dynamic MLM masking of one sample, applied when batches are made (never baked into the data).

`Masker(...).mask(input_ids, rng)` picks `mask_prob` of the maskable tokens (at least one) and
returns the corrupted ids plus the positions and original ids that carry an MLM label. Of the picked
tokens 80% become `[MASK]`, 10% a random id and 10% stay as they are (BERT's recipe).

Design choices:
- Maskable means "not a special token": `[CLS]`, `[SEP]`, `[PAD]` and `[MASK]` are never picked, and a
  random replacement is never a special id, so the model is not taught to predict or emit them.
- The number of picked tokens is `max(1, round(mask_prob * maskable))`, counted on the maskable tokens
  (the original counts `[CLS]`/`[SEP]` too, which over-masks short samples).
- Whole-word masking groups a token with the continuations that follow it. Words are taken in a
  random order and a word that would overshoot the budget is skipped (as in BERT's
  `create_masked_lm_predictions`); the 80/10/10 choice stays per token, as there and in Hugging Face.
  It works on the ids alone, so it composes with NSP/SOP pairs (Hugging Face's collator does not).
  What continues a word comes from the pieces (`continuation_flags`): WordPiece marks continuations
  (`##`), byte-level BPE and SentencePiece mark word starts (`Ġ`, `▁`, or a whitespace byte), so there a
  word is what lies between whitespace, punctuation included (`dog.` is one word); a sentence's first
  word, which has no space before it, joins the token before it unless that is a special token.
  Tokenizers whose pieces show neither are refused where the flags are built (data_prep.words.word_pieces).
- Randomness comes only from the `rng` argument: the caller seeds it from `(seed, split, global
  sample index)`, which makes masking reproducible across world sizes, workers and resumes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def continuation_flags(
    tokens: Sequence[str | None], vocab_size: int, marks: tuple[str, ...], marks_start: bool
) -> np.ndarray:
    """Boolean array over ids: True where token `tokens[id]` continues the word before it.

    `marks_start=False`: pieces starting with one of `marks` continue a word (WordPiece `##`); `True`: pieces
    starting with one of `marks` start one and all others continue one (byte-level BPE `Ġ`, SentencePiece
    `▁`; no marks: every token is a word). A None token (an added token) is a word of its own.
    """
    flags = np.zeros(vocab_size, dtype=bool)
    n = min(len(tokens), vocab_size)
    if marks_start:
        flags[:n] = [t is not None and bool(marks) and not t.startswith(marks) for t in tokens[:n]]
    else:
        flags[:n] = [t is not None and t.startswith(marks) for t in tokens[:n]]
    return flags


class Masker:
    """Masks samples of one vocabulary; build once, call `mask` per sample."""

    def __init__(
        self,
        vocab_size: int,
        mask_id: int,
        special_ids: Iterable[int],
        mask_prob: float = 0.15,
        continuation: np.ndarray | None = None,
    ):
        """`continuation[id]` is True for `##` pieces; pass it to enable whole-word masking."""
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.mask_id = int(mask_id)
        self.mask_prob = float(mask_prob)
        self.special = np.zeros(vocab_size, dtype=bool)
        self.special[[int(i) for i in special_ids]] = True
        self.special[self.mask_id] = True
        self.random_ids = np.flatnonzero(~self.special)  # replacement candidates
        self.continuation = None if continuation is None else np.asarray(continuation, dtype=bool)

    @property
    def whole_word(self) -> bool:
        return self.continuation is not None

    def mask(self, input_ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return `(masked_ids, positions, labels)`: positions ascending, labels the original ids there."""
        ids = np.asarray(input_ids, dtype=np.int64)
        maskable = ~self.special[ids]
        budget = max(1, int(round(self.mask_prob * int(maskable.sum()))))
        if self.whole_word:
            positions = self._pick_words(ids, maskable, budget, rng)
        else:
            positions = np.sort(rng.permutation(np.flatnonzero(maskable))[:budget])
        labels = ids[positions]
        masked = ids.copy()
        action = rng.random(len(positions))
        masked[positions[action < 0.8]] = self.mask_id
        swap = positions[(action >= 0.8) & (action < 0.9)]
        masked[swap] = self.random_ids[rng.integers(0, len(self.random_ids), len(swap))]
        return masked, positions, labels

    def _pick_words(self, ids: np.ndarray, maskable: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
        """Positions of whole words, in a random word order, skipping words that overshoot `budget`."""
        cand = np.flatnonzero(maskable)
        if len(cand) == 0:
            return cand
        # A candidate continues the previous word when it is a `##` piece right after another candidate.
        joins = self.continuation[ids[cand]] & np.r_[False, np.diff(cand) == 1]
        word_of = np.cumsum(~joins) - 1
        bounds = np.flatnonzero(np.r_[True, word_of[1:] != word_of[:-1], True])
        picked: list[int] = []
        total = 0
        order = rng.permutation(len(bounds) - 1)
        for w in order:
            size = bounds[w + 1] - bounds[w]
            if total + size > budget:
                continue
            picked.append(w)
            total += size
            if total == budget:
                break
        if not picked:  # every word is longer than the budget: mask one whole word anyway
            picked.append(order[0])
        return np.sort(np.concatenate([cand[bounds[w] : bounds[w + 1]] for w in picked]))
