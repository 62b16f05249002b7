"""scripts/attention_stats.py (where an exported encoder's attention looks, docs/PERFORMANCE.md stop 30): its
statistics against a float64 numpy recomputation, and the command on a transformers-loadable export."""

from __future__ import annotations

import importlib.util
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from fixtures_finetune import build_tokenizer, tiny_checkpoint
from fixtures_train import ROOT, run_env

from common.errors import run_cli

SCRIPT = ROOT / "scripts" / "attention_stats.py"


def load_script():
    spec = importlib.util.spec_from_file_location("attention_stats", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference(a: np.ndarray) -> dict:
    """Per head, by loops in float64: entropy, weight on self, on the previous and on the next token."""
    B, H, S, _ = a.shape
    out = {k: [] for k in ("entropy", "self", "previous", "next")}
    for h in range(H):
        ent = [-sum(p * math.log(p) for p in a[b, h, i] if p > 0) for b in range(B) for i in range(S)]
        out["entropy"].append(np.mean(ent))
        out["self"].append(np.mean([a[b, h, i, i] for b in range(B) for i in range(S)]))
        out["previous"].append(np.mean([a[b, h, i, i - 1] for b in range(B) for i in range(1, S)]))
        out["next"].append(np.mean([a[b, h, i, i + 1] for b in range(B) for i in range(S - 1)]))
    return out


def test_statistics_match_a_float64_recomputation():
    S = 6
    uniform = np.full((S, S), 1 / S)
    previous = np.eye(S, k=-1)
    previous[0, 0] = 1.0  # the first token has no previous one: it looks at itself
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 1, S, S))
    softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    heads = np.stack([np.stack([uniform, previous, np.eye(S)])] * 2)  # (2, 3, S, S)
    layers = [heads, softmax]
    got = load_script().attention_stats([torch.tensor(x, dtype=torch.float32) for x in layers])
    for layer, a in zip(got, layers):
        want = reference(a)
        for key in want:
            assert layer[key] == pytest.approx(want[key], abs=1e-6), key
    # what the numbers mean, on the three constructed heads
    assert got[0]["entropy"] == pytest.approx([math.log(S), 0.0, 0.0], abs=1e-6)
    assert got[0]["previous"] == pytest.approx([1 / S, 1.0, 0.0], abs=1e-6)
    assert got[0]["self"] == pytest.approx([1 / S, 1 / S, 1.0], abs=1e-6)


def test_command_reads_an_export_and_rejects_bad_input(tmp_path, capsys):
    tok = build_tokenizer(tmp_path / "tok")
    model = tiny_checkpoint(tmp_path / "model", tok)
    words = (tok / "vocab.txt").read_text().split()[5:]
    text = tmp_path / "text.txt"
    text.write_text(" ".join(random.Random(0).choice(words) for _ in range(3000)))
    cmd = [sys.executable, str(SCRIPT), str(model), "--text", str(text), "--rows", "3", "--seq-len", "32"]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("layer ")]
    assert len(lines) == 2  # the tiny preset's two layers
    entropies = [float(x) for x in lines[0].split("entropy ")[1].split("  ")[0].split()]
    assert len(entropies) == 2  # two heads
    assert all(0.9 * math.log(32) < e <= math.log(32) + 1e-3 for e in entropies)  # random weights: near uniform

    script = load_script()
    level, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    try:
        for bad, message in (
            ([str(tmp_path / "missing"), "--text", str(text)], "no config.json"),
            ([str(model), "--text", str(tmp_path / "none.txt")], "--text"),
            ([str(model), "--text", str(text), "--rows", "500"], "are needed"),
        ):
            assert run_cli(script.main, bad, parse=script.parse_args) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    finally:  # the script quiets transformers for its process; this one is pytest's
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()
