"""The contrastive loss against sentence-transformers' MultipleNegativesRankingLoss (and its symmetric form) on the
same float64 embeddings; the false-negative mask against a loop written from the definition; GradCache against
the whole batch's gradients through a real encoder with dropout on."""

import math

import pytest
import torch

from embed import loss
from embed.model import EmbeddingModel
from pretrain.models.bert import BertConfig

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")


def reference(q, positives, negatives, temperature, symmetric):
    """sentence-transformers' loss on embeddings (its model is never called for compute_loss_from_embeddings)."""
    kwargs = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"} if symmetric else {}
    mnrl = st_losses.MultipleNegativesRankingLoss(model=None, scale=1 / temperature, **kwargs)
    return mnrl.compute_loss_from_embeddings([q, positives, *negatives], labels=None)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k", [0, 2])
def test_info_nce_matches_sentence_transformers(symmetric, k):
    g = torch.Generator().manual_seed(k)
    b, h = 6, 16
    q, p = torch.randn(b, h, generator=g, dtype=torch.float64), torch.randn(b, h, generator=g, dtype=torch.float64)
    negatives = [torch.randn(b, h, generator=g, dtype=torch.float64) for _ in range(k)]
    ours = loss.info_nce(q, torch.cat([p, *negatives]), 0.05, symmetric)
    torch.testing.assert_close(ours, reference(q, p, negatives, 0.05, symmetric), rtol=1e-12, atol=1e-12)


def test_false_negatives_are_left_out_of_the_softmax():
    g = torch.Generator().manual_seed(0)
    queries, positives = ["a", "b", "c", "a"], ["x", "y", "x", "z"]  # rows 0 and 2 share a positive; 0 and 3 a query
    negatives = ["y", "w", "w", "x"]  # row 0's negative is row 1's positive (fine); row 3's is row 0's positive
    q, p = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)
    mask = loss.false_negative_mask(loss.text_keys(queries), loss.text_keys(positives + negatives))
    ours = loss.info_nce(q, p, 0.1, mask=mask)
    cands = positives + negatives
    total = 0.0
    for i in range(4):  # the definition: drop every candidate (but its own) that answers query i
        keep = [
            j for j in range(8) if j == i or (cands[j] != positives[i] and not (j < 4 and queries[j] == queries[i]))
        ]
        s = [float(torch.nn.functional.cosine_similarity(q[i], p[j], dim=0)) / 0.1 for j in keep]
        total += math.log(sum(math.exp(x) for x in s)) - s[keep.index(i)]
    # (0,2), (2,0), (0,3), (3,0); hard negative 3 ("x") for rows 0 and 2; hard negative 0 ("y") for row 1
    assert mask.sum() == 7
    assert abs(float(ours) - total / 4) < 1e-12


def tiny_encoder(pooling: str) -> EmbeddingModel:
    torch.manual_seed(0)
    config = BertConfig.preset("tiny", vocab_size=50, max_position_embeddings=32, hidden_dropout=0.1)
    return EmbeddingModel(config, pooling).double()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_grad_cache_gives_the_whole_batch_gradients(pooling):
    model = tiny_encoder(pooling)
    g = torch.Generator().manual_seed(1)
    chunks = []
    for _ in range(3):  # three chunks of 2 pairs with 1 hard negative: queries 5 tokens, passages up to 9
        mask = torch.ones(4, 9, dtype=torch.long)
        mask[1, 6:] = 0
        chunks.append((torch.randint(5, 50, (2, 5), generator=g), torch.randint(5, 50, (4, 9), generator=g), mask))

    def forward(chunk):
        return model(chunk[0]), model(chunk[1], attention_mask=chunk[2])

    def loss_fn(embs):
        q = torch.cat([e[0] for e in embs])
        p = torch.cat([e[1][:2] for e in embs] + [e[1][2:] for e in embs])
        return loss.info_nce(q, p, 0.05, symmetric=True)

    torch.manual_seed(5)
    states = []
    embs = []
    for chunk in chunks:  # the whole batch with a graph, each chunk under the random state GradCache will see
        states.append(loss.rng_state())
        embs.append(forward(chunk))
    full = loss_fn(embs)
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(5)
    cached = loss.grad_cache(forward, chunks, loss_fn, lambda s: s.backward())
    torch.testing.assert_close(cached, full.detach(), rtol=1e-12, atol=1e-12)
    assert len(expected) > 10
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-9, atol=1e-12)


def test_dropout_is_on_so_the_random_state_matters():
    """Without restoring each chunk's random state the re-run differs: the GradCache test above can fail."""
    model = tiny_encoder("mean")
    x = torch.randint(5, 50, (2, 5))
    torch.manual_seed(3)
    a = model(x)
    assert not torch.allclose(a, model(x))
