"""Two nodes simulated on one machine: scripts/launch_multinode.sh with a two-host hostfile, started once per
node with `--no_ssh --node_rank 0|1` (master 127.0.0.1), must log the same losses as one node with two
processes (BERT with LAMB; ModernBERT with packing and StableAdamW); a rank failing on one node must fail that
node's launch with a message naming the node."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fixtures_train import ROOT, ds_config_json, free_port, losses, make_setup, run_env, train_args

from pretrain.runtime import checkpoint

STEPS = 6
SCRIPT = str(ROOT / "scripts" / "launch_multinode.sh")


def node_launch(hostfile, node_rank: int, args: list[str], port: int) -> subprocess.Popen:
    env = run_env()
    env.update(LAUNCHER_ARGS=f"--no_ssh --node_rank {node_rank}", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen(
        ["bash", SCRIPT, str(hostfile), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def modernbert(setup: dict, root) -> tuple[dict, list[str]]:
    """The setup's data with a small ModernBERT (dropout on), StableAdamW on a WSD schedule at ZeRO 1, packing."""
    from pretrain.models import load_config

    ids = json.loads(Path(setup["prefix"] + ".json").read_text())["tokenizer"]["special_tokens"]  # the data's
    tokens = [f"pad_token_id={ids['pad']}", f"cls_token_id={ids['cls']}", f"sep_token_id={ids['sep']}"]
    tokens += [f"bos_token_id={ids['cls']}", f"eos_token_id={ids['sep']}"]
    shape = ["vocab_size=200", *tokens, "hidden_size=64", "num_attention_heads=2", "intermediate_size=96"]
    config = load_config("modernbert-tiny", [*shape, "num_hidden_layers=3", "local_attention=16", "mlp_dropout=0.1"])
    config.to_json(str(root / "modernbert.json"))
    stable = {"type": "StableAdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.98], "weight_decay": 1e-5}}
    wsd = {"type": "WarmupStableDecay", "params": {"warmup_proportion": 0.2, "decay_proportion": 0.3}}
    ds = ds_config_json(root / "ds_modernbert.json", world=2, stage=1, optimizer=stable, scheduler=wsd)
    return {**setup, "model": str(root / "modernbert.json"), "ds": ds}, ["--pair-task", "none", "--packing"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_two_node_simulation_matches_one_node_two_processes(tmp_path, family):
    setup, extra = make_setup(tmp_path, stage=1, dropout=0.1, world=2), []
    if family == "modernbert":
        setup, extra = modernbert(setup, tmp_path)
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pretrain.train"]
    args = train_args(setup, one_node, STEPS, *extra)
    proc = subprocess.run([*cmd, *args], cwd=ROOT, env=run_env(), capture_output=True)
    assert proc.returncode == 0, proc.stdout[-3000:]

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    procs = [node_launch(hostfile, r, train_args(setup, two_nodes, STEPS, *extra), port) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert losses(two_nodes) == losses(one_node)
    assert sorted(losses(two_nodes)) == list(range(1, STEPS + 1))


def test_failing_node_is_named_and_fails_the_launch(tmp_path):
    setup = make_setup(tmp_path, stage=1, world=2)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    args = train_args(setup, tmp_path / "run", STEPS)
    args[args.index("--data") + 1] = str(tmp_path / "missing")
    proc = node_launch(hostfile, 1, args, free_port())
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode != 0
    assert "error: training failed on node node-b" in out
    assert "missing.bin/.idx does not exist" in out


@pytest.mark.slow
def test_sigterm_to_the_script_reaches_every_rank_which_save_and_exit_0(tmp_path):
    """DeepSpeed's local runner does not forward signals; the script sends them to the whole launch."""
    setup = make_setup(tmp_path, stage=0, world=2)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    save = tmp_path / "run"
    proc = node_launch(hostfile, 0, train_args(setup, save, 400), free_port())
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and not ((save / "metrics.jsonl").exists() and len(losses(save)) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert "stopping at step" in out and "relaunch the same command to resume" in out
    tag, state = checkpoint.newest(save)
    assert 3 <= state.step < 400 and sorted(losses(save)) == list(range(1, state.step + 1))
