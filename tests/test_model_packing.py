"""Documents packed into one row (`document_ids`, attention.Packing) give, in both families, exactly the numbers of
the same documents one per row: attention stays inside each document (and its window), positions restart."""

import dataclasses

import pytest
import torch

from pretrain import models
from pretrain.models import attention, kernels
from pretrain.models.bert import BertConfig
from pretrain.models.modernbert import ModernBertConfig

DOCS = [5, 7, 3, 9, 4, 6]  # document lengths
ROWS = [[0, 1, 2], [3, 4, 5]]  # documents per packed row
S = 20  # packed row length: 15 and 19 real tokens
CONFIGS = {
    "bert": BertConfig(vocab_size=53, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48),
    "modernbert": ModernBertConfig(
        vocab_size=53, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
        local_attention=4, global_attn_every_n_layers=2, pad_token_id=0,
    ),
}  # fmt: skip
PATHS = {
    "unpadded": {"unpad": True},  # CPU grouped attention, one group member per document
    "padded": {"unpad": False},  # one (B, 1, S, S) mask: same document, within the window
    "padded_plain": {"unpad": False, "use_sdpa": False, "sparse_mlm_head": False},
}


def batches(vocab: int) -> tuple[dict, dict]:
    """(packed: 2 rows of several documents, unpacked: one document per row), same tokens and masked tokens."""
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(1, vocab, (n,), generator=gen) for n in DOCS]
    picks = [torch.tensor(sorted({1 % n, n // 2, n - 1})) for n in DOCS]  # masked offsets within each document
    labels = torch.cat([torch.randint(1, vocab, (len(p),), generator=gen) for p in picks])
    packed = layout(tokens, picks, ROWS, S)
    unpacked = layout(tokens, picks, [[d] for d in range(len(DOCS))], max(DOCS))
    return {**packed, "mlm_labels": labels}, {**unpacked, "mlm_labels": labels}


def layout(tokens: list, picks: list, rows: list[list[int]], width: int) -> dict:
    ids, docs, mask = (torch.zeros(len(rows), width, dtype=torch.long) for _ in range(3))
    masked = []
    for r, members in enumerate(rows):
        start = 0
        for k, d in enumerate(members):
            n = len(tokens[d])
            ids[r, start : start + n], docs[r, start : start + n], mask[r, start : start + n] = tokens[d], k, 1
            masked.append(picks[d] + r * width + start)
            start += n
    return {"input_ids": ids, "attention_mask": mask, "document_ids": docs, "masked_positions": torch.cat(masked)}


def step(config, batch: dict, options: dict):
    torch.manual_seed(0)
    model = models.build_pretraining_model(config, kernels.KernelOptions(**options)).double().eval()
    out = model(**batch)
    out.mlm_loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", CONFIGS)
def test_packed_documents_equal_one_document_per_row(family, path):
    packed, unpacked = batches(CONFIGS[family].vocab_size)
    got, got_grads = step(CONFIGS[family], packed, PATHS[path])
    want, want_grads = step(CONFIGS[family], unpacked, PATHS["padded_plain"])
    torch.testing.assert_close(got.mlm_logits, want.mlm_logits)
    torch.testing.assert_close(got.mlm_loss, want.mlm_loss)
    assert got_grads.keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, msg=lambda m, name=name: f"{name}: {m}")
    config = CONFIGS[family]
    leaky = step(config, {**packed, "document_ids": None}, PATHS[path])[0]  # documents attend to each other
    assert not torch.allclose(leaky.mlm_logits, want.mlm_logits)
    if family == "modernbert":  # so does a window wider than the local one
        wide = step(dataclasses.replace(config, local_attention=64), packed, PATHS[path])[0]
        assert not torch.allclose(wide.mlm_logits, want.mlm_logits)


def test_packing_of_documents():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    docs = torch.tensor([[0, 0, 1, 1, 1, 1], [4, 4, 4, 7, 7, 9]])
    pack = attention.Packing.build(mask, docs, kernels.FastPaths(unpad=True))
    assert pack.lengths == [2, 3, 3, 2, 1] and pack.cu_seqlens.tolist() == [0, 2, 5, 8, 10, 11]
    assert pack.positions.tolist() == [0, 1, 0, 1, 2, 0, 1, 2, 0, 1, 0] and pack.max_len == 3
    assert pack.indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11] and not pack.uniform
    allowed = pack.padded_mask(window=1)[:, 0]  # (B, S, S) against a brute-force rule on the real queries
    real, seq = mask.bool(), pack.sequence_of
    for b, i, j in torch.cartesian_prod(torch.arange(2), torch.arange(6), torch.arange(6)).tolist():
        if real[b, i]:
            rule = bool(real[b, j]) and seq[b, i] == seq[b, j] and abs(i - j) <= 1
            assert bool(allowed[b, i, j]) == rule, (b, i, j)
    assert allowed[0, 5].tolist() == real[0].tolist()  # the padded query sees every real key: no NaN row
    one_each = attention.Packing.build(mask, torch.zeros_like(mask), kernels.FastPaths(unpad=True))
    assert one_each.sequence_of is None and one_each.lengths == [5, 6]  # one document per row: rows again
