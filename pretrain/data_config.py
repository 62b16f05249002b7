"""`DataConfig`: how pretraining samples are read, paired and masked (every field is a flag, common.flags), and
the constants the data modules share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from common.errors import UserError
from common.flags import option

SPLITS = {"train": 0, "eval": 1}


PairTask = Literal["nsp", "sop", "none"]


PAIR_TASKS = get_args(PairTask)


REQUIRED_SPECIALS = ("pad", "cls", "sep", "mask")


MAX_SKIPPED = 64  # consecutive damaged samples after which the data is declared unusable


class BadSample(UserError):
    """A sample reads a token id outside the dataset's ids (damaged `.bin`); the message names file and document."""


@dataclass
class DataConfig:
    """How pretraining samples are read, paired and masked."""

    prefixes: list[str] | None = option(None, flag="--data", metavar="PREFIX")
    """Datasets from `bert-prep build`, one PREFIX (PREFIX.bin/.idx/.json) each; a PREFIX written with --shards
    stands for all its shards PREFIX_00000 ..., and a quoted glob ('data/*') for every dataset it matches.
    Required: here or in the --recipe file (data:)."""
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
    eval_mask_prob: float = 0.15
    """Share of non-special tokens masked in the held-out evaluation: fixed apart from --mask-prob, so runs trained
    at different masking rates report comparable MLM accuracy."""
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
            raise UserError("--data is required: pass --data PREFIX or set data: in a --recipe file")
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
        for flag, p in (("--mask-prob", self.mask_prob), ("--eval-mask-prob", self.eval_mask_prob)):
            if not 0.0 < p < 1.0:
                raise UserError(f"{flag} {p} must be between 0 and 1 (exclusive)")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise UserError(f"--short-seq-prob {self.short_seq_prob} must be between 0 and 1")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"--eval-fraction {self.eval_fraction} must be in [0, 1)")
        if self.seed < 0:
            raise UserError(f"--seed {self.seed} must be 0 or more")
        if self.num_workers < 0:
            raise UserError(f"--num-workers {self.num_workers} must be 0 or more")
