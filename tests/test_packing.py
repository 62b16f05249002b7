"""Sequence packing (`--packing`, pretrain/data.py) on a corpus whose ids map back to their source: full samples of
consecutive `[CLS] doc [SEP]` pieces, cut documents continuing in the next sample, and in both model families the
numbers of the same documents one per row (no attention across documents); FLOPs counted per document."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_data import SPECIALS, Corpus, make_corpus

from common.errors import UserError
from pretrain import models
from pretrain.data import PretrainingData
from pretrain.data_config import DataConfig
from pretrain.models.bert import BertConfig
from pretrain.models.kernels import KernelOptions
from pretrain.models.modernbert import ModernBertConfig
from pretrain.runtime.throughput import batch_flops

CLS, SEP, PAD = SPECIALS["cls"], SPECIALS["sep"], SPECIALS["pad"]
SEQ = 48


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return make_corpus(tmp_path_factory.mktemp("packing"), num_docs=60, vocab_size=3000)


def packed(corpus: Corpus, **kw) -> PretrainingData:
    cfg = dict(seq_len=SEQ, eval_fraction=0.1, num_workers=0, pair_task="none", packing=True, mask_prob=0.3)
    return PretrainingData(DataConfig(prefixes=[corpus.prefix], **{**cfg, **kw}))


def pieces(sample: dict) -> list[np.ndarray]:
    """The document pieces of a packed sample, cut where `document_ids` changes."""
    ids, docs = sample["input_ids"], sample["document_ids"]
    return np.split(ids, np.flatnonzero(np.diff(docs)) + 1)


def framed(corpus: Corpus, doc: int) -> np.ndarray:
    return np.concatenate([[CLS], *corpus.documents[doc], [SEP]])


def test_samples_are_full_and_each_piece_is_one_document_framed_where_it_starts_and_ends(corpus):
    data = packed(corpus)
    train_docs = set(data.sources[0].split_docs["train"].tolist())
    fills = []
    for epoch in range(2):
        for i in range(data.num_samples("train")):
            sample = data.sample("train", epoch, i)
            assert len(sample["input_ids"]) == SEQ and (sample["token_type_ids"] == 0).all()
            assert int(sample["nsp_label"]) == -100
            parts = pieces(sample)
            for k, part in enumerate(parts):
                body = part[(part != CLS) & (part != SEP)]
                doc = int(corpus.doc[body[0]]) if len(body) else None
                if doc is None:  # a lone [CLS] at a sample's end or a lone [SEP] at the next one's start
                    assert len(part) == 1 and (k == len(parts) - 1 if part[0] == CLS else k == 0)
                    continue
                assert doc in train_docs and (corpus.doc[body] == doc).all()
                assert (np.diff(corpus.pos[body]) == 1).all()  # a contiguous run of the document
                whole = np.concatenate(corpus.documents[doc])
                assert part[0] != CLS or body[0] == whole[0]  # [CLS] only before a document's first token
                assert part[-1] != SEP or body[-1] == whole[-1]  # [SEP] only after its last
                assert k == 0 or part[0] == CLS  # only a sample's first piece continues a cut document
                assert k == len(parts) - 1 or part[-1] == SEP  # only its last one is cut
            fills.append(len(sample["input_ids"]) / SEQ)
    assert np.mean(fills) == 1.0
    padded = PretrainingData(DataConfig([corpus.prefix], seq_len=SEQ, eval_fraction=0.1, pair_task="none"))
    lengths = [len(padded.sample("train", 0, i)["input_ids"]) for i in range(padded.num_samples("train"))]
    assert np.mean(lengths) / SEQ < 0.9  # what padding to --seq-len leaves without packing


def test_a_pass_is_the_stream_of_documents_cut_every_seq_len_tokens_from_an_offset_per_pass(corpus):
    """Samples in stream order (before the per-epoch shuffle) concatenate to the documents framed one after the
    other, read circularly from an offset: cut documents continue in the next sample, nothing is lost."""
    data = packed(corpus)
    src = data.sources[0]
    order, _ = src.streams["train"]
    stream = np.concatenate([framed(corpus, int(d)) for d in order])
    n = data.num_samples("train")
    assert n == -(-len(stream) // SEQ)
    offsets = []
    for rounds in range(3):
        got = np.concatenate([src.packed("train", rounds, i, data.special_tokens)["input_ids"] for i in range(n)])
        offset = next(o for o in range(SEQ) if np.array_equal(got[:SEQ], np.roll(stream, -o)[:SEQ]))
        np.testing.assert_array_equal(got, np.resize(np.roll(stream, -offset), n * SEQ))
        offsets.append(offset)
    assert len(set(offsets)) > 1  # every pass cuts the documents elsewhere
    epoch0 = {tuple(data.sample("train", 0, i)["input_ids"]) for i in range(n)}
    assert epoch0 == {tuple(src.packed("train", 0, i, data.special_tokens)["input_ids"]) for i in range(n)}


def test_masks_never_touch_specials_and_batches_carry_document_ids(corpus):
    data = packed(corpus)
    batch = data.batch("train", 5, 6)
    assert batch["input_ids"].shape == batch["document_ids"].shape == (6, SEQ)
    assert batch["attention_mask"].all()
    labels = batch["mlm_labels"]
    assert not set(labels.tolist()) & {CLS, SEP, PAD}
    maskable = int(((batch["input_ids"] != CLS) & (batch["input_ids"] != SEP)).sum())
    assert len(labels) == pytest.approx(0.3 * maskable, abs=6)  # --mask-prob 0.3, rounded per row
    for r in range(6):  # the batch rows are the samples, their document_ids included
        sample = data.sample("train", *data.global_index("train", 5 + r))
        np.testing.assert_array_equal(batch["document_ids"][r].numpy(), sample["document_ids"])
    two_ranks = [next(data.loader("train", 3, r, 2, consumed_samples=5, num_workers=0)) for r in (0, 1)]
    for key in ("input_ids", "document_ids", "mlm_labels"):
        assert torch.equal(torch.cat([b[key] for b in two_ranks]), batch[key])


def test_packing_needs_pair_task_none(corpus):
    with pytest.raises(UserError, match="--packing .* --pair-task none"):
        PretrainingData(DataConfig([corpus.prefix], packing=True))


FAMILIES = {
    "bert": BertConfig(vocab_size=3000, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                       max_position_embeddings=SEQ, hidden_dropout=0.0, attention_dropout=0.0),
    "modernbert": ModernBertConfig(vocab_size=3000, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                   num_attention_heads=2, local_attention=8, global_attn_every_n_layers=2,
                                   pad_token_id=PAD),
}  # fmt: skip


def one_document_per_row(batch: dict) -> dict:
    """The documents of a packed batch, each in its own row from position 0, right-padded; same masked tokens."""
    rows, masked = [], []
    s = batch["input_ids"].shape[1]
    flat_masked = set(batch["masked_positions"].tolist())
    for r in range(batch["input_ids"].shape[0]):
        docs = batch["document_ids"][r]
        for start, end in zip(*_runs(docs)):
            rows.append(batch["input_ids"][r, start:end])
            masked.append([p - start for p in range(start, end) if r * s + p in flat_masked])
    width = max(map(len, rows))
    out = {k: torch.zeros(len(rows), width, dtype=torch.long) for k in ("input_ids", "attention_mask")}
    for i, ids in enumerate(rows):
        out["input_ids"][i, : len(ids)], out["attention_mask"][i, : len(ids)] = ids, 1
    out["masked_positions"] = torch.tensor([i * width + p for i, ps in enumerate(masked) for p in ps])
    out["token_type_ids"] = torch.zeros_like(out["input_ids"])
    return {**out, "mlm_labels": batch["mlm_labels"], "nsp_labels": torch.full((len(rows),), -100)}


def _runs(ids: torch.Tensor) -> tuple[list[int], list[int]]:
    cuts = [0, *(torch.nonzero(ids[1:] != ids[:-1]).squeeze(1) + 1).tolist(), len(ids)]
    return cuts[:-1], cuts[1:]


def forward(config, batch: dict, options: KernelOptions | None = None):
    torch.manual_seed(0)
    model = models.build_pretraining_model(config, options).double().eval()
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_batches_give_the_numbers_of_one_document_per_row(corpus, family):
    batch = packed(corpus).batch("train", 0, 4)
    unpacked = one_document_per_row(batch)
    assert unpacked["input_ids"].shape[0] > 4  # several documents per packed row
    got, got_grads = forward(FAMILIES[family], batch)
    want, want_grads = forward(FAMILIES[family], unpacked, KernelOptions(unpad=False))
    torch.testing.assert_close(got.mlm_logits, want.mlm_logits)
    torch.testing.assert_close(got.loss, want.loss)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, msg=lambda m, name=name: f"{name}: {m}")
    leaky, _ = forward(FAMILIES[family], {k: v for k, v in batch.items() if k != "document_ids"})
    assert not torch.allclose(leaky.mlm_logits, want.mlm_logits)  # the same rows attending across documents


def test_batch_flops_count_each_packed_document_as_a_sequence(corpus):
    batch = packed(corpus).batch("train", 0, 4)
    unpacked = one_document_per_row(batch)
    for config in FAMILIES.values():
        lengths = unpacked["attention_mask"].sum(1).tolist()
        per_doc = torch.bincount(unpacked["masked_positions"] // unpacked["input_ids"].shape[1], minlength=len(lengths))
        want = sum(config.training_flops(n, int(p)) for n, p in zip(lengths, per_doc))
        assert batch_flops(config, batch) == pytest.approx(want) == batch_flops(config, unpacked)
        rows = {k: v for k, v in batch.items() if k != "document_ids"}
        assert batch_flops(config, rows) > want  # whole rows: attention over the row, more than per document
