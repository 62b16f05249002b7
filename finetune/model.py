"""Classification heads on `pretrain.model.BertModel`, saved as Hugging Face directories.

Parameter names are those of `transformers.BertForSequenceClassification` / `BertForTokenClassification`
(`bert.*`, `classifier.weight`, `classifier.bias`) and the dropout sits where HF puts it (on the pooled
output, or on every token row, with `classifier_dropout` falling back to `hidden_dropout_prob`), so
`save_hf` writes a directory `from_pretrained` loads with the same predictions. The sequence head reads
the pooler (tanh of the [CLS] row), as HF's does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.model import BertConfig, BertModel, init_weights

TASKS = {"classify": "BertForSequenceClassification", "tag": "BertForTokenClassification"}


@dataclass
class ClassifierOutput:
    logits: Tensor  # (B, C) for classify, (B, S, C) for tag
    loss: Tensor | None = None


class BertClassifier(nn.Module):
    """BERT + dropout + a linear classifier over the pooled output (classify) or every token (tag)."""

    def __init__(self, config: BertConfig, labels: list[str], task: str, classifier_dropout: float | None = None):
        super().__init__()
        self.config, self.labels, self.task = config, list(labels), task
        self.classifier_dropout = config.hidden_dropout if classifier_dropout is None else classifier_dropout
        self.bert = BertModel(config)
        self.classifier = nn.Linear(config.hidden_size, len(labels))
        self.classifier.apply(partial(init_weights, std=config.initializer_range))

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> ClassifierOutput:
        sequence, pooled = self.bert(input_ids, token_type_ids, attention_mask)  # (B, S, H), (B, H)
        features = pooled if self.task == "classify" else sequence
        logits = self.classifier(F.dropout(features, self.classifier_dropout, self.training))
        out = ClassifierOutput(logits)
        if labels is not None:  # -100 marks tag positions without a label
            out.loss = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)
        return out

    def load_encoder(self, state: dict[str, Tensor]) -> None:
        """Take the `bert.*` weights of a BertForPreTraining state dict (the heads are dropped)."""
        encoder = {k[len("bert.") :]: v for k, v in state.items() if k.startswith("bert.")}
        self.bert.load_state_dict(encoder, strict=True)

    def hf_config(self):
        """The `transformers.BertConfig` of the saved directory: architecture, labels and dropout."""
        hf = self.config.to_hf()
        hf.architectures = [TASKS[self.task]]
        hf.id2label = dict(enumerate(self.labels))
        hf.label2id = {label: i for i, label in enumerate(self.labels)}
        hf.classifier_dropout = self.classifier_dropout
        return hf


def save_hf(model: BertClassifier, state: dict[str, Tensor], path: str, tokenizer=None) -> None:
    """Write config.json + model.safetensors (fp32) [+ the tokenizer files] for `from_pretrained`."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    model.hf_config().save_pretrained(path)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
