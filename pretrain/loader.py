"""The resumable loader: rank `r` of `W` reads micro-batch `i` = global samples `consumed + (i*W + r)*B + [0, B)`
(`RankBatches`), masked in loader workers (`MaskedSamples`) that ignore SIGTERM and die with their rank, and
`collate`d into the batch dict of docs/DESIGN.md; `Batches` shuts its workers down on every way out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


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


def worker_init(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the training process, which stops at a micro-batch boundary and saves,
    and die with it when it dies (torch's own check of the parent runs only every few seconds)."""
    import signal

    from pretrain.runtime.dist import die_with_parent

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


class Batches(Iterator):
    """An endless stream of micro-batches whose loader workers end with `close()`.

    The workers ignore SIGTERM (see `worker_init`), so the `terminate()` with which Python's exit joins child
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


class MaskedSamples(Dataset):
    """Map-style view of one split's masked samples, indexed by global sample number."""

    def __init__(self, data, split: str):  # data: a pretrain.data.PretrainingData
        self.data, self.split = data, split

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        return self.data.masked_sample(self.split, g)


class RankBatches(Sampler):
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
