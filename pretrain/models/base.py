"""What the model families share: `ModelConfig` (JSON in and out), `Encoder` (forward = encode, pad, pool),
`PreTrainingModel` (MLM logits, losses, transformers directories by parameter name), `PreTrainingOutput`,
`TaskHeads` (a family's fine-tuning classes), init and weight-reading helpers.

Both families' pretraining models subclass `PreTrainingModel`: forward takes the batch dict of docs/DESIGN.md
and returns a `PreTrainingOutput`. The family modules import this one; it imports none of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import UserError
from common.files import write_json_atomic
from pretrain.models.attention import Packing
from pretrain.models.fused import TiedGrad
from pretrain.models.kernels import OPTION_NAMES, FastPaths, FastPathsMixin, KernelOptions

IGNORE_INDEX = -100
"""The label of a position without a loss (transformers' convention): MLM labels, NSP labels with no pair task,
fine-tuning tags off a word's first piece. The one place the value is written."""


def trunc_normal_(weight: Tensor, std: float, cutoff: float) -> Tensor:
    """N(0, std^2) truncated at +-cutoff std, in place, by the inverse CDF: one pass, where torch 2.13's
    `nn.init.trunc_normal_` redraws rejected values in a loop that takes seconds on a large embedding."""
    edge = math.erf(cutoff / math.sqrt(2.0))  # the CDF mass inside +-cutoff, mapped to erf's (-1, 1)
    with torch.no_grad():
        weight.uniform_(-edge, edge).erfinv_().mul_(std * math.sqrt(2.0))
        return weight.clamp_(-cutoff * std, cutoff * std)


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--model: cannot read model config {path}: {e}; pass a preset name or a JSON file") from e


def unknown_keys(cls, d: dict, path: str, known: set[str] = frozenset()) -> None:
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)} - known
    if unknown:
        raise UserError(f"--model: {path} has unknown keys {sorted(unknown)}; remove them")


class ModelConfig:
    """JSON in and out, shared by both families' config dataclasses. A subclass sets HF_KEYS (keys only
    transformers' config.json has), KERNEL_OPTIONS (the `KernelOptions` its models read) and `from_hf`."""

    HF_KEYS: tuple[str, ...] = ()
    KERNEL_OPTIONS: tuple[str, ...] = OPTION_NAMES

    @classmethod
    def from_json(cls, path: str):
        """Read our JSON (see `to_json`) or transformers' config.json."""
        return cls.from_dict(read_json(path), path)

    @classmethod
    def from_dict(cls, d: dict, path: str = "the model config"):
        """Our JSON (`asdict`) or transformers' config.json (told apart by HF_KEYS). The speed switches that
        configs saved before `KernelOptions` hold are dropped: they are runtime options now."""
        if any(k in d for k in cls.HF_KEYS):
            return cls.from_hf(d)
        d = {k: v for k, v in d.items() if k not in OPTION_NAMES}
        unknown_keys(cls, d, path)
        return cls(**d)

    def to_json(self, path: str) -> None:
        write_json_atomic(path, dataclasses.asdict(self))


@dataclass
class PreTrainingOutput:
    """What both families' pretraining models return; losses are None without the matching labels."""

    mlm_logits: Tensor  # (N, V) with masked_positions, else (B, S, V)
    nsp_logits: Tensor | None = None  # (B, 2); None for ModernBERT (MLM only)
    loss: Tensor | None = None  # mlm_loss + nsp_loss (those present)
    mlm_loss: Tensor | None = None
    nsp_loss: Tensor | None = None


class Encoder(FastPathsMixin, nn.Module):
    """What both families' encoders share: `forward` pads `encode`'s rows back to (B, S, H) and pools them.
    A subclass defines `encode(input_ids, token_type_ids, attention_mask, document_ids) -> (rows (T, H),
    Packing)` and `pool(rows, pack) -> (B, H)`."""

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """-> (sequence_output (B, S, H), pooled (B, H)); padded rows are zeros when unpadding."""
        x, pack = self.encode(input_ids, token_type_ids, attention_mask, document_ids)
        return pack.pad(x).view(*input_ids.shape, -1), self.pool(x, pack)


def last_layer(layers: nn.ModuleList, pack: Packing, subset: Tensor | None) -> list[tuple[nn.Module, Tensor | None]]:
    """(layer, rows) for the encoder loop: rows is None but for the last layer given a `subset` of flat positions,
    whose rows alone it carries past attention (every row still gives its keys and values): the only rows the
    pretraining heads read (MosaicBERT's last-layer subset). With the MLM head on 15-30% of the tokens this skips
    most of one layer's output projection and feed-forward: about 5% of BERT-base's layer work at 15% masked, 2% of
    ModernBERT-base's at 30% (the FLOP formulas)."""
    rows = None if subset is None else pack.rows_of(subset)
    return [(layer, rows if i == len(layers) - 1 else None) for i, layer in enumerate(layers)]


class PreTrainingModel(FastPathsMixin, nn.Module):
    """What both families' pretraining models share: the MLM logits and losses, and transformers directories.
    A subclass sets CONFIG (our config class), HF_CLASS (the transformers class it matches parameter for
    parameter), TIED (keys that transformers stores once -> the key they equal), EMBEDDING and DECODER (the token
    embedding, a fused.TiedEmbedding, and the MLM decoder tied to it, a fused.TiedDecoder) and
    `mlm_head(rows, paths)`."""

    CONFIG: type
    HF_CLASS: str
    TIED: dict[str, str]
    EMBEDDING: str
    DECODER: str
    compiled = False  # `compile()` was called (DeepSpeed's engine.compile calls it)

    def compile(self, *args, **kwargs) -> None:
        """`nn.Module.compile`, noting that the model is compiled (`_embedding_grad`)."""
        self.compiled = True
        super().compile(*args, **kwargs)

    def _fast_paths(self, input_ids: Tensor) -> FastPaths:
        """The paths this forward follows (the encoder's `encode` looks up the same)."""
        return self.paths.for_input(input_ids, self.get_submodule(self.EMBEDDING).weight)

    @contextlib.contextmanager
    def _embedding_grad(self, paths: FastPaths, mlm_labels: Tensor | None) -> Iterator[None]:
        """While a forward that computes the MLM loss runs: with `sparse_embedding_grad`, the tied decoder's
        backward keeps its dense vocabulary x hidden weight gradient for the token embedding's backward, which
        adds the looked-up rows into it in place (`TiedGrad`), instead of a zero-filled dense gradient of
        its own and a third buffer for autograd's sum: two 155 MB buffers less per ModernBERT-base step, a fifth
        of its CPU step where each new buffer is page-faulted in (glibc's defaults; docs/PERFORMANCE.md). Not in
        a compiled model: the decoder and the lookup stay the modules inductor traces."""
        rows = paths.sparse_embedding_grad and mlm_labels is not None and torch.is_grad_enabled()
        if not rows or self.compiled or torch.compiler.is_compiling():
            yield
            return
        embedding, decoder = self.get_submodule(self.EMBEDDING), self.get_submodule(self.DECODER)
        embedding.tied = decoder.tied = TiedGrad()
        try:
            yield
        finally:
            embedding.tied = decoder.tied = None

    def mlm_head(self, x: Tensor, paths: FastPaths) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _subset(paths: FastPaths, masked_positions: Tensor | None, *lead: Tensor) -> Tensor | None:
        """The flat positions the heads read (`lead`, then the masked ones) when the last layer runs on them
        alone (`sparse_last_layer`), else None."""
        if masked_positions is None or not paths.sparse_last_layer:
            return None
        return torch.cat([*lead, masked_positions])

    def _mlm_logits(self, x: Tensor, pack: Packing, masked_positions: Tensor | None) -> Tensor:
        paths = pack.paths
        if masked_positions is None:
            return self.mlm_head(pack.pad(x), paths).view(pack.batch, pack.seq_len, -1)  # (B, S, V)
        if paths.sparse_mlm_head:
            return self.mlm_head(x[pack.rows_of(masked_positions)], paths)  # (N, V): gather first, then the head
        return self.mlm_head(pack.pad(x), paths)[masked_positions]  # (N, V) via all B*S rows

    @staticmethod
    def _with_losses(out: PreTrainingOutput, mlm_labels: Tensor | None, nsp_labels: Tensor | None):
        if mlm_labels is not None:
            out.mlm_loss = cross_entropy(out.mlm_logits.flatten(0, -2), mlm_labels.flatten())
        if nsp_labels is not None and out.nsp_logits is not None:
            out.nsp_loss = cross_entropy(out.nsp_logits, nsp_labels)
        losses = [loss for loss in (out.mlm_loss, out.nsp_loss) if loss is not None]
        out.loss = sum(losses[1:], losses[0]) if losses else None
        return out

    @classmethod
    def with_tied(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """`state` with the keys transformers stores once (TIED) filled in from the tensors they equal."""
        state = dict(state)
        for tied, key in cls.TIED.items():
            if key in state:
                state.setdefault(tied, state[key])
        return state

    @classmethod
    def from_state(
        cls, config, state: dict[str, Tensor], source: str = "the weights", options: KernelOptions | None = None
    ):
        """A model of `config` holding `state` (transformers' names; the keys it stores once may be absent)."""
        model, state = cls(config, options), cls.with_tied(state)
        own = model.state_dict()
        found = [
            ([k for k in own if k not in state], "missing"),
            ([k for k in state if k not in own], "unexpected"),
            ([k for k in state if k in own and state[k].shape != own[k].shape], "of another shape"),
        ]
        if any(keys for keys, _ in found):
            problems = "; ".join(f"{len(keys)} tensors {what}, e.g. {keys[0]}" for keys, what in found if keys)
            raise UserError(f"{source} do not hold {cls.HF_CLASS} weights of this config: {problems}")
        model.load_state_dict(state, strict=True)
        return model

    @classmethod
    def from_hf_pretrained(cls, path: str, options: KernelOptions | None = None):
        """Load a Hugging Face directory (config.json + model.safetensors or pytorch_model.bin)."""
        config = cls.CONFIG.from_json(os.path.join(path, "config.json"))
        return cls.from_state(config, read_hf_weights(path), path, options)

    def save_hf_pretrained(self, path: str) -> None:
        """Write config.json + model.safetensors that `transformers.<HF_CLASS>.from_pretrained` loads."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        self.config.to_hf().save_pretrained(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k not in self.TIED}
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean fp32 cross-entropy over the labels that are not IGNORE_INDEX; 0, not NaN, when all are (NSP off)."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def read_hf_weights(path: str) -> dict[str, Tensor]:
    """State dict of an HF directory, with the legacy LayerNorm gamma/beta names mapped to weight/bias."""
    safetensors, binary = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.exists(safetensors):
        from safetensors.torch import load_file

        state = load_file(safetensors)
    elif os.path.exists(binary):
        state = torch.load(binary, map_location="cpu", weights_only=True)
    else:
        raise UserError(
            f"{path} has neither model.safetensors nor pytorch_model.bin; pass a Hugging Face model directory"
        )
    return {
        k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
        for k, v in state.items()
    }


@dataclass(frozen=True)
class TaskHeads:
    """Where one family's transformers task classes differ (BERT's are the reference); finetune.model builds its
    heads from it."""

    classes: dict[str, str]
    """Head kind -> the transformers class of the saved directory."""
    span_layer: str
    """Name of the span head's linear layer (the others' is `classifier`)."""
    token_types: bool
    """The encoder reads token_type_ids (BERT's segments A and B)."""
    dropout: str
    """The config field holding the dropout before the classifier."""
    span_dropout: bool
    """That dropout also comes before the span layer."""
    init: Callable[[nn.Linear, object], None]
    """Initialization of a new classifier."""
    head: Callable[[object], nn.Module] | None = None
    """The module between the encoder and the dropout, registered as `head` (ModernBERT's PredictionHead)."""


def hf_task_classes(prefix: str) -> dict[str, str]:
    """Head kind -> transformers' task class of the family whose classes start with `prefix` ("Bert")."""
    kinds = {"sequence": "SequenceClassification", "token": "TokenClassification", "span": "QuestionAnswering"}
    return {kind: f"{prefix}For{name}" for kind, name in kinds.items()}
