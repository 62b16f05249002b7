"""Every process of a launch dies with its supervisor (pretrain/launcher.py behind scripts/launch_multinode.sh),
even one killed with SIGKILL, which can clean nothing up itself.

- The guard: its pipe from the supervisor closes without "done" -> the runner's process group is killed and the
  node swept by launch id; with "done" (a launch that ended normally) it touches nothing.
- A rank's watch on its output (`pretrain.runtime.dist.die_with_launch`): the reader of its stdout gone (the supervisor,
  or the ssh connection to its node) -> the rank kills itself (and its node's launch.py).
- A real local launch whose supervisor gets `kill -9` leaves no process of it within 30 s; over the ssh testbed
  (BERT_SSH_TESTBED, see tests/test_launch_ssh.py) the same holds on both nodes, else that case is skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pytest
from fixtures_train import ROOT, free_port, make_setup, run_env, train_args

from pretrain import launcher

SCRIPT = str(ROOT / "scripts" / "launch_multinode.sh")
SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]


def gone(proc: subprocess.Popen, within: float = 10) -> bool:
    try:
        proc.wait(timeout=within)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_the_guard_kills_the_runners_group_when_the_supervisor_vanishes_and_not_after_done(tmp_path):
    launch = launcher.Launch(types.SimpleNamespace(hostfile="h"), ["localhost"], [], tmp_path / "log")
    groups = [subprocess.Popen(SLEEP, start_new_session=True) for _ in range(2)]
    try:
        for group, ending in zip(groups, ["", "done\n"]):
            guard = launch.guard()
            guard.stdin.write(f"{group.pid}\n{ending}")
            guard.stdin.close()  # what the kernel does to the pipe of a SIGKILLed supervisor
            assert guard.wait(timeout=30) == 0
        assert gone(groups[0]) and groups[0].returncode == -signal.SIGKILL
        assert groups[1].poll() is None  # "done": a finished launch's group id may be reused; nothing is killed
    finally:
        for g in groups:
            g.kill()
            g.wait()


RANK = (
    "from pretrain.runtime import dist; dist.die_with_launch(); import time; print('up', flush=True); time.sleep(120)"
)


@pytest.mark.parametrize("supervised", [True, False])
def test_a_rank_dies_when_the_reader_of_its_output_goes_away(supervised):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(launcher.LAUNCH_ID, None)
    if supervised:
        env[launcher.LAUNCH_ID] = "x"
    rank = subprocess.Popen([sys.executable, "-c", RANK], env=env, stdout=subprocess.PIPE)
    try:
        assert rank.stdout.readline() == b"up\n"
        rank.stdout.close()  # the supervisor (or the node's ssh connection) is gone
        if supervised:
            assert gone(rank) and rank.returncode == -signal.SIGKILL
        else:
            assert not gone(rank, within=2)  # not started by our launcher: its output is not its lifeline
    finally:
        rank.kill()
        rank.wait()


def launch_processes(save: Path) -> list[str]:
    """Every live process whose command line names this run's --save: runner, launch.py, ranks, loader workers,
    pdsh and ssh (the testbed's "nodes" are this machine)."""
    left = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if str(save) in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid() and p.info["status"] != "zombie":
            left.append(f"{p.pid} {' '.join(p.info['cmdline'])[:120]}")
    return left


def kill_supervisor_and_wait(proc: subprocess.Popen, save: Path, within: float = 30) -> None:
    deadline = time.monotonic() + 240
    while not (save / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, Path(f"{save}.log").read_text()[-3000:]
    assert len(launch_processes(save)) >= 3  # runner, launch.py, rank(s) (and more) are training
    os.kill(proc.pid, signal.SIGKILL)  # the script exec'd the supervisor: this pid is pretrain.launcher
    proc.wait()
    deadline = time.monotonic() + within
    while launch_processes(save) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = launch_processes(save)
    for line in left:  # do not leave them to the rest of the suite
        psutil.Process(int(line.split()[0])).kill()
    assert not left, left


def start(hostfile: Path, save: Path, setup: dict, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", SCRIPT, str(hostfile), *train_args(setup, save, 100000)],
        cwd=ROOT,
        env=env,
        stdout=open(f"{save}.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.slow
def test_kill_9_of_the_supervisor_of_a_local_launch_leaves_nothing(tmp_path):
    setup = make_setup(tmp_path, dropout=0.0)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n")
    env = run_env()
    env.update(LAUNCHER_ARGS="--no_ssh --node_rank 0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    save = tmp_path / "save"
    kill_supervisor_and_wait(start(hostfile, save, setup, env), save)


@pytest.mark.slow
def test_kill_9_of_the_supervisor_of_a_two_node_ssh_launch_leaves_nothing_on_either_node(tmp_path):
    bed = os.environ.get("BERT_SSH_TESTBED")
    if not bed or not (Path(bed) / "bin" / "ssh").is_file() or shutil.which("pdsh") is None:
        if os.environ.get("BERT_REQUIRE_SSH_TESTBED") == "1":
            pytest.fail("no ssh testbed (BERT_SSH_TESTBED)")
        pytest.skip("no ssh testbed: run `scripts/ssh_testbed.sh start DIR` and set BERT_SSH_TESTBED=DIR (CI does)")
    setup = make_setup(tmp_path, dropout=0.0, world=2)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    env = run_env()
    env.update(PATH=f"{Path(bed) / 'bin'}{os.pathsep}{env['PATH']}", MASTER_PORT=str(free_port()))
    save = tmp_path / "save"
    kill_supervisor_and_wait(start(hostfile, save, setup, env), save)
