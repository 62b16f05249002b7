"""ModernBERT (Warner et al. 2024) for MLM pretraining, parameter for parameter `transformers.ModernBertForMaskedLM`.

The architecture: pre-LayerNorm without biases; rotary position embeddings with base `global_rope_theta` in
global layers and `local_rope_theta` in local ones; GeGLU feed-forward (Wi projects to 2 I: gelu(first half) *
second half); layers 0, n, 2n, ... (n = `global_attn_every_n_layers`) attend globally, the others within a
sliding window of `local_attention` tokens (|i - j| <= local_attention / 2, as transformers); a LayerNorm after
the embeddings (so layer 0 has no attention norm) and after the last layer; the MLM head (dense, GELU,
LayerNorm) feeds a decoder tied to the token embeddings, with its own bias. Config fields, parameter names and
shapes are transformers', so weights and config.json move both ways (`from_hf_pretrained`/`save_hf_pretrained`).

Where this differs from transformers' code (same numbers; tests/test_modernbert.py): the same kernels and
packing as BERT (pretrain/models/attention.py, fused.py): the layers run unpadded, attention is varlen on CUDA and
grouped on CPU, with `document_ids` documents packed in one row attend only within themselves and positions
restart there; the MLM head runs on masked positions only, and the last layer past attention on those rows
alone; on an x86 CPU in float32 the linear layers compute on oneDNN's matmul (fused.Linear); RoPE angles come
from each kept row's position, with no buffers (a bf16 engine would round them). Forward takes BERT's batch dict:
token_type_ids and nsp_labels are accepted and ignored, and the output's nsp_logits and nsp_loss are None.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import UserError
from common.flags import option
from pretrain.models import attention, fused, kernels
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
from pretrain.models.kernels import FastPaths

PRESETS = {  # the released ModernBERT-base and -large shapes, and small ones of the same design
    # mini: the demo's, sized for a few CPU minutes (4 layers: global attention in layers 0 and 3)
    "modernbert-mini": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=2, intermediate_size=256),
    "modernbert-tiny": dict(num_hidden_layers=6, hidden_size=256, num_attention_heads=4, intermediate_size=384),
    "modernbert-base": dict(num_hidden_layers=22, hidden_size=768, num_attention_heads=12, intermediate_size=1152),
    "modernbert-large": dict(num_hidden_layers=28, hidden_size=1024, num_attention_heads=16, intermediate_size=2624),
}
HF_MARKS = ("architectures", "transformers_version", "layer_types", "rope_parameters", "_name_or_path")


@dataclass
class ModernBertConfig(ModelConfig):
    """Model shape (transformers' field names and defaults); JSON-serializable. The speed switches are
    `kernels.KernelOptions`, given to the model."""

    HF_KEYS = HF_MARKS
    KERNEL_OPTIONS = tuple(o for o in kernels.OPTION_NAMES if o != "fused_qkv")  # Wqkv is one layer already
    model_type: Literal["modernbert"] = "modernbert"
    """Model family (pretrain.models), as in transformers' config.json."""
    vocab_size: int = option(50368, group="shape")
    """Vocabulary size (rows of the token embedding and of the tied MLM decoder)."""
    hidden_size: int = option(768, group="shape")
    """Width H of every token representation."""
    intermediate_size: int = option(1152, group="shape")
    """Width I of the GeGLU feed-forward (Wi projects to 2 I)."""
    num_hidden_layers: int = option(22, group="shape")
    """Number of transformer layers L."""
    num_attention_heads: int = option(12, group="shape")
    """Attention heads per layer; must divide hidden_size into an even head size (RoPE)."""
    hidden_activation: Literal["gelu"] = option("gelu", group="shape")
    """Activation of the GeGLU (exact GELU)."""
    max_position_embeddings: int = 8192
    """Longest sequence trained for (RoPE has no position table)."""
    global_attn_every_n_layers: int = option(3, group="shape")
    """Layers 0, n, 2n, ... attend globally; the others within the local window."""
    local_attention: int = option(128, group="shape")
    """Sliding window of the local layers, in tokens: query i sees keys j with |i - j| <= local_attention / 2."""
    global_rope_theta: float = option(160000.0, group="shape")
    """RoPE base of the global layers (raise it to extend the context)."""
    local_rope_theta: float = option(10000.0, group="shape")
    """RoPE base of the local layers."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    norm_bias: bool = option(False, group="shape")
    """LayerNorms with a bias."""
    attention_bias: bool = option(False, group="shape")
    """Wqkv and attention Wo with biases."""
    mlp_bias: bool = option(False, group="shape")
    """Wi and MLP Wo with biases."""
    decoder_bias: bool = option(True, group="shape")
    """A bias on the tied MLM decoder."""
    embedding_dropout: float = 0.0
    """Dropout after the embedding norm."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities and on the attention output."""
    mlp_dropout: float = 0.0
    """Dropout between the GeGLU and the MLP's Wo."""
    initializer_range: float = 0.02
    """Standard deviation of the input weights' truncated normal (outputs: divided by sqrt(2 L))."""
    initializer_cutoff_factor: float = 2.0
    """The truncated normal's cutoff, in standard deviations."""
    pad_token_id: int = 50283
    """The tokenizer's pad id (the token embedding's padding_idx)."""
    bos_token_id: int = 50281
    """The tokenizer's bos id (written to config.json)."""
    eos_token_id: int = 50282
    """The tokenizer's eos id (written to config.json)."""
    cls_token_id: int = 50281
    """The tokenizer's cls id (written to config.json)."""
    sep_token_id: int = 50282
    """The tokenizer's sep id (written to config.json)."""
    classifier_pooling: Literal["cls", "mean"] = "cls"
    """Sequence features for fine-tuning: the first token's row, or the mean over the real tokens."""
    classifier_dropout: float = 0.0
    """Dropout before a fine-tuning classifier."""
    classifier_bias: bool = False
    """A bias on the head's dense layer (MLM and fine-tuning heads)."""
    classifier_activation: Literal["gelu"] = "gelu"
    """Activation of the head's dense layer."""
    deterministic_flash_attn: bool = False
    """Deterministic flash-attn backward (slower)."""

    def __post_init__(self):
        heads = self.num_attention_heads
        if self.hidden_size % heads or (self.hidden_size // heads) % 2:
            raise UserError(f"--model: hidden_size {self.hidden_size} / {heads} heads is not an even head size")
        if self.global_attn_every_n_layers < 1 or self.local_attention < 2:
            raise UserError("--model-set: global_attn_every_n_layers must be >= 1 and local_attention >= 2")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise UserError(
                f"--model-set: pad_token_id {self.pad_token_id} is not an id of the vocabulary ({self.vocab_size}); "
                "also set pad_token_id=ID, the tokenizer's pad id"
            )

    @classmethod
    def preset(cls, name: str, **overrides) -> ModernBertConfig:
        """modernbert-mini, -tiny, -base or -large (mean pooling, as released), with optional field overrides."""
        if name not in PRESETS:
            raise UserError(f"--model: unknown preset {name!r}; use one of {', '.join(PRESETS)} or a JSON file")
        return cls(**{**PRESETS[name], "classifier_pooling": "mean", **overrides})

    @property
    def special_ids(self) -> dict[str, int]:
        """[CLS] and [MASK] ids, for batches made without a tokenizer (bert-bench's synthetic ones): cls_token_id,
        and the mask id of the tokenizer the presets come with (ModernBERT-base's; no config field holds it)."""
        return {"cls": self.cls_token_id, "mask": 50284}

    def is_global(self, layer: int) -> bool:
        return layer % self.global_attn_every_n_layers == 0

    def training_flops(self, seq_len: int, masked_positions: int, sparse_last_layer: bool = True) -> float:
        """Training FLOPs (3x forward) of one sequence of s = `seq_len` real tokens, P = `masked_positions` rows,
        `sparse_last_layer`: KernelOptions.last_layer_on_heads_rows:

        F = 24 L s h^2 + 18 L s h i + 12 h (G s^2 + (L - G) A) + 6 P h (h + V): q|k|v and output projections,
        the GeGLU's 2i-wide Wi and its Wo, attention scores and weighted sum over the query-key pairs that may
        attend (G global layers: s^2; local layers: A = s (2r + 1) - r (r + 1), r = min(local_attention / 2,
        s - 1)), and the MLM head. With the sparse last layer, its output projection and GeGLU (6 h^2 + 18 h i a
        row) run on P rows, not s. Embeddings, norms, RoPE and the GeGLU product are left out (under 1%)."""
        L, s, h, i, V = self.num_hidden_layers, seq_len, self.hidden_size, self.intermediate_size, self.vocab_size
        P, G = masked_positions, len(range(0, L, self.global_attn_every_n_layers))
        r = min(self.local_attention // 2, s - 1)
        pairs = G * s * s + (L - G) * (s * (2 * r + 1) - r * (r + 1))
        skipped = (s - P) * (6 * h * h + 18 * h * i) if sparse_last_layer else 0
        return 24 * L * s * h * h + 18 * L * s * h * i + 12 * h * pairs + 6 * P * h * (h + V) - skipped

    @classmethod
    def from_hf(cls, hf) -> ModernBertConfig:
        """From a `transformers.ModernBertConfig` or its config.json dict."""
        d = dict(hf if isinstance(hf, dict) else hf.to_dict())
        if {d.get("hidden_activation", "gelu"), d.get("classifier_activation", "gelu")} != {"gelu"}:
            raise UserError("--model: only ModernBERT configs with GELU activations are supported")
        if not d.get("tie_word_embeddings", True):
            raise UserError("--model: only ModernBERT configs with the decoder tied to the embeddings are supported")
        for kind, name in (("full_attention", "global_rope_theta"), ("sliding_attention", "local_rope_theta")):
            rope = (d.get("rope_parameters") or {}).get(kind) or {}
            if rope.get("rope_type", "default") != "default":
                raise UserError(f"--model: RoPE type {rope['rope_type']!r} is not supported; use the default RoPE")
            d[name] = rope.get("rope_theta", d.get(name, getattr(cls, name)))
        if d.get("layer_types"):
            d["global_attn_every_n_layers"] = _every_nth_global(d["layer_types"])
        keep = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in keep})

    def to_hf(self):
        """The equivalent `transformers.ModernBertConfig` (architectures set to ModernBertForMaskedLM)."""
        from transformers import ModernBertConfig as HFModernBertConfig

        ours = {"model_type", "global_attn_every_n_layers", "global_rope_theta", "local_rope_theta"}
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ours}
        kinds = ["full_attention" if self.is_global(i) else "sliding_attention" for i in range(self.num_hidden_layers)]
        rope = {
            "full_attention": {"rope_type": "default", "rope_theta": self.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta},
        }
        return HFModernBertConfig(**d, layer_types=kinds, rope_parameters=rope, architectures=["ModernBertForMaskedLM"])

    @staticmethod
    def pretraining_class() -> type[ModernBertForMaskedLM]:
        return ModernBertForMaskedLM

    @staticmethod
    def encoder_class() -> type[ModernBertModel]:
        return ModernBertModel


def _every_nth_global(layer_types: list[str]) -> int:
    """n of transformers' `layer_types` when it is 'layers 0, n, 2n, ... global', else a UserError."""
    n = next((i for i, t in enumerate(layer_types) if i and t == "full_attention"), len(layer_types))
    if layer_types != ["full_attention" if i % n == 0 else "sliding_attention" for i in range(len(layer_types))]:
        raise UserError(f"--model: layer_types {layer_types} is not 'every n-th layer global, from layer 0'")
    return n


def init_weights(module: nn.Module, c: ModernBertConfig, prefix: str = "") -> None:
    """transformers' init: truncated normal (+-cutoff std) with std for the inputs (embeddings, Wqkv, Wi) and
    std / sqrt(2 L) for the outputs (both Wo, head.dense); zero biases; LayerNorm weights one."""
    cut, small = c.initializer_cutoff_factor, c.initializer_range / math.sqrt(2.0 * c.num_hidden_layers)
    for name, m in module.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(m, nn.Linear | nn.Embedding) and m.weight.device.type != "meta":
            std = small if name.endswith(("Wo", "head.dense")) else c.initializer_range
            trunc_normal_(m.weight, std, cut)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
        if isinstance(m, nn.Linear | nn.LayerNorm) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _norm(c: ModernBertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(c.hidden_size, eps=c.norm_eps, bias=c.norm_bias)


class Embeddings(nn.Module):
    """model.embeddings: token embeddings of the kept rows, LayerNorm, dropout."""

    def __init__(self, c: ModernBertConfig):
        super().__init__()
        self.config = c
        self.tok_embeddings = fused.TiedEmbedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.norm = _norm(c)

    def forward(self, input_ids: Tensor, pack: Packing) -> Tensor:  # -> (T, H)
        x = fused.layer_norm(self.tok_embeddings(pack.keep(input_ids.flatten())), self.norm, pack.paths.ops)
        return F.dropout(x, self.config.embedding_dropout, self.training)


class Layer(nn.Module):
    """One pre-LN layer on packed rows: x + attn(norm(x)), then x + mlp(norm(x)); names as transformers'."""

    def __init__(self, c: ModernBertConfig, index: int):
        super().__init__()
        self.config, self.index = c, index
        H, inner, bias, Linear = c.hidden_size, c.intermediate_size, c.attention_bias, fused.Linear
        if index:  # layer 0 reads the embedding norm's output
            self.attn_norm = _norm(c)
        self.attn = nn.ModuleDict(dict(Wqkv=Linear(H, 3 * H, bias), Wo=Linear(H, H, bias)))
        self.mlp_norm = _norm(c)
        self.mlp = nn.ModuleDict(dict(Wi=Linear(H, 2 * inner, c.mlp_bias), Wo=Linear(inner, H, c.mlp_bias)))
        self.theta = c.global_rope_theta if c.is_global(index) else c.local_rope_theta
        self.window = None if c.is_global(index) else c.local_attention // 2

    def forward(self, x: Tensor, pack: Packing, rows: Tensor | None = None) -> Tensor:  # x: (T, H)
        """-> (T, H), or with `rows` (R,) only those rows past attention: (R, H)."""
        c, ops, gemm, heads = self.config, pack.paths.ops, pack.paths.gemm, self.config.num_attention_heads
        attn_p = c.attention_dropout if self.training else 0.0
        h = fused.layer_norm(x, self.attn_norm, ops) if self.index else x
        cos, sin = pack.rotary(self.theta, c.hidden_size // heads)  # (T, d) each
        qkv = fused.rotary(self.attn.Wqkv(h, gemm), cos, sin, heads, ops)  # (T, 3H)
        ctx = attention.attention(qkv, pack, heads, attn_p, self.window)  # (T, H)
        if rows is not None:
            ctx, x = ctx[rows], x[rows]  # (R, H)
        x = x + F.dropout(self.attn.Wo(ctx, gemm), attn_p)
        h = fused.geglu(self.mlp.Wi(fused.layer_norm(x, self.mlp_norm, ops), gemm), ops)  # (T, I)
        return x + self.mlp.Wo(F.dropout(h, c.mlp_dropout, self.training), gemm)


class ModernBertModel(Encoder):
    """The encoder (transformers' `ModernBertModel`): embeddings, L layers, final norm."""

    HF_PREFIX = "model"  # its parameters' prefix inside transformers' task models

    def __init__(self, config: ModernBertConfig, options: kernels.KernelOptions | None = None):
        super().__init__()
        self.config = config
        self.paths = kernels.PathChoice(config, options)
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = _norm(config)
        init_weights(self, config)

    def encode(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        subset: Tensor | None = None,
    ) -> tuple[Tensor, Packing]:
        """-> (the kept token rows (T, H) after the final norm, where they sit in the (B, S) batch); with `subset`
        (R,) flat positions of real tokens, the rows of those alone (R, H), in its order (`last_layer`).
        token_type_ids is ignored (ModernBERT has none; BertModel's signature)."""
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        paths = self.paths.for_input(input_ids, self.embeddings.tok_embeddings.weight)
        pack = Packing.build(attention_mask, document_ids, paths)
        x = self.embeddings(input_ids, pack)  # (T, H)
        for layer, rows in last_layer(self.layers, pack, subset):
            x = layer(x, pack, rows)
        return fused.layer_norm(x, self.final_norm, paths.ops), pack

    def pool(self, x: Tensor, pack: Packing) -> Tensor:
        """(B, H): each row's first token, or its real tokens' mean (classifier_pooling)."""
        return x[pack.first_rows()] if self.config.classifier_pooling == "cls" else pack.row_mean(x)


class PredictionHead(nn.Module):
    """`head`: dense, GELU, LayerNorm (the MLM transform; transformers' classifiers reuse it)."""

    def __init__(self, c: ModernBertConfig):
        super().__init__()
        self.dense = fused.Linear(c.hidden_size, c.hidden_size, bias=c.classifier_bias)
        self.norm = _norm(c)

    def forward(self, x: Tensor, paths: FastPaths) -> Tensor:
        return fused.layer_norm(fused.dense_gelu(x, self.dense, paths), self.norm, paths.ops)


class ModernBertForMaskedLM(PreTrainingModel):
    """ModernBERT with its MLM head, parameter for parameter `transformers.ModernBertForMaskedLM`."""

    CONFIG, HF_CLASS = ModernBertConfig, "ModernBertForMaskedLM"
    TIED = {"decoder.weight": "model.embeddings.tok_embeddings.weight"}
    EMBEDDING, DECODER = "model.embeddings.tok_embeddings", "decoder"

    def __init__(self, config: ModernBertConfig, options: kernels.KernelOptions | None = None):
        super().__init__()
        self.config = config
        self.model = ModernBertModel(config, options)
        self.paths = self.model.paths
        self.head = PredictionHead(config)
        self.decoder = fused.TiedDecoder(config.hidden_size, config.vocab_size, bias=False, device="meta")
        self.decoder.weight = self.model.embeddings.tok_embeddings.weight
        if config.decoder_bias:
            self.decoder.bias = nn.Parameter(torch.zeros(config.vocab_size))
        init_weights(self.head, config, prefix="head.")

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
        """The batch dict of docs/DESIGN.md; token_type_ids and nsp_labels are ignored (no NSP head)."""
        paths = self._fast_paths(input_ids)
        subset = self._subset(paths, masked_positions)
        with self._embedding_grad(paths, mlm_labels):
            x, pack = self.model.encode(input_ids, None, attention_mask, document_ids, subset)  # (T or N, H)
            logits = self._mlm_logits(x, pack, masked_positions) if subset is None else self.mlm_head(x, paths)
        return self._with_losses(PreTrainingOutput(logits), mlm_labels, None)

    def mlm_head(self, x: Tensor, paths: FastPaths) -> Tensor:  # (N, H) -> (N, V)
        return self.decoder(self.head(x, paths), paths.gemm)


def _classifier_init(layer: nn.Linear, config: ModernBertConfig) -> None:
    """transformers' ModernBERT init of a classifier: truncated normal with std hidden_size^-0.5."""
    trunc_normal_(layer.weight, 1 / math.sqrt(config.hidden_size), config.initializer_cutoff_factor)
    nn.init.zeros_(layer.bias)


def _task_head(config: ModernBertConfig) -> nn.Module:
    head = PredictionHead(config)
    init_weights(head, config, prefix="head.")  # dense: the output std, as transformers' init
    return head


CONFIG = ModernBertConfig
TASK_HEADS = TaskHeads(
    hf_task_classes("ModernBert"),
    span_layer="classifier",
    token_types=False,
    dropout="classifier_dropout",
    span_dropout=True,
    init=_classifier_init,
    head=_task_head,
)
