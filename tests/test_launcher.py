"""pretrain.launcher (scripts/launch_multinode.sh): what the launch's output says of a failure, and the sweep that
finds a launch's processes on a node by the id in their environment. The real launches over ssh and pdsh are
in tests/test_launch_ssh.py, the --no_ssh ones in tests/test_multinode.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types

import pytest

from common.errors import UserError
from pretrain import failures, launcher

HOSTS = ["127.0.0.1", "127.0.0.2"]
# Lines as DeepSpeed's launch.py, pdsh, torch and bert-pretrain print them (taken from real launches).
KILLED_RANK = (
    "127.0.0.2: [2026-12-02 06:28:56,053] [ERROR] [launch.py:259:sigkill_handler] ['/v/bin/python', '-u', '-m', "
    "'pretrain.train', '--local_rank=0'] exits with return code = -9"
)
PEER_ERROR = (
    "127.0.0.1: [rank0]: RuntimeError: [../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:59579: "
    "Connection reset by peer. This is typically caused by a remote worker hanging"
)


@pytest.mark.parametrize(
    "line, node, cause",
    [
        (KILLED_RANK, "127.0.0.2", "a rank was killed by SIGKILL"),
        (PEER_ERROR, "127.0.0.1", "RuntimeError: [../gloo"),
        ("pdsh@vm: 127.0.0.2: ssh exited with exit code 255", "127.0.0.2", "its launcher was killed or the ssh"),
        ("pdsh@vm: 127.0.0.2: ssh exited with exit code 137", "127.0.0.2", "its launcher was killed by SIGKILL"),
        ("pdsh@vm: 127.0.0.1: ssh killed by signal 9", "127.0.0.1", "its ssh connection was killed by SIGKILL"),
        ("127.0.0.2: error: dataset /d/x.bin/.idx does not exist", "127.0.0.2", "error: dataset /d/x.bin"),
        ("ValueError: bad thing", "node-a", "ValueError: bad thing"),  # unprefixed: the local node
        (
            "[2026-12-02] [ERROR] [launch.py:259] [...] exits with return code = 2",
            "node-a",
            "a rank exited with code 2",
        ),
    ],
)
def test_failure_lines_name_their_node_and_cause(line, node, cause):
    failure = failures.parse_failure(line, HOSTS, "node-a")
    assert failure is not None and failure.node == node and failure.cause.startswith(cause), failure


@pytest.mark.parametrize(
    "line",
    [
        "127.0.0.1: step 40/2000 loss 5.9478 mlm 5.2474 nsp 0.7004 lr 1.950e-03 122.0 seq/s ETA 0:01:59",
        "127.0.0.1: /v/torch/distributed/c10d_logger.py:83: FutureWarning: `all_gather_into_tensor` is deprecated.",
        "note: the model's vocab_size 30522 exceeds the data's 200 ids",
        "127.0.0.2: [2026-12-02 06:08:40,683] [INFO] [launch.py:285:main] Process 6362 exits successfully.",
        "/x/train.py:278: UserWarning: skipping unreadable checkpoint /r/step_4: RuntimeError: bad zip",
    ],
)
def test_ordinary_lines_are_no_failure(line):
    assert failures.parse_failure(line, HOSTS, "node-a") is None


def test_the_first_cause_is_told_from_its_echoes():
    echo = failures.parse_failure(PEER_ERROR, HOSTS, "x")
    killed = failures.parse_failure(KILLED_RANK, HOSTS, "x")
    exited = failures.parse_failure("127.0.0.1: [..] [launch.py:259] [..] exits with return code = 1", HOSTS, "x")
    # the survivor's error reaches the output first; the killed rank is reported a second later by its launcher
    text = failures.describe([echo, exited, killed])
    assert text == "node 127.0.0.2: a rank was killed by SIGKILL; then on 127.0.0.1, as a consequence"


def test_hostfile_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        launcher.read_hostfile(str(tmp_path / "nope"))
    (tmp_path / "h").write_text("# nodes\nnode1 slots=8\n\nnode2 slots=8\n")
    assert launcher.read_hostfile(str(tmp_path / "h")) == ["node1", "node2"]
    (tmp_path / "h").write_text("node1 8\n")
    with pytest.raises(UserError, match="bad line"):
        launcher.read_hostfile(str(tmp_path / "h"))
    (tmp_path / "h").write_text("node1 slots=8  # the big one\nnode2 slots=16\n")
    assert launcher.read_hostfile(str(tmp_path / "h")) == ["node1", "node2"]


@pytest.mark.parametrize("slots", ["0", "8x", "-1", "", "1.5", "00", "\u00b2"])
def test_hostfile_slots_must_be_a_positive_integer(tmp_path, slots):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"# two nodes\nnode1 slots=8\nnode2 slots={slots}\n")
    with pytest.raises(UserError) as e:
        launcher.read_hostfile(str(hostfile))
    assert str(e.value) == (
        f"hostfile {hostfile} line 3: slots={slots} is not a positive integer; write 'hostname slots=N' with N the "
        "number of GPUs (processes) on that node"
    )


def test_a_host_named_twice_is_a_one_line_error(tmp_path):
    (tmp_path / "h").write_text("node1 slots=1\nnode1 slots=1\n")
    with pytest.raises(UserError, match="line 2: host node1 is named twice"):
        launcher.read_hostfile(str(tmp_path / "h"))


def test_the_sweep_finds_and_ends_exactly_the_launchs_processes(tmp_path):
    cfg = types.SimpleNamespace(hostfile=str(tmp_path / "h"))
    launch = launcher.Launch(cfg, ["localhost"], [], tmp_path / "log")
    base = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}  # an earlier in-process run may leave it
    ours = dict(base, **{launcher.LAUNCH_ID: launch.id, "LOCAL_RANK": "0"})
    theirs = dict(base, **{launcher.LAUNCH_ID: "another-launch", "LOCAL_RANK": "0"})
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    rank, other = subprocess.Popen(sleep, env=ours), subprocess.Popen(sleep, env=theirs)
    plain = subprocess.Popen(sleep, env=dict(base, **{launcher.LAUNCH_ID: launch.id}))  # not a rank
    try:
        time.sleep(0.5)
        listed = [line.split()[0] for line in launch.sweep("list")]
        assert listed == [str(rank.pid)]
        launch.sweep("KILL", who="ranks")
        assert rank.wait(timeout=10) == -9
        assert other.poll() is None and plain.poll() is None and launch.sweep("list") == []
    finally:
        for p in (rank, other, plain):
            p.kill()
            p.wait()
