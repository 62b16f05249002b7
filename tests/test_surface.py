"""The public surface, pinned: what users and their scripts rely on must not change by accident.

Pinned (tests/pins/): every command's flags with their defaults (read from its argparse parser, not from the
help prose, so rewording a help line changes nothing), each model preset's parameters in order and its
state-dict keys with shapes, the layout of a `--save` directory (file names, `train_state.json` keys, a tag's
files at ZeRO stage 0 and 2), the keys of `metrics.jsonl` records and of the exported `config.json`.

A pin changes only on purpose: `BERT_UPDATE_PINS=1 python -m pytest tests/test_surface.py` rewrites every pin
from today's code, and CHANGELOG.md says what changed and why. Old files keep working: a checkpoint written
by an earlier version (tests/fixtures/checkpoint_v0, saved by a real `bert-pretrain` run; see
tests/fixtures/make_checkpoint.py) resumes and exports, and model configs saved with every field of their day,
speed switches included (tests/fixtures/model_configs/), still load; the switches are runtime `KernelOptions` now.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import ds_configs
from pretrain.models import build_pretraining_model, config_from_dict, kernel_options, load_config, presets
from pretrain.models.kernels import OPTION_NAMES, KernelOptions

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "tests" / "pins"
FIXTURES = ROOT / "tests" / "fixtures"
UPDATE = os.environ.get("BERT_UPDATE_PINS") == "1"
ENTRY_POINTS = {
    name: (module, func)
    for name, module, func in re.findall(r'"(bert-[a-z]+)=([\w.]+):(\w+)"', (ROOT / "setup.py").read_text())
}
# Documented commands that are modules, not console scripts (the README and docs/ name them).
MODULE_COMMANDS = {
    "launch_multinode": ("pretrain.launcher", "cli"),
    "checkpoint": ("pretrain.checkpoint", "_main"),
    "finetune-tasks": ("finetune.demo_tasks", "main"),
}


def check_pin(name: str, text: str) -> None:
    """Compare `text` with tests/pins/NAME, or rewrite the pin under BERT_UPDATE_PINS=1."""
    path = PINS / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    old = path.read_text() if path.exists() else ""
    if old != text:
        diff = "".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True), f"pin {name}", "today"))
        pytest.fail(
            f"public surface changed ({name}):\n{diff}\nIf this change is on purpose, regenerate the pins with "
            "`BERT_UPDATE_PINS=1 python -m pytest tests/test_surface.py` and add an entry to CHANGELOG.md saying "
            "what changed and what users must do.",
            pytrace=False,
        )


# ---------------------------------------------------------------------------------------------- commands


class Captured(BaseException):
    """Raised with the parser instead of parsing (a BaseException: no run_cli turns it into an exit code)."""


def command_parser(name: str, module: str, func: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser the command builds, caught when it starts parsing: nothing runs."""

    def stop(self, args=None, namespace=None):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", stop)
    monkeypatch.setattr(sys, "argv", [name])
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # defaults that follow the core count pin a big machine's
    with pytest.raises(Captured) as caught:
        getattr(importlib.import_module(module), func)()
    return caught.value.args[0]


def portable(value) -> str:
    """A default as text, with this checkout's paths made relative (the pin must hold on any machine)."""
    text = repr(value)
    return text.replace(str(Path(ds_configs.__file__).parent), "<ds_configs>").replace(str(ROOT), "<root>")


def describe(parser: argparse.ArgumentParser, indent: str = "") -> list[str]:
    """One line per argument: its names, then what parsing does with it (action, type, nargs, choices, default)."""
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                lines += [f"{indent}{sub_name}:", *describe(sub, indent + "  ")]
            continue
        parts = [", ".join(action.option_strings) or action.dest, type(action).__name__.strip("_")]
        if action.type is not None:
            parts.append(f"type={getattr(action.type, '__name__', repr(action.type))}")
        if action.nargs is not None:
            parts.append(f"nargs={action.nargs}")
        if action.choices is not None:
            parts.append(f"choices={list(action.choices)}")
        if action.required:
            parts.append("required")
        if action.default is not argparse.SUPPRESS:
            parts.append(f"default={portable(action.default)}")
        lines.append(indent + " ".join(parts))
    return lines


@pytest.mark.parametrize("name", [*ENTRY_POINTS, *MODULE_COMMANDS])
def test_command_flags_and_defaults(name, monkeypatch):
    module, func = {**ENTRY_POINTS, **MODULE_COMMANDS}[name]
    parser = command_parser(name, module, func, monkeypatch)
    check_pin(f"commands/{name}.txt", "\n".join(describe(parser)) + "\n")


def test_a_removed_command_leaves_no_pin():
    """A new command fails its own pin test until pinned; a removed one must fail here, not pass unnoticed."""
    pinned = {p.stem for p in (PINS / "commands").glob("*.txt")}
    gone = pinned - {*ENTRY_POINTS, *MODULE_COMMANDS}
    if UPDATE:
        for name in gone:
            (PINS / "commands" / f"{name}.txt").unlink()
    else:
        assert not gone, f"commands {sorted(gone)} are gone: say so in CHANGELOG.md and regenerate the pins"


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("preset", list(presets()))
def test_preset_parameters_and_state_dict(preset):
    with torch.device("meta"):  # shapes only: large presets cost nothing
        model = build_pretraining_model(load_config(preset))
    lines = ["# parameters, in order (the optimizer's and ZeRO's flat layout)"]
    lines += [f"{n} {tuple(p.shape)}" for n, p in model.named_parameters()]
    lines += ["# state_dict keys (checkpoints, export)"]
    lines += [f"{n} {tuple(t.shape)}" for n, t in model.state_dict().items()]
    check_pin(f"models/{preset}.txt", "\n".join(lines) + "\n")


@pytest.mark.parametrize("preset", ["tiny", "modernbert-tiny"])
def test_speed_switches_leave_the_weights_layout_alone(preset):
    """Speed is a runtime choice: every switch off gives the same parameters and state dict as every one on."""
    config = load_config(preset)
    off = [f"{k}=plain" if k == "fused_ops" else f"{k}=false" for k in type(config).KERNEL_OPTIONS]
    assert load_config(preset, off) == config  # the switches are no config fields
    with torch.device("meta"):
        fast, plain = build_pretraining_model(config), build_pretraining_model(config, kernel_options(preset, off))
    layout = lambda m: [(n, t.shape) for n, t in [*m.named_parameters(), *m.state_dict().items()]]  # noqa: E731
    assert len(off) >= 7 and layout(fast) == layout(plain)


# ---------------------------------------------------------------------------------------------- checkpoints


def keys(d: dict, prefix: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    """Dotted key paths of nested dicts (the DeepSpeed JSON's own keys under `skip` are the user's, not ours)."""
    out = []
    for k, v in d.items():
        path = f"{prefix}{k}"
        out.append(path)
        if isinstance(v, dict) and path not in skip:
            out += keys(v, path + ".", skip)
    return out


def tree(directory: Path) -> list[str]:
    """Relative file names under `directory`, sorted, with step numbers written as NNNNNNNN."""
    names = {re.sub(r"step_\d{8}", "step_NNNNNNNN", str(p.relative_to(directory))) for p in directory.rglob("*")}
    return sorted(n for n in names if not (directory / n).is_dir() or n.endswith("zero"))


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> Path:
    """A copy of the checkpoint fixture (a directory the run resumes from, its relative paths intact)."""
    dst = tmp_path_factory.mktemp("surface") / "checkpoint_v0"
    shutil.copytree(FIXTURES / "checkpoint_v0", dst)
    return dst


def train(run_dir: Path, *extra: str) -> dict:
    """`bert-pretrain` in this process, launched from `run_dir` with the fixture's flags and `extra`."""
    from pretrain.train import main
    from pretrain.train_config import TrainConfig

    flags = json.loads((FIXTURES / "checkpoint_v0" / "flags.json").read_text())
    here = Path.cwd()
    os.chdir(run_dir)
    try:
        return main(TrainConfig.from_args([*flags, *extra]))
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def resumed(old_run) -> Path:
    """The old checkpoint resumed by today's code for one more step (it saves step 3 beside step 2)."""
    result = train(old_run, "--train-steps", "3", "--keep-last", "2")
    assert result["step"] == 3
    return old_run / "run"


def test_an_old_checkpoint_resumes_where_it_stopped(resumed):
    steps = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    old = [json.loads(line) for line in (FIXTURES / "checkpoint_v0/run/metrics.jsonl").read_text().splitlines()]
    old_steps = [r for r in old if "split" not in r]
    assert [r for r in steps if "split" not in r] == [*old_steps, steps[-2]]  # steps 1-2 kept: a resume
    assert (steps[-2]["step"], steps[-1]["step"], steps[-1]["split"]) == (3, 3, "eval")  # evaluated at the end
    assert (resumed / "latest").read_text().strip() == "step_00000003"
    state = json.loads((resumed / "step_00000003" / "train_state.json").read_text())
    assert state["step"] == 3 and state["consumed_samples"] == 12  # 3 steps of the fixture's global batch 4


def test_an_old_checkpoint_exports(old_run, tmp_path):
    from transformers import BertForPreTraining

    from pretrain.export import main as export

    here = Path.cwd()
    os.chdir(old_run)  # the checkpoint names its dataset (and so its tokenizer) relative to its run directory
    try:
        assert export(["run", str(tmp_path / "hf"), "--tag", "step_00000002"]) == 0  # verifies the logits itself
    finally:
        os.chdir(here)
    assert BertForPreTraining.from_pretrained(tmp_path / "hf").config.num_hidden_layers == 1


def test_checkpoint_layout_zero0(resumed):
    state = json.loads((resumed / "step_00000003" / "train_state.json").read_text())
    lines = ["# --save directory", *tree(resumed), "# train_state.json keys (config.ds is the user's JSON)"]
    lines += keys(state, skip=("config.deepspeed", "config.model"))
    check_pin("checkpoint_zero0.txt", "\n".join(lines) + "\n")


def test_checkpoint_layout_zero2(old_run, tmp_path):
    run_dir = tmp_path / "zero2"
    shutil.copytree(old_run / "data", run_dir / "data")
    shutil.copy(old_run / "model.json", run_dir)
    ds = json.loads((old_run / "ds.json").read_text())
    (run_dir / "ds.json").write_text(json.dumps({**ds, "zero_optimization": {"stage": 2}}))
    train(run_dir, "--train-steps", "1")
    check_pin("checkpoint_zero2.txt", "\n".join(["# --save directory", *tree(run_dir / "run")]) + "\n")


def test_metrics_jsonl_keys(resumed):
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    train_keys = next(r for r in records if "split" not in r)
    eval_keys = next(r for r in records if r.get("split") == "eval")
    lines = ["# training step (fp32 CPU; fp16 adds loss_scale, skipped_steps; GPUs with a known peak add mfu)"]
    lines += list(train_keys) + ["# evaluation"] + list(eval_keys)
    check_pin("metrics_jsonl.txt", "\n".join(lines) + "\n")


@pytest.mark.parametrize("preset", ["tiny", "modernbert-tiny"])
def test_export_config_json_keys(preset, tmp_path):
    layers = "num_hidden_layers=1" if preset.startswith("modernbert") else "num_layers=1"
    config = load_config(preset, ["vocab_size=64", "pad_token_id=0", layers])
    build_pretraining_model(config).save_hf_pretrained(str(tmp_path))  # what bert-export writes
    saved = json.loads((tmp_path / "config.json").read_text())
    check_pin(f"export_config_{config.model_type}.txt", "\n".join(sorted(saved)) + "\n")


# ---------------------------------------------------------------------------------------------- old configs


@pytest.mark.parametrize("name", ["bert_tiny", "modernbert_tiny"])
def test_model_configs_saved_with_speed_switches_still_load(name):
    """Saved by `ModelConfig.to_json` on 2026-12-07, when the speed switches were model-config fields."""
    path = FIXTURES / "model_configs" / f"{name}.json"
    saved = json.loads(path.read_text())
    assert {"use_sdpa", "unpad", "fused_ops"} <= set(saved)  # the fixture really holds the switches
    config = load_config(str(path))
    shape = {k: v for k, v in saved.items() if k not in OPTION_NAMES}
    assert dataclasses.asdict(config) == shape  # every other field kept; the switches are runtime options now
    switches = {k: v for k, v in saved.items() if k in OPTION_NAMES}
    assert kernel_options(str(path)) == KernelOptions(**switches)  # a JSON's switches still choose the paths
    assert kernel_options(str(path), ["unpad=false"]).unpad is False  # and --model-set overrides them


def test_the_old_checkpoints_saved_config_loads(old_run):
    state = json.loads((old_run / "run" / "step_00000002" / "train_state.json").read_text())
    config = config_from_dict(state["config"]["model"])  # with the switch fields of its day: dropped
    assert (config.hidden_size, config.num_hidden_layers) == (32, 1)
