"""One dataset of the pretraining mixture (`Source`): its documents split into train and held out, its sample
map or packed stream, and token reads checked against the vocabulary (a bad id is a `BadSample`). Also what the
datasets must agree on (`shared_tokenizer`) and the start-up warnings about them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from common.errors import UserError
from data_prep import integrity
from data_prep.indexed import IndexedDataset
from data_prep.indexed import exists as dataset_exists
from pretrain.data_config import REQUIRED_SPECIALS, SPLITS, BadSample, DataConfig
from pretrain.masking import continuation_flags
from pretrain.models.base import IGNORE_INDEX
from pretrain.samples import build_sample_map, split_documents


class Source:
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
        self.split_docs = split_documents(self.ds.num_documents, cfg.eval_fraction, [cfg.seed, k, 11])
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
            split: build_sample_map(
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


def held_out_documents(prefix: str, eval_fraction: float, seed: int, k: int = 0) -> np.ndarray:
    """Sorted ids of the documents of `prefix` (the k-th --data prefix) that pretraining with this --eval-fraction
    and --seed holds out: never in a training sample, so downstream tasks built from them see unseen text."""
    return split_documents(IndexedDataset(prefix).num_documents, eval_fraction, [seed, k, 11])["eval"]


def shared_tokenizer(sources: list[Source]) -> dict:
    """The manifests' tokenizer entry, which every dataset must share."""
    first = None
    for src in sources:
        tok = src.manifest.get("tokenizer")
        if not tok or "special_tokens" not in tok or "vocab_size" not in tok:
            raise UserError(f"{src.prefix}.json has no tokenizer entry; rebuild the dataset with `bert-prep build`")
        missing = [name for name in REQUIRED_SPECIALS if name not in tok["special_tokens"]]
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


def warn_single_sentence_documents(sources: list[Source], pair_task: str) -> None:
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


def continuation_ids(path: str, vocab_size: int, prefix: str) -> np.ndarray:
    """Boolean array over ids: True for pieces that continue a word (WordPiece `##`, or no `Ġ`/`▁` start in
    BPE/Unigram; see masking.continuation_flags), read from the tokenizer the manifest names."""
    from data_prep.words import word_pieces

    candidates = [Path(path), Path(prefix).parent / path]
    try:
        tokens, mark, marks_start = word_pieces(next((str(p) for p in candidates if p.exists()), path))
    except UserError as e:
        raise UserError(f"--whole-word-mask: {e} (the tokenizer named in {prefix}.json)") from e
    return continuation_flags(tokens, vocab_size, mark, marks_start)
