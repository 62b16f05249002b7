"""BERT pretraining samples from `PREFIX.bin/.idx/.json` datasets, masked on the fly, resumable exactly.

Public interface (the training loop codes against these names):
- `DataConfig`: what to read and how to build samples; each field is a flag of the training command
  (`common.flags`).
- `PretrainingData(cfg)`: opens the datasets; `.vocab_size`, `.special_tokens`, `.num_samples(split)`,
  `.sample(split, epoch, index)` (unmasked), `.masked_sample(split, g)`, `.batch(split, start, size)`,
  `.loader(split, micro_batch_size, rank, world_size, consumed_samples=0, num_workers=None)`.
- `eval_batches(data, micro_batch_size, rank, world_size, max_samples)`: fixed held-out micro-batches.
- `collate(samples, pad_id)`: samples -> the batch dict of docs/DESIGN.md.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from common.errors import UserError
from common.flags import option
from data_prep import integrity
from data_prep.indexed import IndexedDataset, expand
from data_prep.indexed import exists as dataset_exists
from pretrain.masking import Masker, continuation_flags

SPLITS = {"train": 0, "eval": 1}
PairTask = Literal["nsp", "sop", "none"]
PAIR_TASKS = get_args(PairTask)
IGNORE_INDEX = -100
_REQUIRED_SPECIALS = ("pad", "cls", "sep", "mask")
_U64 = (1 << 64) - 1
MAX_SKIPPED = 64  # consecutive damaged samples after which the data is declared unusable


class BadSample(UserError):
    """A sample reads a token id outside the dataset's ids (damaged `.bin`); the message names file and document."""


@dataclass
class DataConfig:
    """How pretraining samples are read, paired and masked."""

    prefixes: list[str] = option(flag="--data", metavar="PREFIX")
    """Datasets from `bert-prep build`, one PREFIX (PREFIX.bin/.idx/.json) each; a PREFIX written with --shards
    stands for all its shards PREFIX_00000 ..., and a quoted glob ('data/*') for every dataset it matches."""
    weights: list[float] | None = option(None, flag="--data-weights", metavar="W")
    """Mixing weight per --data entry (shards or glob matches share theirs by size); default: in proportion to
    each dataset's size."""
    seq_len: int = 128
    """Maximum tokens per sample, [CLS] and [SEP] included."""
    short_seq_prob: float = 0.1
    """Share of samples that target a random shorter length."""
    pair_task: PairTask = "nsp"
    """Sentence-pair task: nsp, sop (sentence order) or none (MLM only, packed segments)."""
    mask_prob: float = 0.15
    """Share of non-special tokens given an MLM label."""
    whole_word_mask: bool = False
    """Mask a word and its ## pieces together."""
    packing: bool = False
    """Fill every sample to --seq-len with `[CLS] doc [SEP]` of consecutive documents, each attending only to
    itself; a document cut at a sample's end continues in the next (needs --pair-task none)."""
    eval_fraction: float = 0.01
    """Share of documents held out for evaluation, chosen from the seed."""
    seed: int = 1234
    """Seed of the weights, samples, masks and dropout."""
    num_workers: int = 2
    """Loader worker processes per rank; 0 builds batches in the training process."""

    def validate(self) -> None:
        """Raise UserError naming the flag to change when a field is out of range."""
        if not self.prefixes:
            raise UserError("no dataset given; pass at least one PREFIX with --data")
        if self.weights is not None:
            if len(self.weights) != len(self.prefixes):
                raise UserError(
                    f"--data-weights has {len(self.weights)} values for {len(self.prefixes)} --data prefixes"
                )
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise UserError("--data-weights must be non-negative with a positive sum")
        if self.seq_len < 8:
            raise UserError(f"--seq-len {self.seq_len} is too short for [CLS] A [SEP] B [SEP]; use at least 8")
        if self.pair_task not in PAIR_TASKS:
            raise UserError(f"--pair-task {self.pair_task!r} is unknown; use one of {', '.join(PAIR_TASKS)}")
        if self.packing and self.pair_task != "none":
            raise UserError(
                f"--packing fills samples with whole documents, which leaves no sentence pairs for --pair-task "
                f"{self.pair_task}; add --pair-task none"
            )
        if not 0.0 < self.mask_prob < 1.0:
            raise UserError(f"--mask-prob {self.mask_prob} must be between 0 and 1 (exclusive)")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise UserError(f"--short-seq-prob {self.short_seq_prob} must be between 0 and 1")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"--eval-fraction {self.eval_fraction} must be in [0, 1)")
        if self.seed < 0:
            raise UserError(f"--seed {self.seed} must be 0 or more")
        if self.num_workers < 0:
            raise UserError(f"--num-workers {self.num_workers} must be 0 or more")


class _Source:
    """One dataset: sentence offsets, the document split and a sample map per split."""

    def __init__(self, prefix: str, k: int, cfg: DataConfig):
        if not dataset_exists(prefix):
            raise UserError(f"dataset {prefix}.bin/.idx not found; pass the PREFIX written by `bert-prep build`")
        self.prefix = prefix
        self.ds = IndexedDataset(prefix)
        self.manifest = self.ds.manifest
        integrity.check_index(self.ds)  # before any map is built from the index
        self.max_id = self.vocab_size = np.iinfo(self.ds.dtype).max  # until `integrity.check` knows the vocabulary
        self.signed = self.ds.dtype.kind == "i"
        lengths = self.ds.sequence_lengths.astype(np.int64)
        self.cum = np.concatenate([[0], np.cumsum(lengths)])  # tokens before sentence i
        self.start = self.ds.sequence_pointers // self.ds.dtype.itemsize  # first token of sentence i
        self.docs = self.ds.document_indices.astype(np.int64)
        self.split_docs = _split_documents(self.ds.num_documents, cfg.eval_fraction, [cfg.seed, k, 11])
        self.seq_len, self.key = cfg.seq_len, (cfg.seed, k)
        if cfg.packing:
            self.maps = {}
            self.streams = {
                split: self._stream(docs, np.random.default_rng([cfg.seed, k, SPLITS[split], 37]))
                for split, docs in self.split_docs.items()
            }
            return
        pair = cfg.pair_task != "none"
        max_tokens = cfg.seq_len - (3 if pair else 2)
        self.maps = {
            split: _build_sample_map(
                self.cum,
                self.docs,
                docs,
                max_tokens,
                cfg.short_seq_prob,
                2 if pair else 1,
                np.random.default_rng([cfg.seed, k, SPLITS[split], 13]),
            )
            for split, docs in self.split_docs.items()
        }

    def _stream(self, docs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(documents in stream order, slot offsets: document j fills slots [ends[j], ends[j + 1]))."""
        order = rng.permutation(docs)
        slots = self.cum[self.docs[order + 1]] - self.cum[self.docs[order]] + 2  # [CLS] doc [SEP]
        return order, np.concatenate([[0], np.cumsum(slots)])

    def num_samples(self, split: str) -> int:
        """Samples in one pass over this dataset's `split`."""
        if split in self.maps:
            return len(self.maps[split])
        return -(-int(self.streams[split][1][-1]) // self.seq_len)

    def packed(self, split: str, rounds: int, index: int, special: dict[str, int]) -> dict[str, np.ndarray]:
        """Sample `index` of pass `rounds`: `seq_len` slots of the circular stream (all of it when shorter), from
        an offset drawn per pass; `document_ids` numbers the document pieces of the row 0, 1, 2, ..."""
        order, ends = self.streams[split]
        total = int(ends[-1])
        offset = int(np.random.default_rng([*self.key, SPLITS[split], rounds, 31]).integers(self.seq_len))
        pos, need = (offset + index * self.seq_len) % total, min(self.seq_len, total)
        j = int(np.searchsorted(ends, pos, side="right")) - 1
        ids, pieces = [], []
        while need:
            take = min(need, int(ends[j + 1]) - pos)
            ids.append(self._framed(int(order[j]), pos - int(ends[j]), take, special))
            pieces.append(take)
            need, pos, j = need - take, pos + take, j + 1
            if j == len(order):
                j, pos = 0, 0
        input_ids = np.concatenate(ids)
        return {
            "input_ids": input_ids,
            "token_type_ids": np.zeros(len(input_ids), dtype=np.int64),
            "nsp_label": np.array(IGNORE_INDEX, dtype=np.int64),
            "document_ids": np.repeat(np.arange(len(pieces), dtype=np.int64), pieces),
        }

    def _framed(self, doc: int, start: int, length: int, special: dict[str, int]) -> np.ndarray:
        """Slots [start, start + length) of `[CLS] tokens of doc [SEP]`."""
        s, e = int(self.docs[doc]), int(self.docs[doc + 1])
        n, end = int(self.cum[e] - self.cum[s]), start + length
        parts = [np.array([special["cls"]])] if start == 0 else []
        lo, hi = max(start - 1, 0), min(end - 1, n)
        parts.append(self._checked(int(self.start[s]) + lo, max(hi - lo, 0)).astype(np.int64))
        if end == n + 2:
            parts.append(np.array([special["sep"]]))
        return np.concatenate(parts)

    def tokens(self, s: int, e: int) -> np.ndarray:
        """Token ids of sentences [s, e) of this dataset, one contiguous view; BadSample on a damaged id."""
        return self._checked(int(self.start[s]), int(self.cum[e] - self.cum[s]))

    def _checked(self, first: int, count: int) -> np.ndarray:
        """Tokens `first : first + count` of `.bin`, every id checked against the dataset's ids."""
        tokens = self.ds.tokens[first : first + count]
        if count and (int(tokens.max()) > self.max_id or (self.signed and int(tokens.min()) < 0)):
            at = first + int(np.argmax((tokens > self.max_id) | (tokens < 0)))
            raise BadSample(integrity.bad_token_message(self.ds, at, self.max_id, self.vocab_size))
        return tokens

    def random_span(self, split: str, doc: int, want: int, rng: np.random.Generator) -> np.ndarray:
        """Sentences from a random start in a random other document of `split`, up to `want` tokens."""
        docs = self.split_docs[split]
        r = int(rng.integers(len(docs) - 1))
        r += r >= int(np.searchsorted(docs, doc))
        other = int(docs[r])
        lo, hi = int(self.docs[other]), int(self.docs[other + 1])
        s = int(rng.integers(lo, hi))
        e = int(np.searchsorted(self.cum, self.cum[s] + max(want, 1), side="left"))
        return self.tokens(s, min(max(e, s + 1), hi))


class PretrainingData:
    """Samples, masking and loaders over one or more datasets that share a tokenizer."""

    def __init__(self, cfg: DataConfig):
        cfg.validate()
        self.cfg = cfg
        groups = [expand(name) for name in cfg.prefixes]  # each --data entry: one dataset, its shards or matches
        self._group = np.repeat(np.arange(len(groups)), [len(g) for g in groups])  # --data entry of each source
        self.sources = [_Source(p, k, cfg) for k, p in enumerate(p for g in groups for p in g)]
        _warn_single_sentence_documents(self.sources, cfg.pair_task)
        tok = _shared_tokenizer(self.sources)
        self.tokenizer = dict(tok)  # the manifest's entry: fingerprint, ids (pretrain.identity)
        self.vocab_size = int(tok["vocab_size"])
        for src in self.sources:
            src.max_id, src.vocab_size = integrity.check(src.ds, src.manifest, self.vocab_size), self.vocab_size
        self.special_tokens = {name: int(i) for name, i in tok["special_tokens"].items()}
        self.masker = Masker(
            self.vocab_size,
            self.special_tokens["mask"],
            self.special_tokens.values(),
            cfg.mask_prob,
            _continuation_ids(tok["path"], self.vocab_size, self.sources[0].prefix) if cfg.whole_word_mask else None,
        )
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
        return _assemble(a, b, label, self.cfg.seq_len, self.special_tokens, rng)

    def _pair(self, src: _Source, split: str, doc: int, s: int, e: int, target: int, rng: np.random.Generator):
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
        out["input_ids"], out["masked_positions"], out["mlm_labels"] = self.masker.mask(out["input_ids"], rng)
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
            _MaskedSamples(self, split),
            batch_sampler=_RankBatches(micro_batch_size, rank, world_size, consumed_samples),
            num_workers=workers,
            collate_fn=functools.partial(collate, pad_id=self.special_tokens["pad"]),
            prefetch_factor=4 if workers else None,
            worker_init_fn=_worker_init,
            pin_memory=torch.cuda.is_available(),
        )
        return Batches(loader)


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


def collate(samples: Sequence[dict[str, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; masked positions become flat row-major indices into (B, S); packed
    samples also give `document_ids` (0 on padding)."""
    lengths = [len(x["input_ids"]) for x in samples]
    b, s = len(samples), max(lengths)
    input_ids = np.full((b, s), pad_id, dtype=np.int64)
    token_type_ids = np.zeros((b, s), dtype=np.int64)
    attention_mask = np.zeros((b, s), dtype=np.int64)
    packed = "document_ids" in samples[0]
    document_ids = np.zeros((b, s), dtype=np.int64) if packed else None
    for row, (x, n) in enumerate(zip(samples, lengths)):
        input_ids[row, :n] = x["input_ids"]
        token_type_ids[row, :n] = x["token_type_ids"]
        attention_mask[row, :n] = 1
        if packed:
            document_ids[row, :n] = x["document_ids"]
    batch = {
        "input_ids": torch.from_numpy(input_ids),  # (B, S)
        "token_type_ids": torch.from_numpy(token_type_ids),  # (B, S)
        "attention_mask": torch.from_numpy(attention_mask),  # (B, S)
        "masked_positions": torch.from_numpy(
            np.concatenate([row * s + x["masked_positions"] for row, x in enumerate(samples)]).astype(np.int64)
        ),  # (N,)
        "mlm_labels": torch.from_numpy(np.concatenate([x["mlm_labels"] for x in samples]).astype(np.int64)),  # (N,)
        "nsp_labels": torch.tensor([int(x["nsp_label"]) for x in samples], dtype=torch.long),  # (B,)
    }
    if packed:
        batch["document_ids"] = torch.from_numpy(document_ids)  # (B, S)
    return batch


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


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    return split


def _split_documents(num_docs: int, eval_fraction: float, key: list[int]) -> dict[str, np.ndarray]:
    """Sorted document ids of each split; the eval share is drawn from the seed (at least 2 documents
    when eval_fraction > 0, so that NSP can draw a random other document, if 2 remain for training)."""
    n_eval = int(round(eval_fraction * num_docs))
    if eval_fraction > 0 and num_docs >= 4:
        n_eval = max(n_eval, 2)
    n_eval = min(n_eval, max(num_docs - 2, 0))
    order = np.random.default_rng(key).permutation(num_docs)
    return {"train": np.sort(order[n_eval:]), "eval": np.sort(order[:n_eval])}


def held_out_documents(prefix: str, eval_fraction: float, seed: int, k: int = 0) -> np.ndarray:
    """Sorted ids of the documents of `prefix` (the k-th --data prefix) that pretraining with this --eval-fraction
    and --seed holds out: never in a training sample, so downstream tasks built from them see unseen text."""
    return _split_documents(IndexedDataset(prefix).num_documents, eval_fraction, [seed, k, 11])["eval"]


def _build_sample_map(
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


def _assemble(
    a: np.ndarray, b: np.ndarray | None, label: int, seq_len: int, special: dict[str, int], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """`[CLS] A [SEP] B [SEP]` (or `[CLS] A [SEP]`) with token types, truncated to `seq_len`."""
    cls, sep = np.array([special["cls"]]), np.array([special["sep"]])
    if b is None:
        (a,) = _truncate([a], [min(len(a), seq_len - 2)], rng)
        ids = np.concatenate([cls, a, sep])
        types = np.zeros(len(ids), dtype=np.int64)
    else:
        a, b = _truncate([a, b], _pair_lengths(len(a), len(b), seq_len - 3), rng)
        ids = np.concatenate([cls, a, sep, b, sep])
        types = np.r_[np.zeros(len(a) + 2, dtype=np.int64), np.ones(len(b) + 1, dtype=np.int64)]
    return {"input_ids": ids.astype(np.int64), "token_type_ids": types, "nsp_label": np.array(label, dtype=np.int64)}


def _pair_lengths(la: int, lb: int, max_tokens: int) -> list[int]:
    """Final lengths of BERT's `truncate_seq_pair` (cut the longer side, B on ties) in closed form."""
    excess = la + lb - max_tokens
    if excess <= 0:
        return [la, lb]
    if la - lb >= excess:
        return [la - excess, lb]
    if lb - la >= excess:
        return [la, lb - excess]
    return [max_tokens - max_tokens // 2, max_tokens // 2]


def _truncate(parts: list[np.ndarray], keep: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Cut each part to its length, each token from the front or the back with probability 1/2."""
    out = []
    for x, n in zip(parts, keep):
        front = int(rng.binomial(len(x) - n, 0.5)) if len(x) > n else 0
        out.append(x[front : front + n])
    return out


def _shared_tokenizer(sources: list[_Source]) -> dict:
    """The manifests' tokenizer entry, which every dataset must share."""
    first = None
    for src in sources:
        tok = src.manifest.get("tokenizer")
        if not tok or "special_tokens" not in tok or "vocab_size" not in tok:
            raise UserError(f"{src.prefix}.json has no tokenizer entry; rebuild the dataset with `bert-prep build`")
        missing = [name for name in _REQUIRED_SPECIALS if name not in tok["special_tokens"]]
        if missing:
            raise UserError(f"{src.prefix}.json names no {'/'.join(missing)} token id; rebuild the dataset")
        ident = (tok.get("sha256") or tok.get("path"), tok["vocab_size"], tok["special_tokens"])
        if first is None:
            first = (src.prefix, ident, tok)
        elif ident != first[1]:
            raise UserError(
                f"{src.prefix} and {first[0]} were built with different tokenizers; "
                "rebuild them with one vocabulary or train on them separately"
            )
    return first[2]


def _warn_single_sentence_documents(sources: list[_Source], pair_task: str) -> None:
    """NSP/SOP pairs need two sentences of one document: warn when most documents of a dataset hold one
    (one-sentence-per-row data read with `--doc-boundary row`), since those documents never train."""
    if pair_task == "none":
        return
    for src in sources:
        sizes = np.diff(src.docs)
        single = int((sizes == 1).sum())
        if single > 0.5 * len(sizes):
            warnings.warn(
                f"{single:,} of the {len(sizes):,} documents of {src.prefix} ({single / len(sizes):.0%}) are a "
                f"single sentence, which --pair-task {pair_task} skips (a pair needs two sentences of one "
                "document); pass --pair-task none, or rebuild the data with `bert-prep build --doc-boundary file` "
                "(or blank) if its documents were cut too finely",
                stacklevel=3,
            )


def _continuation_ids(path: str, vocab_size: int, prefix: str) -> np.ndarray:
    """Boolean array over ids: True for pieces that continue a word (WordPiece `##`, or no `Ġ`/`▁` start in
    BPE/Unigram; see masking.continuation_flags), read from the tokenizer the manifest names."""
    from data_prep.tokenizer import word_pieces

    candidates = [Path(path), Path(prefix).parent / path]
    try:
        tokens, mark, marks_start = word_pieces(next((str(p) for p in candidates if p.exists()), path))
    except UserError as e:
        raise UserError(f"--whole-word-mask: {e} (the tokenizer named in {prefix}.json)") from e
    return continuation_flags(tokens, vocab_size, mark, marks_start)


def _worker_init(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the training process, which stops at a micro-batch boundary and saves,
    and die with it when it dies (torch's own check of the parent runs only every few seconds)."""
    import signal

    from pretrain.runtime.dist import die_with_parent

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


class Batches(Iterator):
    """An endless stream of micro-batches whose loader workers end with `close()`.

    The workers ignore SIGTERM (see `_worker_init`), so the `terminate()` with which Python's exit joins child
    processes does not end them: a rank leaving by an exception would wait on them forever. `close()` (the
    training loop calls it on every way out) stops them through the loader's own shutdown.
    """

    def __init__(self, loader: DataLoader):
        self._it = iter(loader)

    def __next__(self) -> dict[str, torch.Tensor]:
        return next(self._it)

    def close(self) -> None:
        shutdown = getattr(self._it, "_shutdown_workers", None)  # absent without workers (num_workers=0)
        if shutdown is not None:
            shutdown()


class _MaskedSamples(Dataset):
    """Map-style view of one split's masked samples, indexed by global sample number."""

    def __init__(self, data: PretrainingData, split: str):
        self.data, self.split = data, split

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        return self.data.masked_sample(self.split, g)


class _RankBatches(Sampler):
    """Endless global sample numbers of one rank's micro-batches, starting after `consumed` samples."""

    def __init__(self, micro_batch_size: int, rank: int, world_size: int, consumed: int):
        if not 0 <= rank < world_size or micro_batch_size < 1:
            raise ValueError(f"bad rank {rank} / world size {world_size} / micro-batch {micro_batch_size}")
        self.size, self.rank, self.world, self.consumed = micro_batch_size, rank, world_size, consumed

    def __iter__(self) -> Iterator[list[int]]:
        i = 0
        while True:
            start = self.consumed + (i * self.world + self.rank) * self.size
            yield list(range(start, start + self.size))
            i += 1
