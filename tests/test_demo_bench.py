"""`bert-bench --deepspeed_config` under the deepspeed launcher, on 2 CPU ranks (docs/operations.md, Benchmarking)."""

from __future__ import annotations

import json
import subprocess

import pytest
from fixtures_train import ROOT, ds_config_json, free_port, make_setup, run_env


@pytest.mark.slow
def test_bench_through_launcher_sums_ranks(tmp_path):
    setup = make_setup(tmp_path, micro_batch=3, world=2)
    # accumulation 2 in the JSON: the bench still times one optimizer step per micro-batch
    setup["ds"] = ds_config_json(tmp_path / "ds_accum.json", micro_batch=3, world=2, grad_accum=2)
    port = free_port()
    out = tmp_path / "bench.json"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module", "pretrain.bench"]
    cmd += ["--model", setup["model"], "--seq-len", "48", "--micro-batch", "32", "--steps", "3", "--warmup", "1"]
    cmd += ["--data", setup["prefix"], "--deepspeed_config", setup["ds"], "--compare-hf", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert log.count("bert-bench --model") == 1  # rank 0 reports for the job
    assert "seq 48 batch 3 fp32" in log  # the micro-batch comes from the DeepSpeed JSON, not --micro-batch

    result = json.loads(out.read_text())
    for name in ("ours", "hf"):
        r = result[name]
        assert r["world_size"] == 2
        # the job rate sums both ranks: at least what two ranks at the slowest step time would give
        assert 2 * 3 / r["step_s"] <= r["seq_per_s"] * (1 + 1e-9)
        assert r["tokens_per_s"] < r["seq_per_s"] * 48
    assert result["speedup_vs_hf"] == pytest.approx(result["ours"]["seq_per_s"] / result["hf"]["seq_per_s"])
    assert result["loader_samples_per_s"] > 0
