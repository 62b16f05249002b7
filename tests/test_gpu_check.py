"""scripts/gpu_check.sh itself, on CPU: its --smoke run takes every path a GPU run takes (dataset build, each
bench row, the bert-pretrain end-to-end row, the summary table) with a tiny model, and without --smoke it
refuses a machine with no GPU."""

import json
import os
import subprocess

import pytest
import torch
from fixtures_train import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_refuses_without_a_gpu(tmp_path):
    run = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 2 and "sees no CUDA GPU" in run.stderr and len(run.stderr.splitlines()) == 1


@pytest.mark.slow
def test_smoke_run_builds_data_benches_every_row_and_summarizes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    cmd = ["bash", "scripts/gpu_check.sh", "bench", "--smoke", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    manifest = json.loads((tmp_path / "data" / "corpus.json").read_text())
    assert manifest["counts"]["tokens"] > 100_000
    rows = ["large_s128_bf16", "base_s128_bf16", "large_s512_realistic_bf16", "large_s512_padded_bf16"]
    no_hf = ["large_s128_data_bare", "large_s128_data_engine", "large_s128_pretrain_e2e"]
    rows += no_hf
    summary = (tmp_path / "bench_summary.txt").read_text().splitlines()
    assert sorted(line.split()[0] for line in summary[1:]) == sorted(rows)
    for row in rows:
        result = json.loads((tmp_path / f"bench_{row}.json").read_text())
        assert result["ours"]["seq_per_s"] > 0
        assert ("hf" in result) == (row not in no_hf)
    padded = json.loads((tmp_path / "bench_large_s512_padded_bf16.json").read_text())
    assert padded["options"]["unpad"] is False and padded["args"]["padding"] == "none"  # KernelOptions, not config
    engine = json.loads((tmp_path / "bench_large_s128_data_engine.json").read_text())
    assert engine["args"]["deepspeed_config"] and engine["args"]["precision"] == "bf16"
    steps = (tmp_path / "e2e_run" / "metrics.jsonl").read_text().splitlines()
    assert len(steps) == 40 and json.loads(steps[-1])["samples"] == 40 * 4 * 16  # 4 micro-batches of 16 a step
