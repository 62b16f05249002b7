"""BERT pretraining samples from `PREFIX.bin/.idx/.json` datasets, masked on the fly, resumable exactly.

Public interface (the training loop codes against these names):
- `DataConfig` (pretrain.data_config): what to read and how to build samples; each field is a flag of the
  training command (`common.flags`).
- `PretrainingData(cfg)`: opens the datasets; `.vocab_size`, `.special_tokens`, `.num_samples(split)`,
  `.sample(split, epoch, index)` (unmasked), `.masked_sample(split, g)`, `.batch(split, start, size)`,
  `.loader(split, micro_batch_size, rank, world_size, consumed_samples=0, num_workers=None)`.
- `eval_batches(data, micro_batch_size, rank, world_size, max_samples)`: fixed held-out micro-batches.
- `collate(samples, pad_id)` (pretrain.loader): samples -> the batch dict of docs/DESIGN.md.

Modules: this one (the mixture, samples, loaders), pretrain.sources (one dataset), pretrain.samples (the
sample map, permutation and pair assembly), pretrain.loader (workers, per-rank batches), pretrain.data_config.

Samples follow BERT's `create_pretraining_data.py` (and Megatron's BERT dataset): sentences of a document
are gathered into chunks up to a target length (`seq_len - 3`, or with probability `short_seq_prob` a
random length in [2, seq_len - 3]); a chunk is split at a random sentence boundary into A and B; for NSP,
half the time B is replaced by a span of a random other document (label 0, else 1); the longer side is
truncated, one token at a time from a random end, until `[CLS] A [SEP] B [SEP]` fits in `seq_len`.
`pair_task="sop"` keeps B as the true continuation and swaps A and B half the time (label 0 = swapped).
`pair_task="none"` packs a chunk as one segment, `[CLS] X [SEP]`, all token types 0, and every
`nsp_labels` entry is -100, which the model treats as ignore_index (no NSP loss).

`packing=True` (with `pair_task="none"`) fills every sample to exactly `seq_len` tokens: the documents of a
split, each framed as `[CLS] doc [SEP]`, follow one another in a seeded order as one stream, which is cut every
`seq_len` tokens. A document cut at the end of a sample continues at the start of the next one (MosaicBERT's
`--concat_tokens` wrapping, so no token is dropped or padded; ModernBERT's own packer instead bins whole,
truncated documents per micro-batch and pads the rest). Unlike MosaicBERT, attention stays inside each document:
samples carry `document_ids` (0, 1, 2, ... per document piece of the row), from which the model builds one
varlen sequence per piece (`pretrain.models.attention.Packing`), with positions restarting at each.

Design choices that differ from the textbook:
- Chunk boundaries are fixed once per (dataset, split) in a compact sample map, an array of
  (document, first sentence, end sentence, target length) rows (int32) built with vectorized numpy (one pass per
  chunk *position* across all documents at once), so nothing is cached on disk and `sample()` is O(1).
  The A/B split, the NSP coin, the random document and truncation are drawn per (epoch, index): every
  epoch sees new pairs, as BERT's `dupe_factor` intended, without storing them.
- Pair chunks hold at least two sentences (a one-sentence tail joins the previous chunk, as in Megatron),
  so the NSP label is a fair coin; one-sentence documents are skipped for NSP/SOP.
- Truncation is computed in closed form (same final lengths as BERT's token-by-token loop; the number of
  tokens cut from the front is binomial), so its cost does not grow with the overflow.
- Global sample `g` is `(epoch = g // N, index = P_epoch(g % N))` where `P_epoch` is a keyed Feistel
  permutation of range(N): O(1) per sample, no per-epoch index array in memory. Masking of `g` is seeded
  by `(seed, split, g)`. Rank `r` of `W` reads micro-batch `i` = samples `consumed + (i*W + r)*B + [0, B)`,
  so resume is exact whatever the world size or number of loader workers.
- Held-out documents (`eval_fraction`, picked from the seed) never appear in train samples, not even as
  the random B of an NSP pair: each split draws its random documents from its own documents.
- Mixing weights: each epoch of N = sum of dataset sample counts gives dataset k `round(w_k * N)` slots,
  filled by walking a keyed permutation of its own samples across epochs (no sample repeats before all
  of that dataset's samples are used).
- Data is checked before step 1 (`data_prep.integrity.check`: index, checksums, recorded largest id against
  the vocabulary, a token scan) and every token a sample reads is checked again: a sample that meets a bad id
  (the `.bin` damaged after the start check, or outside the scanned blocks) is skipped with a one-line
  warning naming file and document, and global sample `g + 1` takes its place (then `g + 2`, ...). The
  choice depends only on `g` and the data, so every rank, process count and relaunch skips alike and resume
  stays exact (docs/DATA_CHECKS.md).
- Packing keeps no sample map: the stream is the split's documents in a seeded order with the running total
  of their slots (two int64 per document); sample i of a pass over the stream starts at slot `offset + i *
  seq_len` (one searchsorted), where `offset` is drawn per pass, so every pass cuts the documents elsewhere.
  The stream is circular: the last sample of a pass wraps to the first documents, and every sample is full.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.errors import UserError
from data_prep import integrity
from data_prep.indexed import expand
from pretrain.data_config import (
    MAX_SKIPPED,
    SPLITS,
    BadSample,
    DataConfig,
)
from pretrain.loader import Batches, MaskedSamples, RankBatches, collate, worker_init
from pretrain.masking import Masker
from pretrain.models.base import IGNORE_INDEX
from pretrain.samples import assemble, permute
from pretrain.sources import Source, continuation_ids, shared_tokenizer, warn_single_sentence_documents


class PretrainingData:
    """Samples, masking and loaders over one or more datasets that share a tokenizer."""

    def __init__(self, cfg: DataConfig):
        cfg.validate()
        self.cfg = cfg
        groups = [expand(name) for name in cfg.prefixes]  # each --data entry: one dataset, its shards or matches
        self._group = np.repeat(np.arange(len(groups)), [len(g) for g in groups])  # --data entry of each source
        self.sources = [Source(p, k, cfg) for k, p in enumerate(p for g in groups for p in g)]
        warn_single_sentence_documents(self.sources, cfg.pair_task)
        tok = shared_tokenizer(self.sources)
        self.tokenizer = dict(tok)  # the manifest's entry: fingerprint, ids (pretrain.identity)
        self.vocab_size = int(tok["vocab_size"])
        for src in self.sources:
            src.max_id, src.vocab_size = integrity.check(src.ds, src.manifest, self.vocab_size), self.vocab_size
        self.special_tokens = {name: int(i) for name, i in tok["special_tokens"].items()}
        words = continuation_ids(tok["path"], self.vocab_size, self.sources[0].prefix) if cfg.whole_word_mask else None
        self.maskers = {  # the held-out split is masked at its own, fixed rate (comparable across recipes)
            split: Masker(self.vocab_size, self.special_tokens["mask"], self.special_tokens.values(), p, words)
            for split, p in (("train", cfg.mask_prob), ("eval", cfg.eval_mask_prob))
        }
        self._slots = {split: self._mixture(split) for split in SPLITS}
        if self.num_samples("train") == 0:
            raise UserError(f"no training samples in {', '.join(cfg.prefixes)}; the datasets hold too little text")
        if cfg.pair_task == "nsp":
            for src in self.sources:
                for split, docs in src.split_docs.items():
                    if len(src.maps[split]) and len(docs) < 2:
                        raise UserError(
                            f"{src.prefix} has fewer than 2 {split} documents, too few for NSP; "
                            "add documents or use --pair-task sop"
                        )

    def _mixture(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(slots per dataset in one epoch, first slot of each dataset). A --data entry's weight is shared by its
        datasets (shards, glob matches) in proportion to their sizes."""
        sizes = np.array([s.num_samples(split) for s in self.sources], dtype=np.int64)
        if self.cfg.weights is None:
            counts = sizes
        else:
            entry = np.bincount(self._group, weights=sizes)[self._group]  # samples of each source's --data entry
            share = np.divide(sizes, entry, out=np.zeros(len(sizes)), where=entry > 0)
            w = np.where(sizes > 0, np.asarray(self.cfg.weights, dtype=np.float64)[self._group] * share, 0.0)
            counts = np.rint(w / w.sum() * sizes.sum()).astype(np.int64) if w.sum() > 0 else sizes * 0
        return counts, np.concatenate([[0], np.cumsum(counts)])

    def num_samples(self, split: str) -> int:
        """Samples in one epoch of `split` ("train" or "eval")."""
        return int(self._slots[_check_split(split)][1][-1])

    def global_index(self, split: str, g: int) -> tuple[int, int]:
        """`(epoch, index)` of global sample `g`: epoch-wise shuffled, O(1)."""
        n = self.num_samples(split)
        if n == 0:
            raise UserError(f"the {split} split is empty; raise --eval-fraction or add documents")
        epoch, pos = divmod(int(g), n)
        return epoch, permute(pos, n, (self.cfg.seed, SPLITS[split], epoch, 17))

    def sample(self, split: str, epoch: int, index: int) -> dict[str, np.ndarray]:
        """Unmasked sample `index` of `epoch`: `input_ids`, `token_type_ids`, `nsp_label` (int64 arrays), and with
        --packing `document_ids`."""
        counts, first = self._slots[_check_split(split)]
        if not 0 <= index < first[-1] or epoch < 0:
            raise IndexError(f"sample ({epoch}, {index}) is outside the {split} split of {first[-1]} samples per epoch")
        k = int(np.searchsorted(first, index, side="right")) - 1
        src = self.sources[k]
        n = src.num_samples(split)
        rounds, local = divmod(epoch * int(counts[k]) + index - int(first[k]), n)
        local = permute(local, n, (self.cfg.seed, k, SPLITS[split], 19))
        if self.cfg.packing:
            return src.packed(split, rounds, local, self.special_tokens)
        doc, s, e, target = (int(v) for v in src.maps[split][local])
        rng = np.random.default_rng([self.cfg.seed, SPLITS[split], epoch, index, 23])
        if self.cfg.pair_task == "none":
            a, b, label = src.tokens(s, e), None, IGNORE_INDEX
        else:
            a, b, label = self._pair(src, split, doc, s, e, target, rng)
        return assemble(a, b, label, self.cfg.seq_len, self.special_tokens, rng)

    def _pair(self, src: Source, split: str, doc: int, s: int, e: int, target: int, rng: np.random.Generator):
        """(A tokens, B tokens, label) of one chunk, before truncation."""
        cut = s + 1 + int(rng.integers(e - s - 1))
        a = src.tokens(s, cut)
        if self.cfg.pair_task == "nsp" and rng.random() < 0.5:
            return a, src.random_span(split, doc, target - len(a), rng), 0
        b = src.tokens(cut, e)
        if self.cfg.pair_task == "sop" and rng.random() < 0.5:
            return b, a, 0
        return a, b, 1

    def masked_sample(self, split: str, g: int) -> dict[str, np.ndarray]:
        """Global sample `g` of `split`, masked: adds `masked_positions` and `mlm_labels`. A damaged sample is
        skipped with a warning and the next global sample that reads cleanly takes its place."""
        for skip in range(MAX_SKIPPED):
            try:
                out = self.sample(split, *self.global_index(split, g + skip))
                break
            except BadSample as e:
                warnings.warn(
                    f"{e}; skipping {split} sample {g + skip} (sample {g + skip + 1} takes its place)", stacklevel=2
                )
        else:
            raise UserError(
                f"{MAX_SKIPPED} {split} samples in a row from {g} read damaged tokens; restore or rebuild the data"
            )
        rng = np.random.default_rng([self.cfg.seed, SPLITS[split], int(g), 29])
        out["input_ids"], out["masked_positions"], out["mlm_labels"] = self.maskers[split].mask(out["input_ids"], rng)
        return out

    def batch(self, split: str, start: int, size: int) -> dict[str, torch.Tensor]:
        """Global samples `start : start + size`, masked and collated (no worker processes)."""
        return collate([self.masked_sample(split, g) for g in range(start, start + size)], self.special_tokens["pad"])

    def loader(
        self,
        split: str,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        consumed_samples: int = 0,
        num_workers: int | None = None,
    ) -> Batches:
        """Endless masked micro-batches for `rank`; the i-th holds global samples
        `consumed_samples + (i * world_size + rank) * micro_batch_size + [0, micro_batch_size)`."""
        _check_split(split)
        self.global_index(split, 0)  # fail early on an empty split
        workers = self.cfg.num_workers if num_workers is None else num_workers
        loader = DataLoader(
            MaskedSamples(self, split),
            batch_sampler=RankBatches(micro_batch_size, rank, world_size, consumed_samples),
            num_workers=workers,
            collate_fn=functools.partial(collate, pad_id=self.special_tokens["pad"]),
            prefetch_factor=4 if workers else None,
            worker_init_fn=worker_init,
            pin_memory=torch.cuda.is_available(),
        )
        return Batches(loader)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    return split


def eval_batches(
    data: PretrainingData, micro_batch_size: int, rank: int, world_size: int, max_samples: int
) -> list[dict[str, torch.Tensor]]:
    """Held-out micro-batches for `rank`, the same on every call: the first
    `max(1, min(max_samples, eval samples) // (micro_batch_size * world_size))` steps of the eval stream."""
    n = min(max_samples, data.num_samples("eval"))
    if n <= 0:
        raise UserError("no evaluation samples; raise --eval-fraction above 0 or add documents")
    steps = max(1, n // (micro_batch_size * world_size))
    return [data.batch("eval", (i * world_size + rank) * micro_batch_size, micro_batch_size) for i in range(steps)]
