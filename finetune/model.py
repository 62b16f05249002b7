"""Task heads on `pretrain.model.BertModel`, saved as Hugging Face directories.

Parameter names are those of `transformers.BertForSequenceClassification`, `BertForTokenClassification` and
`BertForQuestionAnswering` (`bert.*`, then `classifier.*` or `qa_outputs.*`), and dropout sits where HF puts it
(on the pooled output or on every token row, `classifier_dropout` falling back to `hidden_dropout_prob`; none
before `qa_outputs`), so `save_hf` writes a directory `from_pretrained` loads with the same logits. The token and
span heads have no pooler in HF, so their saved directories leave ours out.

Heads: "sequence" reads the pooler (tanh of the [CLS] row) and gives one row of logits per sequence, or one
value for a regression task (STS-B: MSE loss, HF's `problem_type="regression"`); "token" gives logits per token;
"span" gives a start and an end logit per token (extractive QA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finetune.data import IGNORE
from pretrain.model import BertConfig, BertModel, init_weights

HEADS = {
    "sequence": "BertForSequenceClassification",
    "token": "BertForTokenClassification",
    "span": "BertForQuestionAnswering",
}


@dataclass
class TaskOutput:
    logits: Tensor  # (B, C) sequence [(B, 1) regression], (B, S, C) token, (B, S, 2) span: start, end
    loss: Tensor | None = None


class TaskModel(nn.Module):
    """BERT plus one task head; `labels` name the outputs (empty for regression and span heads)."""

    def __init__(
        self,
        config: BertConfig,
        head: str,
        labels: list[str] = (),
        regression: bool = False,
        classifier_dropout: float | None = None,
    ):
        super().__init__()
        self.config, self.head, self.labels, self.regression = config, head, list(labels), regression
        self.classifier_dropout = config.hidden_dropout if classifier_dropout is None else classifier_dropout
        self.bert = BertModel(config)
        width = 2 if head == "span" else 1 if regression else len(self.labels)
        layer = nn.Linear(config.hidden_size, width)
        layer.apply(partial(init_weights, std=config.initializer_range))
        if head == "span":
            self.qa_outputs = layer
        else:
            self.classifier = layer

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> TaskOutput:
        sequence, pooled = self.bert(input_ids, token_type_ids, attention_mask)  # (B, S, H), (B, H)
        if self.head == "span":
            out = TaskOutput(self.qa_outputs(sequence))  # (B, S, 2)
        else:
            features = pooled if self.head == "sequence" else sequence
            out = TaskOutput(self.classifier(F.dropout(features, self.classifier_dropout, self.training)))
        if labels is not None:
            out.loss = self._loss(out.logits, labels, attention_mask)
        return out

    def _loss(self, logits: Tensor, labels: Tensor, attention_mask: Tensor | None) -> Tensor:
        if self.regression:  # labels (B,) floats
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        if self.head != "span":  # -100 marks tag positions without a label
            return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE)
        # span: labels (B, 2) token positions of the answer's first and last piece ([CLS] = 0: no answer here);
        # padded positions take no probability mass (HF pads to a fixed length and lets them, we pad per batch)
        if attention_mask is not None:
            logits = logits.float().masked_fill(~attention_mask.bool().unsqueeze(-1), torch.finfo(torch.float32).min)
        start, end = logits.float().unbind(-1)
        return (F.cross_entropy(start, labels[:, 0]) + F.cross_entropy(end, labels[:, 1])) / 2

    def load_encoder(self, state: dict[str, Tensor]) -> None:
        """Take the `bert.*` weights of a BertForPreTraining state dict (the pretraining heads are dropped)."""
        encoder = {k[len("bert.") :]: v for k, v in state.items() if k.startswith("bert.")}
        self.bert.load_state_dict(encoder, strict=True)

    def hf_config(self):
        """The `transformers.BertConfig` of the saved directory: architecture, labels, problem type, dropout."""
        hf = self.config.to_hf()
        hf.architectures = [HEADS[self.head]]
        if self.regression:
            hf.num_labels, hf.problem_type = 1, "regression"
        elif self.labels:
            hf.id2label = dict(enumerate(self.labels))
            hf.label2id = {label: i for i, label in enumerate(self.labels)}
        if self.head != "span":
            hf.classifier_dropout = self.classifier_dropout
        return hf

    def saved_keys(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """`state` without what the HF class of this head lacks (the pooler of the token and span heads)."""
        if self.head == "sequence":
            return state
        return {k: v for k, v in state.items() if not k.startswith("bert.pooler.")}


def save_hf(model: TaskModel, state: dict[str, Tensor], path: str, tokenizer=None) -> None:
    """Write config.json + model.safetensors (fp32) [+ the tokenizer files] for `from_pretrained`."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    model.hf_config().save_pretrained(path)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.saved_keys(state).items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
