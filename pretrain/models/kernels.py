"""Fast paths shared by both model families (pretrain/models/bert.py, pretrain/models/modernbert.py), each with a
plain-PyTorch fallback that tests compare it against.

- `KernelOptions` is what a user asks for (`--model-set fused_ops=compile`): a runtime choice passed to the
  model's constructor, as transformers' `attn_implementation`, not a model-config field, so checkpoints and
  exported configs hold the weights' shape only and a reader of weights picks this machine's paths.
- `FastPaths` is every switch decided once for a device and compute dtype (`resolve`, docs/STYLE.md habit 12): an
  impossible request is a one-line UserError, a fallback one warning naming its cause; kernels only read it.
  `PathChoice` keeps the decisions of one model; under ZeRO-3 (`set_weights_partitioned`) the paths that
  read `module.weight` without calling the module are not chosen (the model knows nothing of the engine).
- The kernels themselves: pretrain/models/attention.py (`Packing`, `attention`) and pretrain/models/fused.py
  (pointwise tails, `Linear`, tied embedding and decoder). The optional CUDA packages are imported here, where
  the paths are decided; the kernels read them from this module.
"""

from __future__ import annotations

import functools
import platform
import warnings
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from common.errors import UserError

try:  # optional CUDA packages; never required
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine
except ImportError:
    fused_layer_norm_affine = None
try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

BACKENDS = ("auto", "plain", "compile", "apex")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_backend(fused_ops: str) -> None:
    """Config-time check of `fused_ops` (no device needed): a one-line error for an impossible request."""
    if fused_ops not in BACKENDS:
        raise UserError(f"--model-set fused_ops must be one of {', '.join(BACKENDS)}, not {fused_ops!r}")
    if fused_ops == "apex" and fused_layer_norm_affine is None:
        raise UserError("--model-set fused_ops=apex needs NVIDIA apex, which is not installed; use auto or plain")


@dataclass(frozen=True)
class KernelOptions:
    """The speed switches of a model (defaults are the fast paths; each other setting is the plain path):
    runtime options, not part of the model config or its checkpoints. `--model-set KEY=VALUE` sets them."""

    use_sdpa: bool = True
    """Attention through F.scaled_dot_product_attention (False: explicit softmax math)."""
    unpad: bool = True
    """Run the encoder on real tokens only (False: every padded position too)."""
    sparse_mlm_head: bool = True
    """Run the MLM head only on masked positions (False: on every position, then gather)."""
    sparse_last_layer: bool = True
    """With sparse_mlm_head: the last layer's output projection and feed-forward run only on the rows the heads
    read (masked positions, BERT's [CLS]) (False: on every row)."""
    sparse_embedding_grad: bool = True
    """CPU: the token embedding's gradient as its looked-up rows, added into the tied decoder's (False: dense)."""
    onednn_gemm: bool = True
    """x86 CPU, float32: the linear layers' products through oneDNN's matmul (False: torch's BLAS, MKL)."""
    fused_qkv: bool = True
    """BERT: project q, k and v with one GEMM (False: three); ModernBERT's Wqkv is one layer already."""
    fused_ops: str = "auto"
    """Pointwise ops and LayerNorm backend: auto (apex LayerNorm if on CUDA), plain, compile or apex."""

    def __post_init__(self):
        check_backend(self.fused_ops)

    @property
    def last_layer_on_heads_rows(self) -> bool:
        """sparse_last_layer as it applies: only with sparse_mlm_head (a head on every position reads every row)."""
        return self.sparse_last_layer and self.sparse_mlm_head


OPTION_NAMES = tuple(f.name for f in fields(KernelOptions))
"""The KernelOptions fields: `--model-set` keys that are not model-config fields (and the speed switches that
model configs saved before KernelOptions hold)."""


@dataclass(frozen=True)
class FastPaths:
    """The resolved switches of one model on one device and compute dtype."""

    unpad: bool = True  # layers run on the real tokens only
    attention: str = "grouped"  # "flash-attn varlen" | "torch varlen" | "grouped" (CPU varlen) | "padded"
    sdpa: bool = True  # scaled_dot_product_attention (False: explicit softmax) outside varlen kernels
    ops: str = "plain"  # "plain" | "compile" | "apex"
    fused_qkv: bool = True  # one GEMM on concatenated q/k/v weights (BERT; ModernBERT's Wqkv is one module)
    sparse_mlm_head: bool = True  # MLM head on masked positions only
    sparse_last_layer: bool = True  # the last layer past attention on the heads' rows only (with sparse_mlm_head)
    sparse_embedding_grad: bool = False  # the tied token embedding's gradient as rows (PreTrainingModel)
    gemm: str = "torch"  # linear layers' matrix products: "onednn" (oneDNN's matmul) | "torch" (torch's BLAS)
    deterministic: bool = False  # flash-attn's deterministic backward (ModernBERT's deterministic_flash_attn)

    def describe(self) -> dict[str, str]:
        """For the printed configuration."""
        return {
            "unpad": "real tokens only" if self.unpad else "every position",
            "attention": self.attention + (" + SDPA" if self.sdpa and "varlen" not in self.attention else ""),
            "ops": self.ops,
            "qkv": "one GEMM" if self.fused_qkv else "one per projection",
            "mlm_head": "masked positions only" if self.sparse_mlm_head else "every position",
            "last_layer": "the heads' rows past attention" if self.sparse_last_layer else "every row",
            "embedding_grad": "looked-up rows into the decoder's" if self.sparse_embedding_grad else "dense",
            "gemm": "oneDNN" if self.gemm == "onednn" else "torch",
        }


def resolve(
    config, options: KernelOptions, device: torch.device, dtype: torch.dtype, partitioned: bool = False
) -> FastPaths:
    """Decide every switch of `options` for `config` (its attention_dropout, its family's `KERNEL_OPTIONS`) on
    `device` and compute `dtype`;
    `partitioned`: weights exist only while their module is called (ZeRO-3). sparse_embedding_grad is a CPU path:
    on CUDA zeroing and adding a dense vocabulary x hidden gradient costs well under a millisecond, so the
    well-trodden dense kernel stays. onednn_gemm is a float32 x86 CPU path (`_resolve_gemm`)."""
    device = torch.device(device)
    fused_qkv = options.fused_qkv and "fused_qkv" in config.KERNEL_OPTIONS
    if fused_qkv and partitioned:
        _fallback("fused_qkv=true", "the query, key and value weights")
        fused_qkv = False
    return FastPaths(
        unpad=options.unpad,
        attention=_resolve_attention(config, options, device, dtype),
        sdpa=options.use_sdpa,
        ops=_resolve_ops(options.fused_ops, device, partitioned),
        fused_qkv=fused_qkv,
        sparse_mlm_head=options.sparse_mlm_head,
        sparse_last_layer=options.last_layer_on_heads_rows,
        sparse_embedding_grad=options.sparse_embedding_grad and device.type == "cpu",
        gemm=_resolve_gemm(options.onednn_gemm, device, dtype),
        deterministic=getattr(config, "deterministic_flash_attn", False),
    )


def _fallback(request: str, reads: str) -> None:
    warnings.warn(
        f"--model-set {request} falls back to the plain path: it reads {reads} outside their modules, which "
        "partitioned weights (ZeRO-3) do not allow",
        stacklevel=3,
    )


def _resolve_attention(config, options: KernelOptions, device: torch.device, dtype: torch.dtype) -> str:
    if not options.unpad:
        return "padded"
    if device.type != "cuda":
        return "grouped"
    if dtype not in LOW_PRECISION:
        why = f"varlen kernels need fp16 or bf16 and the model computes in {str(dtype).removeprefix('torch.')}"
    elif flash_attn_varlen_func is not None:
        return "flash-attn varlen"
    elif torch_varlen() is None:
        why = "neither flash-attn nor torch.nn.attention.varlen is available"
    elif config.attention_dropout > 0:
        why = (
            f"flash-attn is not installed and torch's varlen kernel has no dropout (attention_dropout="
            f"{config.attention_dropout}); install flash-attn or --model-set attention_dropout=0"
        )
    else:
        return "torch varlen"
    warnings.warn(
        f"unpadded attention pads each batch back for SDPA: {why}; the other layers stay unpadded", stacklevel=2
    )
    return "padded"


def _resolve_ops(backend: str, device: torch.device, partitioned: bool) -> str:
    check_backend(backend)
    if backend == "apex" and device.type != "cuda":
        raise UserError(f"--model-set fused_ops=apex needs a CUDA device, not {device.type}; use auto or plain")
    if backend in ("compile", "apex") and partitioned:
        _fallback(f"fused_ops={backend}", "linear and LayerNorm weights")
        return "plain"
    if backend == "auto":
        return "apex" if fused_layer_norm_affine is not None and device.type == "cuda" and not partitioned else "plain"
    return backend


def _resolve_gemm(onednn: bool, device: torch.device, dtype: torch.dtype) -> str:
    """oneDNN's matmul for float32 on x86 CPUs; elsewhere torch's (CUDA's cuBLAS; bf16 on CPU goes to oneDNN
    already; on ARM oneDNN's float32 GEMM may trail the platform's BLAS, and is not measured here)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if not (onednn and device.type == "cpu" and dtype == torch.float32 and x86):
        return "torch"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not torch.backends.mkldnn.is_available():
        warnings.warn(
            "--model-set onednn_gemm=true falls back to torch's GEMM: this torch build has no oneDNN matmul "
            "(torch.ops.mkldnn._linear_pointwise)",
            stacklevel=3,
        )
        return "torch"
    return "onednn"


@functools.cache
def torch_varlen():
    """torch.nn.attention.varlen.varlen_attn, or None; imported on first CUDA use (it imports torch._dynamo)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


class PathChoice:
    """The fast paths of one model, decided once per (device type, compute dtype) and then only looked up."""

    def __init__(self, config, options: KernelOptions | None = None):
        self.config = config
        self.options = KernelOptions() if options is None else options
        self.partitioned = False
        self._chosen: dict[tuple[str, torch.dtype], FastPaths] = {}

    def set_partitioned(self, partitioned: bool) -> None:
        self.partitioned = partitioned
        self._chosen.clear()

    def get(self, device: torch.device, dtype: torch.dtype) -> FastPaths:
        key = (torch.device(device).type, dtype)
        if key not in self._chosen:
            self._chosen[key] = resolve(self.config, self.options, torch.device(device), dtype, self.partitioned)
        return self._chosen[key]

    def for_input(self, input_ids: Tensor, weight: Tensor) -> FastPaths:
        """The paths of a forward pass: the input's device, autocast's dtype if on, else the weights'."""
        kind = input_ids.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
        return self.get(input_ids.device, dtype)


class FastPathsMixin:
    """`resolve_fast_paths` and `set_weights_partitioned` for a model holding its `PathChoice` as `self.paths`."""

    paths: PathChoice

    def resolve_fast_paths(self, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
        """Decide every fast path for `device` and compute `dtype` now (UserError for an impossible request, one
        warning per fallback); forward then only follows the decision. Returns it for the printed configuration."""
        return self.paths.get(device, dtype).describe()

    def set_weights_partitioned(self, partitioned: bool) -> None:
        """Weights are gathered only while their module is called (ZeRO-3): take the paths that call modules."""
        self.paths.set_partitioned(partitioned)
