"""A `bert-embed train` output in MTEB: `MtebModel(DIR)` follows mteb's encoder protocol (`encode`, `similarity`,
`similarity_pairwise`, `mteb_model_meta`), and `beir_task(DIR)` makes a local BEIR directory an mteb retrieval
task, so `mteb.evaluate(MtebModel(emb), beir_task(data))` scores our model with mteb's own evaluator offline.

    import mteb
    from embed.mteb_model import MtebModel, beir_task
    result = mteb.evaluate(MtebModel("emb"), beir_task("task/test"), cache=None)

Design choices:
- The encoding is `embed.model.encode` itself (our tokenizer, prefixes, pooling and normalization): mteb's
  query/document prompt type picks the query or the passage prefix, exactly as `bert-embed eval` encodes.
- mteb (the `embed` extra) is imported only here and only when a task or the metadata is built; its public
  tasks download their data from the Hugging Face hub, which this module never does: `beir_task` reads local
  files through embed.data (the same one-line errors as `bert-embed eval`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from embed import data
from embed.model import encode, load_for_encoding


class MtebModel:
    """A `bert-embed train` output directory as an mteb encoder (unit vectors, cosine similarity)."""

    def __init__(self, model_name: str, revision: str | None = None, *, device: str | None = None, batch: int = 64):
        self.path = model_name
        self.model, self.texts, self.saved = load_for_encoding(model_name)
        if device:
            self.model.to(device)
        self.batch, self.revision = batch, revision

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None, **kwargs: Any):
        """(N, H) float32 unit vectors of every text of `inputs` (mteb's DataLoader of {"text": [...]} batches)."""
        from mteb.types import PromptType

        kind = "query" if prompt_type == PromptType.query else "passage"
        texts = [t for batch in inputs for t in batch["text"]]
        return encode(self.model, texts, self.texts, kind, self.batch).numpy()

    def similarity(self, a, b) -> torch.Tensor:
        """Cosine similarity of every row of `a` with every row of `b`: (len(a), len(b))."""
        a, b = (torch.nn.functional.normalize(_tensor(x), dim=-1) for x in (a, b))
        return a @ b.T

    def similarity_pairwise(self, a, b) -> torch.Tensor:
        a, b = (torch.nn.functional.normalize(_tensor(x), dim=-1) for x in (a, b))
        return (a * b).sum(-1)

    @property
    def mteb_model_meta(self):
        from mteb.models.model_meta import ModelMeta

        meta = {"name": f"bert-embed/{Path(self.path).resolve().name}", "revision": self.revision or "local",
                "embed_dim": self.model.config.hidden_size, "similarity_fn_name": "cosine",
                "max_tokens": self.saved["max_seq_length"], "framework": ["PyTorch"]}  # fmt: skip
        return ModelMeta.create_empty(meta)


def _tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)


def beir_task(directory: str, split: str = "test", name: str = "LocalBEIRRetrieval"):
    """An mteb retrieval task over a local BEIR directory's corpus, queries and qrels/<split>.tsv (nDCG@10 main)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    beir = data.read_beir(directory, split)  # titles are already joined to the text, as mteb would join them

    class LocalBeir(AbsTaskRetrieval):
        metadata = TaskMetadata(
            type="Retrieval", name=name, main_score="ndcg_at_10", description=f"BEIR directory {directory}",
            reference=None, dataset={"path": str(directory), "revision": "local"}, category="t2t",
            eval_splits=[split], eval_langs=["eng-Latn"], date=None, dialect=[], domains=[], task_subtypes=[],
            license="not specified", annotations_creators="derived", modalities=["text"], sample_creation="found",
            bibtex_citation="",
        )  # fmt: skip

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            split_data = RetrievalSplitData(
                queries=Dataset.from_list([{"id": q, "text": t} for q, t in beir.queries.items()]),
                corpus=Dataset.from_list([{"id": d, "text": t, "title": ""} for d, t in beir.corpus.items()]),
                relevant_docs=beir.qrels,
                top_ranked=None,
            )
            self.dataset = {"default": {split: split_data}}
            self.data_loaded = True

    return LocalBeir()
