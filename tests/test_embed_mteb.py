"""A `bert-embed train` output through mteb's own retrieval evaluator (embed.mteb_model), on a local BEIR directory
and without the hub: its nDCG@10, Recall@100 and MRR@10 equal `bert-embed eval`'s, with a query prefix that only
the query side may get (so a wrong prompt type would change the scores)."""

import pytest
import torch
from fixtures_embed import pairs, write_beir
from fixtures_finetune import build_tokenizer, tiny_checkpoint

from data_prep.tokenizer import load as load_tokenizer
from embed.evaluate import EvalConfig, evaluate
from embed.model import EmbeddingModel, Prefixes, save_sentence_transformers
from pretrain.runtime.weights import load_weights

mteb = pytest.importorskip("mteb")


def test_mteb_scores_our_model_as_bert_embed_eval_does(tmp_path):
    from embed.mteb_model import MtebModel, beir_task

    tok = build_tokenizer(tmp_path / "tok")
    config, state = load_weights(tiny_checkpoint(tmp_path / "ckpt", tok))
    model = EmbeddingModel(config)
    model.load_pretrained(state)
    save_sentence_transformers(model, model.state_dict(), str(tmp_path / "model"), load_tokenizer(str(tok)),
                               Prefixes(query="query: ", passage="passage: "), 48)  # fmt: skip
    beir = write_beir(tmp_path / "beir", pairs(60, seed=5))
    ours = evaluate(EvalConfig(model=str(tmp_path / "model"), data=str(beir), output=str(tmp_path / "r.json"),
                               no_bm25=True))  # fmt: skip
    wrapped = MtebModel(str(tmp_path / "model"))
    result = mteb.evaluate(wrapped, beir_task(str(beir)), cache=None, show_progress_bar=False)
    scores = result.task_results[0].scores["test"][0]
    assert 0 < ours["ndcg_at_10"] < 1  # not a trivial set: the untrained model ranks some positives first
    for key in ("ndcg_at_10", "recall_at_100", "mrr_at_10"):
        assert scores[key] == pytest.approx(ours[key], abs=1e-5), key  # mteb rounds to 5 digits
    a, b = torch.randn(3, 8), torch.randn(4, 8)
    cosine = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)
    torch.testing.assert_close(torch.as_tensor(wrapped.similarity(a, b)), cosine)
    torch.testing.assert_close(torch.as_tensor(wrapped.similarity_pairwise(a, b[:3])), cosine.diagonal())
