"""A sentence-embedding model on either family's encoder, saved as a sentence-transformers directory.

Design choices:
- The encoder is `pretrain.models.build_encoder`'s (BertModel or ModernBertModel, our fused code); the
  embedding pools its last layer's token rows: the mean over the real tokens ("mean") or the first token's
  row ("cls", the [CLS] row itself, not BERT's tanh pooler, as sentence-transformers' Pooling reads it).
  `forward` returns the raw pooled vector; the loss and `encode` normalize it (cosine similarity).
- Query and passage prefixes (E5's "query: " / "passage: ") are prepended to the text before tokenizing,
  which is exactly what sentence-transformers does with a prompt, so they are saved as its prompts.
- The saved directory is written by hand in sentence-transformers' layout (modules.json: Transformer,
  Pooling, Normalize; sentence_bert_config.json; config_sentence_transformers.json with the prompts) around a
  transformers `BertModel`/`ModernBertModel` directory (config.json + model.safetensors + tokenizer), so
  writing it needs no sentence-transformers and the test that loads it with sentence-transformers checks an
  independent reader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.files import write_json_atomic
from pretrain.models import build_encoder
from pretrain.models.kernels import FastPathsMixin

ENCODER_CLASSES = {"bert": "BertModel", "modernbert": "ModernBertModel"}


@dataclass(frozen=True)
class Prefixes:
    """What goes before a query's and a passage's text (empty: nothing)."""

    query: str = ""
    passage: str = ""


class EmbeddingModel(FastPathsMixin, nn.Module):
    """Either family's encoder (under its transformers prefix) + pooling: forward -> (B, H) embeddings."""

    def __init__(self, config, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, not {pooling!r}")
        self.config, self.pooling = config, pooling
        encoder = build_encoder(config)
        self.prefix = encoder.HF_PREFIX
        self.add_module(self.prefix, encoder)
        self.paths = encoder.paths  # the engine's ZeRO-3 switch reaches the encoder's fast-path choice

    @property
    def encoder(self) -> nn.Module:
        return getattr(self, self.prefix)

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        x, pack = self.encoder.encode(input_ids, token_type_ids, attention_mask)  # (T, H) kept rows
        return x[pack.first_rows()] if self.pooling == "cls" else pack.row_mean(x)  # (B, H)

    def load_pretrained(self, state: dict[str, Tensor]) -> None:
        """The encoder's weights from a pretraining state dict with transformers' names (heads dropped)."""
        part = {k[len(self.prefix) + 1 :]: v for k, v in state.items() if k.startswith(self.prefix + ".")}
        self.encoder.load_state_dict(part, strict=True)


class TextEncoder:
    """Texts -> padded token batches for one model: its tokenizer, prefixes and maximum lengths."""

    def __init__(self, tokenizer, prefixes: Prefixes, query_len: int, passage_len: int):
        self.tok, self.prefixes, self.query_len, self.passage_len = tokenizer, prefixes, query_len, passage_len

    def __call__(self, texts: Sequence[str], kind: str) -> dict[str, Tensor]:
        prefix = self.prefixes.query if kind == "query" else self.prefixes.passage
        length = self.query_len if kind == "query" else self.passage_len
        enc = self.tok(
            [prefix + t for t in texts], padding=True, truncation=True, max_length=length, return_tensors="pt"
        )
        return {k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc}


def batches(texts: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(texts), size):
        yield texts[i : i + size]


@torch.no_grad()
def encode(model, texts: Sequence[str], encoder: TextEncoder, kind: str, batch_size: int = 64) -> Tensor:
    """(N, H) float32 unit vectors of `texts` (`model`: an EmbeddingModel or the engine around one), in eval mode.
    Texts go in order of length so a batch pads little; the rows come back in the given order."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    device = next(model.parameters()).device
    out = []
    for chunk in batches([texts[i] for i in order], batch_size):
        batch = {k: v.to(device) for k, v in encoder(chunk, kind).items()}
        out.append(F.normalize(model(**batch).float(), dim=-1).cpu())
    model.train(was_training)
    rows = torch.cat(out) if out else torch.empty(0)
    return rows[torch.argsort(torch.tensor(order))] if out else rows


def save_sentence_transformers(
    model: EmbeddingModel,
    state: dict[str, Tensor],
    path: str,
    tokenizer,
    prefixes: Prefixes,
    max_seq_length: int,
    extra: dict | None = None,
) -> None:
    """Write `path` as a sentence-transformers model (see the module docstring); `state` is the model's
    state dict (the engine's gathered one under ZeRO-3), `extra` goes into embed_config.json."""
    from safetensors.torch import save_file

    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    os.makedirs(os.path.join(path, "2_Normalize"), exist_ok=True)
    hf = model.config.to_hf()
    hf.architectures = [ENCODER_CLASSES[model.config.model_type]]
    hf.save_pretrained(path)
    start = len(model.prefix) + 1
    tensors = {k[start:]: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {
        "word_embedding_dimension": model.config.hidden_size,
        "pooling_mode_cls_token": model.pooling == "cls",
        "pooling_mode_mean_tokens": model.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "include_prompt": True,
    }
    st_config = {
        "prompts": {"query": prefixes.query, "document": prefixes.passage},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    files = {
        "modules.json": modules,
        "1_Pooling/config.json": pooling,
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": st_config,
        "embed_config.json": {"pooling": model.pooling, "query_prefix": prefixes.query,
                              "passage_prefix": prefixes.passage, "max_seq_length": max_seq_length,
                              **(extra or {})},
    }  # fmt: skip
    for name, value in files.items():
        write_json_atomic(os.path.join(path, name), value)


def load_embedding_model(path: str) -> tuple[EmbeddingModel, object, Prefixes, dict]:
    """(model, tokenizer, prefixes, embed_config) of a directory `save_sentence_transformers` wrote."""
    from common.errors import UserError
    from data_prep.tokenizer import load as load_tokenizer
    from pretrain.models import config_from_json
    from pretrain.models.base import read_hf_weights

    config_path = os.path.join(path, "embed_config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"--model {path} holds no embed_config.json; pass the --output of `bert-embed train`")
    with open(config_path) as f:
        saved = json.load(f)
    config = config_from_json(os.path.join(path, "config.json"))
    model = EmbeddingModel(config, saved["pooling"])
    model.encoder.load_state_dict(read_hf_weights(path), strict=True)
    tok = load_tokenizer(path)
    if config.model_type == "modernbert":
        tok.model_input_names = [n for n in tok.model_input_names if n != "token_type_ids"]
    return model, tok, Prefixes(saved["query_prefix"], saved["passage_prefix"]), saved


def load_for_encoding(path: str) -> tuple[EmbeddingModel, TextEncoder, dict]:
    """(model, its TextEncoder, embed_config) of a `bert-embed train` output, queries and passages cut at the saved
    max_seq_length, as sentence-transformers encodes with it: what eval, mine, index, search and mteb encode with."""
    model, tok, prefixes, saved = load_embedding_model(path)
    length = saved["max_seq_length"]
    return model, TextEncoder(tok, prefixes, length, length), saved
