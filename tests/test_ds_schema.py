"""Strict DeepSpeed JSON (issue 28, item 4): misspelled keys that DeepSpeed would ignore or raise as a traceback
are refused in one line naming the nearest valid key; every JSON we ship passes."""

import json
from pathlib import Path

import pytest

from common.errors import UserError
from pretrain.runtime import ds_schema
from pretrain.runtime.ds_config import deepspeed_top_level_keys, load_ds_config, resolve_batch

ROOT = Path(__file__).resolve().parents[1]
BASE = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Lamb", "params": {}}}


def write(tmp_path: Path, **cfg) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**BASE, **cfg}))
    return str(path)


@pytest.mark.parametrize(
    ("key", "value", "nearest"),
    [("zero_optimisation", {"stage": 2}, "zero_optimization"), ("gradient_cliping", 1.0, "gradient_clipping")],
)
def test_a_misspelled_top_level_key_is_refused_with_the_nearest_valid_one(tmp_path, key, value, nearest):
    path = write(tmp_path, **{key: value})
    with pytest.raises(UserError, match=f'unknown top-level key "{key}".*did you mean {nearest}\\?') as e:
        load_ds_config(path)
    assert "\n" not in str(e.value) and path in str(e.value)


def test_a_key_nothing_resembles_is_refused_without_a_guess(tmp_path):
    with pytest.raises(UserError, match='unknown top-level key "xyzzy".*remove it'):
        load_ds_config(write(tmp_path, xyzzy=1))


def test_the_valid_keys_are_the_ones_deepspeeds_parser_reads():
    """A DeepSpeed internal (DeepSpeedConfig._initialize_params): fails loudly if an upgrade stops reading these."""
    keys = deepspeed_top_level_keys()
    shipped = {k for p in (ROOT / "ds_configs").glob("*.json") for k in json.loads(p.read_text())}
    assert shipped <= keys
    assert {"zero_optimization", "gradient_clipping", "bf16", "activation_checkpointing", "wandb"} <= keys
    assert "zero_optimisation" not in keys and "stage" not in keys  # nested keys are not top-level ones


def test_every_shipped_json_passes():
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        cfg = json.loads(path.read_text())
        cfg.get("fp16", {})["enabled"] = False  # fp16 needs a GPU, refused on CPU for another reason
        load_ds_config(cfg)


def test_a_misspelled_nested_field_is_one_line_naming_section_and_nearest_field(tmp_path):
    with pytest.raises(UserError) as e:
        load_ds_config(write(tmp_path, zero_optimization={"stage": 2, "overlap_com": True}))
    msg = str(e.value)
    assert (
        "\n" not in msg
        and "zero_optimization.overlap_com" in msg
        and "did you mean zero_optimization.overlap_comm?" in msg
    )


def test_a_bad_nested_value_is_one_line(tmp_path):
    with pytest.raises(UserError, match="zero_optimization.stage: Input should be") as e:
        load_ds_config(write(tmp_path, zero_optimization={"stage": "two"}))
    assert "\n" not in str(e.value)


def test_a_missing_batch_key_names_the_accepted_ones():
    with pytest.raises(UserError) as e:
        resolve_batch({"gradient_accumulation_steps": 2}, 1)
    assert all(k in str(e.value) for k in ds_schema.BATCH_KEYS)


def test_nearest():
    assert ds_schema.nearest("zero_optimisation", {"zero_optimization", "optimizer"}) == "zero_optimization"
    assert ds_schema.nearest("qqq", {"zero_optimization"}) is None
