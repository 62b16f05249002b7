"""Two nodes simulated on one machine: scripts/launch_multinode.sh with a two-host hostfile, started once per
node with `--no_ssh --node_rank 0|1` (master 127.0.0.1), must log the same losses as one node with two
processes; a rank failing on one node must fail that node's launch with a message naming the node."""

import signal
import subprocess
import time

import pytest
from fixtures_train import ROOT, free_port, losses, make_setup, run_env, train_args

from pretrain import checkpoint

STEPS = 6
SCRIPT = str(ROOT / "scripts" / "launch_multinode.sh")


def node_launch(hostfile, node_rank: int, args: list[str], port: int) -> subprocess.Popen:
    env = run_env()
    env.update(LAUNCHER_ARGS=f"--no_ssh --node_rank {node_rank}", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen(
        ["bash", SCRIPT, str(hostfile), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


@pytest.mark.slow
def test_two_node_simulation_matches_one_node_two_processes(tmp_path):
    setup = make_setup(tmp_path, stage=1, dropout=0.1, world=2)
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pretrain.train"]
    proc = subprocess.run([*cmd, *train_args(setup, one_node, STEPS)], cwd=ROOT, env=run_env(), capture_output=True)
    assert proc.returncode == 0, proc.stdout[-3000:]

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    procs = [node_launch(hostfile, r, train_args(setup, two_nodes, STEPS), port) for r in (0, 1)]
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
