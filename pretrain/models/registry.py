"""The registry: the one place a model family is named. Everything else asks it.

A family is a module of pretrain/models/ (bert.py, modernbert.py) that defines `CONFIG` (its config class, whose
`model_type` is the family's name, as in transformers' config.json), `PRESETS` (preset name -> shape) and
`TASK_HEADS` (how its transformers task classes differ, for fine-tuning); a third family is one such module and
one line in `FAMILIES`.

Callers that must not care which family they hold (training loop, evaluation, checkpoints, export, bench,
fine-tuning) go through these functions: `load_config` (`--model`/`--model-set`), `kernel_options` (the
`--model-set` keys that are speed switches, `kernels.KernelOptions`: runtime options handed to the model
constructors, never part of the config), `config_from_dict` (a checkpoint's saved config, the inverse of
`dataclasses.asdict`), `build_pretraining_model`, `build_encoder`,
`from_hf_pretrained`, `pretraining_from_state`, `flops_per_sequence`, `shape_mismatch` and `task_heads`; the
package (`pretrain.models`) exports them. What the families share is pretrain/models/base.py.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from common.errors import UserError
from common.flags import fields_in, option, parse_value
from pretrain.models import bert, modernbert
from pretrain.models.base import PreTrainingModel, TaskHeads, read_json
from pretrain.models.kernels import OPTION_NAMES, KernelOptions

FAMILIES = {"bert": bert, "modernbert": modernbert}
"""model_type -> its module (CONFIG, PRESETS, TASK_HEADS), in the order --help lists their presets."""


def families() -> dict[str, type]:
    """model_type -> config class."""
    return {name: family.CONFIG for name, family in FAMILIES.items()}


def presets() -> dict[str, type]:
    """Preset name -> its family's config class."""
    return {preset: family.CONFIG for family in FAMILIES.values() for preset in family.PRESETS}


def task_heads(model_type: str) -> TaskHeads:
    """How the family's transformers task classes differ (finetune.model builds its heads from it)."""
    return FAMILIES[model_type].TASK_HEADS


@dataclass(kw_only=True)
class ModelFlags:
    """`--model` and `--model-set`: the model flags of every command that builds a model from scratch."""

    model: str = "base"
    """Preset (BERT: tiny, mini, small, medium, base, large; ModernBERT: modernbert-mini, modernbert-tiny,
    modernbert-base, modernbert-large) or a model JSON (ours, or a Hugging Face config.json of BERT or ModernBERT)."""
    model_set: list[str] = option(default_factory=list, action="append", metavar="KEY=VALUE")
    """Override one model config field or speed switch, e.g. vocab_size=8192, fused_ops=compile or unpad=false
    (repeatable)."""

    def model_config(self):
        return load_config(self.model, self.model_set)

    def kernel_options(self) -> KernelOptions:
        return kernel_options(self.model, self.model_set)


def _is_json(spec: str) -> bool:
    return spec.endswith(".json") or os.path.sep in spec


def load_config(spec: str, overrides: Sequence[str] = ()):
    """`--model` value (a preset name or a path to a JSON file), then `--model-set KEY=VALUE` field overrides;
    the keys that are speed switches (the family's KERNEL_OPTIONS) are checked here and left to `kernel_options`."""
    if _is_json(spec):
        config = config_from_json(spec)
    elif spec in presets():
        config = presets()[spec].preset(spec)
    else:
        raise UserError(f"--model: unknown preset {spec!r}; use one of {', '.join(presets())} or a JSON file")
    cls, changes = type(config), {}
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            if "=" not in item or key == "model_type":
                raise ValueError
            if key in cls.KERNEL_OPTIONS:
                _option(item)
            else:
                changes[key] = parse_value(cls, key, value)
        except ValueError:
            fields = [f.name for f in dataclasses.fields(cls) if f.name != "model_type"] + list(cls.KERNEL_OPTIONS)
            keys = ", ".join(fields)
            raise UserError(f"--model-set {item!r}: use KEY=VALUE (booleans true/false), KEY one of {keys}") from None
    return dataclasses.replace(config, **changes)


def kernel_options(spec: str, overrides: Sequence[str] = ()) -> KernelOptions:
    """The speed switches of `--model spec --model-set ...`: the `KernelOptions` keys among the overrides, over
    those a model JSON saved before KernelOptions holds (where they were config fields); others are skipped
    (`load_config` checks them)."""
    saved = {k: v for k, v in read_json(spec).items() if k in OPTION_NAMES} if _is_json(spec) else {}
    try:
        chosen = dict(_option(item) for item in overrides if item.partition("=")[0] in OPTION_NAMES)
    except ValueError as e:
        raise UserError(f"--model-set: {e}") from None
    return KernelOptions(**{**saved, **chosen})


def _option(item: str) -> tuple[str, object]:
    """`KEY=VALUE` of a KernelOptions field, checked (ValueError: the value does not fit the field's type)."""
    key, _, value = item.partition("=")
    parsed = parse_value(KernelOptions, key, value)
    KernelOptions(**{key: parsed})  # its own one-line error for an impossible request (fused_ops=apex without apex)
    return key, parsed


def config_from_json(path: str):
    """Our config JSON (`to_json`) or a transformers config.json, of either family."""
    d = read_json(path)
    return _family(d, path).from_dict(d, path)


def config_from_dict(d: dict):
    """The config `dataclasses.asdict(config)` came from (no model_type: BERT, as saved before ModernBERT). The
    speed switches of configs saved before KernelOptions are dropped: a reader of weights takes this machine's
    paths, not those of the run that saved them (fused_ops=apex, say, on a machine without apex)."""
    return _family(d, "the saved model config").from_dict(d, "the saved model config")


def _family(d: dict, source: str) -> type:
    family = d.get("model_type", "bert")
    if family not in families():
        raise UserError(f"--model: {source} has model_type {family!r}; use one of {', '.join(families())}")
    return families()[family]


def build_pretraining_model(config, options: KernelOptions | None = None) -> PreTrainingModel:
    """BertForPreTraining or ModernBertForMaskedLM, freshly initialized (seed torch first); `options`: its speed
    switches (None: the fast defaults)."""
    return config.pretraining_class()(config, options)


def build_encoder(config, options: KernelOptions | None = None) -> nn.Module:
    """BertModel or ModernBertModel: forward(input_ids, token_type_ids, attention_mask) -> (B, S, H), (B, H);
    their parameters sit under `HF_PREFIX` in transformers' task models (fine-tuning heads go on top)."""
    return config.encoder_class()(config, options)


def from_hf_pretrained(path: str, options: KernelOptions | None = None) -> PreTrainingModel:
    """Our pretraining model from a transformers directory of either family."""
    config = config_from_json(os.path.join(path, "config.json"))
    return config.pretraining_class().from_hf_pretrained(path, options)


def pretraining_from_state(
    config, state: dict[str, Tensor], source: str = "the weights", options: KernelOptions | None = None
) -> PreTrainingModel:
    """Our pretraining model of `config` holding `state` (transformers' names; tied keys may be absent)."""
    return config.pretraining_class().from_state(config, state, source, options)


def flops_per_sequence(config, seq_len: int, masked_positions: int, options: KernelOptions | None = None) -> float:
    """Training FLOPs (forward + backward) of one sequence of `seq_len` real tokens whose MLM head runs on
    `masked_positions` rows, with `options`' last layer; the formula of the config's family (`training_flops`)."""
    sparse_last_layer = (KernelOptions() if options is None else options).last_layer_on_heads_rows
    return config.training_flops(seq_len, masked_positions, sparse_last_layer)


def shape_mismatch(saved: dict, config) -> list[str]:
    """Fields of a checkpoint's saved config (`asdict`) that must equal `config`'s to resume from it."""
    if saved.get("model_type", "bert") != config.model_type:
        return ["model_type"]
    ours = dataclasses.asdict(config)
    return [k for k in fields_in(type(config), "shape") if saved.get(k, ours[k]) != ours[k]]
