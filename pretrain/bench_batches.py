"""The batches `bert-bench` times: synthetic ones of a chosen padding pattern (`synthetic_batch`), or real ones
from a dataset (`data_batches`), and the same batch in transformers' input format (`hf_inputs`).
"""

from __future__ import annotations

import torch

from common.errors import UserError
from pretrain.models.base import IGNORE_INDEX
from pretrain.recipe import FAMILY_RECIPES


def special_ids(config) -> dict[str, int]:
    """The family's [CLS] and [MASK] ids (`special_ids`), taken modulo a smaller vocabulary."""
    return {role: i % config.vocab_size for role, i in config.special_ids.items()}


def synthetic_batch(
    config, batch: int, seq_len: int, padding: str, gen: torch.Generator, mask_prob: float = 0.15
) -> dict:
    """One micro-batch in the docs/DESIGN.md layout, with the padding distribution of the module docstring."""
    if padding == "realistic":
        short = torch.rand(batch, generator=gen) < 0.1
        low = torch.where(short, torch.full((batch,), min(8, seq_len)), torch.full((batch,), seq_len // 2))
        lengths = low + (torch.rand(batch, generator=gen) * (seq_len - low + 1)).long().clamp(max=seq_len - low)
        lengths[lengths.argmax()] = seq_len
    else:
        lengths = torch.full((batch,), seq_len)
    positions = torch.arange(seq_len)
    real = positions < lengths[:, None]  # (B, S)
    input_ids = torch.randint(
        1000 if config.vocab_size > 2000 else 5, config.vocab_size, (batch, seq_len), generator=gen
    )
    input_ids = torch.where(real, input_ids, config.pad_token_id)
    ids = special_ids(config)
    input_ids[:, 0] = ids["cls"]
    masked = torch.cat([_pick_masked(int(n), seq_len, b, gen, mask_prob) for b, n in enumerate(lengths)])  # (N,)
    mlm_labels = input_ids.flatten()[masked]
    input_ids.view(-1)[masked] = ids["mask"]
    return {
        "input_ids": input_ids,
        "token_type_ids": (positions >= lengths[:, None] // 2).long() * real,
        "attention_mask": real.long(),
        "masked_positions": masked,
        "mlm_labels": mlm_labels,
        "nsp_labels": torch.randint(0, 2, (batch,), generator=gen),
    }


def _pick_masked(length: int, seq_len: int, row: int, gen: torch.Generator, mask_prob: float) -> torch.Tensor:
    count = max(1, round(mask_prob * length))
    return (torch.randperm(length - 1, generator=gen)[:count] + 1).sort().values + row * seq_len


def data_batches(
    prefix: str, config, micro_batch: int, seq_len: int, seed: int, mask_prob: float | None = None
) -> list[dict]:
    """The first 8 training micro-batches of a `bert-prep build` dataset (pretrain.data) with the objective of
    the model family's recipe (BERT: NSP, 15%; ModernBERT: packed, 30%; pretrain.recipe), as bert-pretrain."""
    from pretrain.data import PretrainingData
    from pretrain.data_config import DataConfig

    objective = dict(FAMILY_RECIPES[config.model_type])
    if mask_prob is not None:
        objective["mask_prob"] = mask_prob
    data = PretrainingData(DataConfig(prefixes=[prefix], seq_len=seq_len, seed=seed, num_workers=0, **objective))
    if data.vocab_size > config.vocab_size:
        raise UserError(f"--data {prefix} has {data.vocab_size} token ids but --model only {config.vocab_size}")
    return [data.batch("train", i * micro_batch, micro_batch) for i in range(8)]


def hf_inputs(batch: dict, family: str = "bert") -> dict:
    """The same batch in the keyword arguments of transformers' BertForPreTraining or ModernBertForMaskedLM
    (labels IGNORE_INDEX where unmasked)."""
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    labels.view(-1)[batch["masked_positions"]] = batch["mlm_labels"]
    if family == "modernbert":
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    keys = ("input_ids", "token_type_ids", "attention_mask")
    return {**{k: batch[k] for k in keys}, "labels": labels, "next_sentence_label": batch["nsp_labels"]}
