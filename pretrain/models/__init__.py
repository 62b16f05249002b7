"""The models layer: the registry (`registry.py`, whose functions this package exports), what the families
share (`base.py`), one module per family (`bert.py`, `modernbert.py`; pure torch, no deepspeed) and the fast
paths with their plain fallbacks (`kernels.py`). It imports nothing from pretrain.runtime or above
(tests/test_layers.py).
"""

from pretrain.models.registry import (
    FAMILIES,
    ModelFlags,
    build_encoder,
    build_pretraining_model,
    config_from_dict,
    config_from_json,
    families,
    flops_per_sequence,
    from_hf_pretrained,
    kernel_options,
    load_config,
    presets,
    pretraining_from_state,
    shape_mismatch,
    task_heads,
)

__all__ = [
    "FAMILIES",
    "ModelFlags",
    "build_encoder",
    "build_pretraining_model",
    "config_from_dict",
    "config_from_json",
    "families",
    "flops_per_sequence",
    "from_hf_pretrained",
    "kernel_options",
    "load_config",
    "presets",
    "pretraining_from_state",
    "shape_mismatch",
    "task_heads",
]
