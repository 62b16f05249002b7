"""FLOP and throughput accounting shared by the training loop (MFU in metrics.jsonl) and bert-bench.

- Useful FLOPs are the model family's formula (`pretrain.models.flops_per_sequence`) on each sequence's real
  length and masked count: padding is not work, and a packed row counts each document as its own sequence.
- MFU divides by the device's dense peak (`PEAK_TFLOPS`, by GPU name and precision) or `--peak-tflops`; on a
  CPU there is no peak, so no MFU.
"""

from __future__ import annotations

import torch

from pretrain.models import flops_per_sequence

# Dense peak TFLOP/s of the tensor cores (no sparsity) by device name fragment and precision.
from pretrain.models.attention import Packing
from pretrain.models.kernels import FastPaths, KernelOptions
from pretrain.runtime import dist

PEAK_TFLOPS = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
}


def batch_flops(config, batch: dict, options: KernelOptions | None = None) -> float:
    """Useful training FLOPs of a batch: the formula on each sequence's real length and masked count, where a
    sequence is a row, or with `document_ids` each document packed into a row (attention stays inside it);
    `options`: the model's speed switches (the last layer's rows)."""
    pack = Packing.build(batch["attention_mask"], batch.get("document_ids"), FastPaths())
    masked = batch["masked_positions"]
    owner = masked // pack.seq_len if pack.sequence_of is None else pack.sequence_of.flatten()[masked]
    per_sequence = torch.bincount(owner, minlength=len(pack.lengths)).tolist()
    return sum(flops_per_sequence(config, s, p, options) for s, p in zip(pack.lengths, per_sequence))


def device_peak(device: torch.device, precision: str, override: float | None) -> float | None:
    """Peak TFLOP/s for MFU: --peak-tflops, else the table entry for this GPU, else None (CPU)."""
    if override is not None or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision] for key, peaks in PEAK_TFLOPS.items() if key in name), None)


def peak_memory() -> float:
    """Bytes: the accelerator's peak allocation, or on CPU the process's peak resident size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return float(torch.cuda.max_memory_allocated())
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_tflops(dtype: torch.dtype) -> float | None:
    """This GPU's dense peak TFLOP/s in `dtype`, for MFU; None on CPU or an unknown GPU."""
    return device_peak(dist.device(), {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"), None)
