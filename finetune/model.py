"""Task heads on either model family's encoder, saved as Hugging Face directories.

The encoder comes from `pretrain.models.build_encoder` (BertModel or ModernBertModel) and sits under its own
`HF_PREFIX` (`bert.*` or `model.*`); the head's parameter names and dropout are those of the family's
transformers classes (`FAMILIES`), so `save_hf` writes a directory `from_pretrained` loads with the same logits:
- BERT (`BertFor{SequenceClassification,TokenClassification,QuestionAnswering}`): dropout
  (`classifier_dropout`, falling back to `hidden_dropout_prob`) then `classifier` on the pooler's output (tanh
  of the [CLS] row) or on every token row; `qa_outputs` on every token row, no dropout. The token and span
  heads have no pooler in transformers, so their saved directories leave ours out.
- ModernBERT (`ModernBertFor{SequenceClassification,TokenClassification,QuestionAnswering}`): `head` (dense,
  GELU, LayerNorm: the MLM transform, loaded from the MLM checkpoint as transformers loads it) on the pooled
  features (`classifier_pooling`: the first token's row or the mean over the real tokens) or on every token row,
  then dropout (`classifier_dropout`) and `classifier` (two outputs, start and end, for QA). ModernBERT reads
  no token_type_ids: a text pair is `[CLS] a [SEP] b [SEP]`, told apart by the separator alone.

Heads: "sequence" gives one row of logits per sequence, or one value for a regression task (STS-B: MSE loss,
transformers' `problem_type="regression"`); "token" gives logits per token; "span" gives a start and an end
logit per token (extractive QA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models import build_encoder, families, task_heads
from pretrain.models.base import IGNORE_INDEX
from pretrain.models.kernels import FastPathsMixin

FAMILIES = {model_type: task_heads(model_type) for model_type in families()}
"""model_type -> where its transformers task classes differ (each family module's TASK_HEADS, via the registry)."""


@dataclass
class TaskOutput:
    logits: Tensor  # (B, C) sequence [(B, 1) regression], (B, S, C) token, (B, S, 2) span: start, end
    loss: Tensor | None = None


class TaskModel(FastPathsMixin, nn.Module):
    """An encoder of either family plus one task head; `labels` name the outputs (empty for regression and
    span heads). The encoder's fast-path choice is the model's (`paths`), so the engine's ZeRO-3
    `set_weights_partitioned` reaches it and no path reads a partitioned weight outside its module."""

    def __init__(
        self,
        config,
        kind: str,
        labels: list[str] = (),
        regression: bool = False,
        classifier_dropout: float | None = None,
    ):
        super().__init__()
        self.config, self.kind, self.labels, self.regression = config, kind, list(labels), regression
        self.family = family = FAMILIES[config.model_type]
        encoder = build_encoder(config)
        self.prefix = encoder.HF_PREFIX
        self.add_module(self.prefix, encoder)
        self.paths = encoder.paths
        if family.head is not None:
            self.head = family.head(config)
        dropout = getattr(config, family.dropout) if classifier_dropout is None else classifier_dropout
        self.classifier_dropout = dropout if kind != "span" or family.span_dropout else 0.0
        width = 2 if kind == "span" else 1 if regression else len(self.labels)
        layer = nn.Linear(config.hidden_size, width)
        family.init(layer, config)
        self.output_name = family.span_layer if kind == "span" else "classifier"
        self.add_module(self.output_name, layer)

    @property
    def encoder(self) -> nn.Module:
        return getattr(self, self.prefix)

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> TaskOutput:
        sequence, pooled = self.encoder(input_ids, token_type_ids, attention_mask)  # (B, S, H), (B, H)
        features = pooled if self.kind == "sequence" else sequence
        if self.family.head is not None:
            features = self.head(features, self.paths.for_input(input_ids, features))
        features = F.dropout(features, self.classifier_dropout, self.training)
        out = TaskOutput(getattr(self, self.output_name)(features))
        if labels is not None:
            out.loss = self._loss(out.logits, labels, attention_mask)
        return out

    def _loss(self, logits: Tensor, labels: Tensor, attention_mask: Tensor | None) -> Tensor:
        if self.regression:  # labels (B,) floats
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        if self.kind != "span":  # IGNORE_INDEX marks tag positions without a label
            return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        # span: labels (B, 2) token positions of the answer's first and last piece ([CLS] = 0: no answer here);
        # padded positions take no probability mass (HF pads to a fixed length and lets them, we pad per batch)
        if attention_mask is not None:
            logits = logits.float().masked_fill(~attention_mask.bool().unsqueeze(-1), torch.finfo(torch.float32).min)
        start, end = logits.float().unbind(-1)
        return (F.cross_entropy(start, labels[:, 0]) + F.cross_entropy(end, labels[:, 1])) / 2

    def load_pretrained(self, state: dict[str, Tensor]) -> None:
        """Take the encoder's weights (and ModernBERT's `head`, as transformers takes it from the MLM model) from
        a pretraining state dict with transformers' names; the other pretraining heads are dropped."""
        for name in (self.prefix, "head") if self.family.head is not None else (self.prefix,):
            part = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
            getattr(self, name).load_state_dict(part, strict=True)

    def hf_config(self):
        """The transformers config of the saved directory: architecture, labels, problem type, dropout."""
        hf = self.config.to_hf()
        hf.architectures = [self.family.classes[self.kind]]
        if self.regression:
            hf.num_labels, hf.problem_type = 1, "regression"
        elif self.labels:
            hf.id2label = dict(enumerate(self.labels))
            hf.label2id = {label: i for i, label in enumerate(self.labels)}
        else:  # span: ModernBertForQuestionAnswering sizes its classifier by num_labels
            hf.num_labels = 2
        if self.kind != "span" or self.family.span_dropout:
            hf.classifier_dropout = self.classifier_dropout
        return hf

    def saved_keys(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """`state` without what the transformers class of this head lacks (BERT's pooler, but for "sequence")."""
        if self.kind == "sequence":
            return state
        return {k: v for k, v in state.items() if not k.startswith(f"{self.prefix}.pooler.")}


def save_hf(model: TaskModel, state: dict[str, Tensor], path: str, tokenizer=None) -> None:
    """Write config.json + model.safetensors (fp32) [+ the tokenizer files] for `from_pretrained`."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    model.hf_config().save_pretrained(path)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.saved_keys(state).items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
