"""BERT for pretraining (MLM + NSP) with Hugging Face-compatible weights and fast paths.

Every parameter has the name and shape it has in `transformers.BertForPreTraining`, so an HF state dict loads
with strict=True and `save_hf_pretrained` writes a directory HF loads. Where this differs from the textbook
model (each behind a `kernels.KernelOptions` switch whose other setting is the plain path; fused code in
kernels.py):
- Unpadding: the encoder runs on the (T, H) rows of real tokens only; on CPU padding comes back just for the
  attention score matrix, on CUDA varlen flash attention never sees it. Padded rows of `sequence_output`
  are therefore zeros, not the meaningless values HF computes there.
- The MLM head runs only on the masked positions (gather before transform and vocabulary projection), so
  the loss never materializes (B, S, V). With it, the last layer carries past attention only the rows the
  heads read: the masked ones and each row's [CLS] (every row still gives its keys and values).
- q, k and v are projected by one GEMM on the concatenated weights; the state dict keeps HF's three
  (under ZeRO-3, which gathers weights per called module, the three modules are called instead).
- On an x86 CPU in float32 the linear layers (fused.Linear) compute on oneDNN's matmul, not torch's BLAS.
- Weights start from BERT's truncated normal (+-2 std) rather than HF's plain normal.
- Fast paths are decided once per device and compute dtype (`resolve_fast_paths`, kernels.resolve); forward
  follows the decision. Under ZeRO-3 (`set_weights_partitioned`) only paths that call modules are taken.

Forward contract (the batch dict of docs/DESIGN.md): `masked_positions` (N,) are flat row-major indices into
the B*S positions, `mlm_labels` (N,) the original ids there, `nsp_labels` (B,). Without `masked_positions` the
MLM logits cover all positions, (B, S, V), and `mlm_labels` may be (B, S) with -100 where unlabelled (HF's
convention). Label -100 is ignored everywhere; `nsp_labels` all -100 (pair task "none") gives nsp_loss 0.
Optional `document_ids` (B, S): documents packed into one row attend only within themselves and their
positions restart at 0 (attention.Packing). Batches are right-padded: position 0 of every row is a real token.
The ModernBERT family (pretrain/models/modernbert.py) shares the kernels, the output, the losses and the HF-directory
code (pretrain/models.py, which also picks the family of a config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import UserError
from common.flags import option
from pretrain.models import attention, fused, kernels

# name: (layers, hidden); heads = hidden / 64 and intermediate = 4 * hidden, as in Google's BERT release.
from pretrain.models.attention import Packing
from pretrain.models.base import (
    Encoder,
    ModelConfig,
    PreTrainingModel,
    PreTrainingOutput,
    TaskHeads,
    hf_task_classes,
    last_layer,
    trunc_normal_,
)
from pretrain.models.kernels import FastPaths, KernelOptions, PathChoice

PRESETS = {
    "tiny": (2, 128),
    "mini": (4, 256),
    "small": (4, 512),
    "medium": (8, 512),
    "base": (12, 768),
    "large": (24, 1024),
}
# HF config.json key -> BertConfig field, for the fields whose names differ.
HF_NAMES = {
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "hidden_dropout_prob": "hidden_dropout",
    "attention_probs_dropout_prob": "attention_dropout",
}


@dataclass
class BertConfig(ModelConfig):
    """Model shape; JSON-serializable. The speed switches are `kernels.KernelOptions`, given to the model."""

    HF_KEYS = ("num_hidden_layers",)
    KERNEL_OPTIONS = kernels.OPTION_NAMES  # every one applies to BERT
    model_type: Literal["bert"] = "bert"
    """Model family (pretrain.models); `bert` as in transformers' config.json."""
    vocab_size: int = option(30522, group="shape")
    """WordPiece vocabulary size (rows of the word embedding and of the MLM decoder)."""
    hidden_size: int = option(768, group="shape")
    """Width H of every token representation."""
    num_layers: int = option(12, group="shape")
    """Number of transformer layers L."""
    num_heads: int = option(12, group="shape")
    """Attention heads per layer; must divide hidden_size."""
    intermediate_size: int = option(3072, group="shape")
    """Width of the feed-forward layer (4 H in every preset)."""
    max_position_embeddings: int = option(512, group="shape")
    """Longest sequence the learned position embedding covers."""
    type_vocab_size: int = option(2, group="shape")
    """Segment ids (0 for sentence A, 1 for sentence B)."""
    hidden_dropout: float = 0.1
    """Dropout on embeddings and on each sub-layer output before its residual add."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT's 1e-12)."""
    initializer_range: float = 0.02
    """Standard deviation of the truncated-normal weight initialization."""
    pad_token_id: int = 0
    """Id of [PAD]; its word embedding starts at zero and gets no gradient from the lookup (as in HF)."""

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise UserError(f"--model: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def num_hidden_layers(self) -> int:  # transformers' name, shared with ModernBertConfig
        return self.num_layers

    @property
    def special_ids(self) -> dict[str, int]:
        """[CLS] and [MASK] ids, for batches made without a tokenizer (bert-bench's synthetic ones): the
        WordPiece vocabulary the presets are shaped for (bert-base-uncased's); like transformers' BertConfig,
        ours has no field for them (a dataset's manifest has the real ones, pretrain.identity)."""
        return {"cls": 101, "mask": 103}

    def training_flops(self, seq_len: int, masked_positions: int, sparse_last_layer: bool = True) -> float:
        """Training FLOPs (forward + backward = 3x forward) of one sequence of `seq_len` real tokens;
        `sparse_last_layer`: KernelOptions.last_layer_on_heads_rows.

        F = 24 L s h^2 + 12 L s h i + 12 L s^2 h + 6 P h (h + V), which for i = 4h is the documented
        72 L s h^2 + 12 L s^2 h + 6 P h (h + V); P is the number of rows the MLM head runs on. With the sparse
        last layer, its output projection and feed-forward (6 h^2 + 12 h i a row) run on P rows, not s.
        Embeddings, LayerNorms, biases, the NSP head and its [CLS] row are left out (under 1%).
        """
        L, s, h, i, V = self.num_layers, seq_len, self.hidden_size, self.intermediate_size, self.vocab_size
        P = masked_positions
        skipped = (s - P) * (6 * h * h + 12 * h * i) if sparse_last_layer else 0
        return 24 * L * s * h * h + 12 * L * s * h * i + 12 * L * s * s * h + 6 * P * h * (h + V) - skipped

    @classmethod
    def preset(cls, name: str, **overrides) -> BertConfig:
        """One of tiny, mini, small, medium, base, large, with optional field overrides."""
        if name not in PRESETS:
            raise UserError(f"--model: unknown preset {name!r}; use one of {', '.join(PRESETS)} or a JSON file")
        layers, hidden = PRESETS[name]
        shape = dict(num_layers=layers, hidden_size=hidden, num_heads=hidden // 64, intermediate_size=4 * hidden)
        return cls(**{**shape, **overrides})

    @classmethod
    def from_hf(cls, hf) -> BertConfig:
        """From a `transformers.BertConfig` or its config.json dict."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        if d.get("hidden_act", "gelu") != "gelu" or d.get("position_embedding_type", "absolute") != "absolute":
            raise UserError("--model: only HF BERT configs with hidden_act 'gelu' and absolute positions are supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{HF_NAMES.get(k, k): v for k, v in d.items() if HF_NAMES.get(k, k) in fields})

    def to_hf(self):
        """The equivalent `transformers.BertConfig` (architectures set to BertForPreTraining)."""
        from transformers import BertConfig as HFBertConfig

        ours = {v: k for k, v in HF_NAMES.items()}
        shape = {ours.get(k, k): v for k, v in dataclasses.asdict(self).items() if k != "model_type"}
        return HFBertConfig(**shape, hidden_act="gelu", architectures=["BertForPreTraining"])

    @staticmethod
    def pretraining_class() -> type[BertForPreTraining]:
        return BertForPreTraining

    @staticmethod
    def encoder_class() -> type[BertModel]:
        return BertModel


def init_weights(module: nn.Module, std: float) -> None:
    """BERT's init: truncated normal (+-2 std) weights, zero biases and [PAD] row, LayerNorm ones; use `.apply`."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        trunc_normal_(module.weight, std, 2.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        nn.init.zeros_(module.weight[module.padding_idx])
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _named(**modules: nn.Module) -> nn.ModuleDict:
    """A container whose only job is to give its children HF's parameter names."""
    return nn.ModuleDict(modules)


class Embeddings(nn.Module):
    """Word + position + segment embeddings of the kept tokens, then LayerNorm and dropout."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        self.word_embeddings = fused.TiedEmbedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, pack: Packing) -> Tensor:
        x = self.word_embeddings(pack.keep(input_ids.flatten())) + self.position_embeddings(pack.positions)
        x = x + self.token_type_embeddings(pack.keep(token_type_ids.flatten()))  # (T, H)
        x = fused.layer_norm(x, self.LayerNorm, pack.paths.ops)
        return F.dropout(x, self.config.hidden_dropout, self.training)


class Layer(nn.Module):
    """One post-LN transformer layer on packed rows; submodule names are HF's."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        H, inner, Linear = c.hidden_size, c.intermediate_size, fused.Linear
        qkv = _named(query=Linear(H, H), key=Linear(H, H), value=Linear(H, H))
        out = _named(dense=Linear(H, H), LayerNorm=nn.LayerNorm(H, eps=c.layer_norm_eps))
        self.attention = _named(self=qkv, output=out)
        self.intermediate = _named(dense=Linear(H, inner))
        self.output = _named(dense=Linear(inner, H), LayerNorm=nn.LayerNorm(H, eps=c.layer_norm_eps))

    def forward(self, x: Tensor, pack: Packing, rows: Tensor | None = None) -> Tensor:  # x: (T, H)
        """-> (T, H), or with `rows` (R,) only those rows past attention: (R, H)."""
        c, paths, p = self.config, pack.paths, self.config.hidden_dropout if self.training else 0.0
        attn_p = c.attention_dropout if self.training else 0.0
        ctx = attention.attention(self._qkv(x, paths), pack, c.num_heads, attn_p)  # (T, H)
        if rows is not None:
            ctx, x = ctx[rows], x[rows]  # (R, H)
        out = self.attention.output
        x = fused.dense_residual_norm(ctx, out.dense, x, out.LayerNorm, p, paths)
        h = fused.dense_gelu(x, self.intermediate.dense, paths)  # (T, I)
        return fused.dense_residual_norm(h, self.output.dense, x, self.output.LayerNorm, p, paths)

    def _qkv(self, x: Tensor, paths: FastPaths) -> Tensor:
        """(T, H) -> (T, 3H) as q | k | v."""
        q, k, v = self.attention.self.query, self.attention.self.key, self.attention.self.value
        if paths.fused_qkv:
            weight, bias = torch.cat([q.weight, k.weight, v.weight]), torch.cat([q.bias, k.bias, v.bias])
            return fused.linear(x, weight, bias, paths.gemm)
        return torch.cat([q(x, paths.gemm), k(x, paths.gemm), v(x, paths.gemm)], dim=1)


class BertModel(Encoder):
    """The encoder: embeddings, L layers and the pooler; usable alone (fine-tuning heads sit on top)."""

    HF_PREFIX = "bert"  # its parameters' prefix inside transformers' task models

    def __init__(self, config: BertConfig, options: KernelOptions | None = None):
        super().__init__()
        self.config = config
        self.paths = PathChoice(config, options)
        self.embeddings = Embeddings(config)
        self.encoder = _named(layer=nn.ModuleList(Layer(config) for _ in range(config.num_layers)))
        self.pooler = _named(dense=nn.Linear(config.hidden_size, config.hidden_size))
        self.apply(partial(init_weights, std=config.initializer_range))

    def encode(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        subset: Tensor | None = None,
    ) -> tuple[Tensor, Packing]:
        """-> (the kept token rows (T, H), where they sit in the (B, S) batch); with `subset` (R,) flat positions
        of real tokens, the rows of those alone (R, H), in its order (`last_layer`)."""
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        paths = self.paths.for_input(input_ids, self.embeddings.word_embeddings.weight)
        pack = Packing.build(attention_mask, document_ids, paths)
        x = self.embeddings(input_ids, token_type_ids, pack)  # (T, H)
        for layer, rows in last_layer(self.encoder.layer, pack, subset):
            x = layer(x, pack, rows)
        return x, pack

    def pool(self, x: Tensor, pack: Packing) -> Tensor:
        """tanh(dense([CLS] row)) -> (B, H)."""
        return self.pool_rows(x[pack.first_rows()])

    def pool_rows(self, cls_rows: Tensor) -> Tensor:  # (B, H) -> (B, H)
        return torch.tanh(self.pooler.dense(cls_rows))


class MaskedLMHead(nn.Module):
    """cls.predictions: dense + GELU + LayerNorm, then the decoder tied to the word embeddings."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        H = config.hidden_size
        self.transform = _named(dense=fused.Linear(H, H), LayerNorm=nn.LayerNorm(H, eps=config.layer_norm_eps))
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder = fused.TiedDecoder(H, config.vocab_size, bias=False, device="meta")
        self.decoder.weight = word_embeddings.weight
        self.decoder.bias = self.bias

    def forward(self, x: Tensor, paths: FastPaths) -> Tensor:  # (N, H) -> (N, V)
        h = fused.dense_gelu(x, self.transform.dense, paths)
        return self.decoder(fused.layer_norm(h, self.transform.LayerNorm, paths.ops), paths.gemm)


class BertForPreTraining(PreTrainingModel):
    """BERT with the MLM and NSP heads, parameter for parameter `transformers.BertForPreTraining`."""

    CONFIG, HF_CLASS = BertConfig, "BertForPreTraining"
    TIED = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }
    EMBEDDING, DECODER = "bert.embeddings.word_embeddings", "cls.predictions.decoder"

    def __init__(self, config: BertConfig, options: KernelOptions | None = None):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, options)
        self.paths = self.bert.paths
        heads = _named(predictions=MaskedLMHead(config, self.bert.embeddings.word_embeddings))
        heads.seq_relationship = nn.Linear(config.hidden_size, 2)
        self.cls = heads
        init = partial(init_weights, std=config.initializer_range)
        heads.predictions.transform.apply(init)
        heads.seq_relationship.apply(init)

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        masked_positions: Tensor | None = None,
        mlm_labels: Tensor | None = None,
        nsp_labels: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> PreTrainingOutput:
        B, S = input_ids.shape
        paths = self._fast_paths(input_ids)
        cls = torch.arange(B, device=input_ids.device) * S
        subset = self._subset(paths, masked_positions, cls)  # [CLS] rows, then the masked ones
        with self._embedding_grad(paths, mlm_labels):
            x, pack = self.bert.encode(input_ids, token_type_ids, attention_mask, document_ids, subset)  # (T, H)
            if subset is None:
                pooled, mlm_logits = self.bert.pool(x, pack), self._mlm_logits(x, pack, masked_positions)
            else:  # (B + N, H)
                pooled, mlm_logits = self.bert.pool_rows(x[:B]), self.mlm_head(x[B:], paths)
        nsp_logits = self.cls.seq_relationship(pooled)  # (B, 2)
        return self._with_losses(PreTrainingOutput(mlm_logits, nsp_logits), mlm_labels, nsp_labels)

    def mlm_head(self, x: Tensor, paths: FastPaths) -> Tensor:
        return self.cls.predictions(x, paths)


TIED_KEYS = tuple(BertForPreTraining.TIED)  # the keys transformers' BERT directories store once


def _classifier_init(layer: nn.Linear, config: BertConfig) -> None:
    """transformers' BERT init of a classifier (normal, initializer_range; ours truncated at 2 std)."""
    trunc_normal_(layer.weight, config.initializer_range, 2.0)
    nn.init.zeros_(layer.bias)


CONFIG = BertConfig
TASK_HEADS = TaskHeads(
    hf_task_classes("Bert"),
    span_layer="qa_outputs",
    token_types=True,
    dropout="hidden_dropout",
    span_dropout=False,
    init=_classifier_init,
)
