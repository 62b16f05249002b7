"""scripts/launch_multinode.sh over real ssh and pdsh, as a cluster user runs it: two "nodes", 127.0.0.1 and
127.0.0.2, served by the throwaway sshd of scripts/ssh_testbed.sh (CI starts it; .ci/run). DeepSpeed's pdsh
runner starts `launch.py` on each node over ssh, and each starts its rank.

- A SIGTERM to the script: both ranks save the same step and exit, the script exits 0, nothing is left; the
  relaunch resumes and logs the losses of a run that was never stopped.
- A rank SIGKILLed on one node: the launch ends every process on both nodes within a minute, exits non-zero
  and names that node and the cause.
- A node's launcher SIGKILLed, with --max-restarts 1: the failure is named, the job is relaunched, resumes from
  its last checkpoint and ends with the same losses as a run that never failed.

Skipped, with the reason, where the testbed is not running (BERT_SSH_TESTBED unset); CI sets
BERT_REQUIRE_SSH_TESTBED=1 so that a missing testbed fails there instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from fixtures_train import ROOT, free_port, losses, make_setup, run_env, train_args

from pretrain.runtime import checkpoint

SCRIPT = str(ROOT / "scripts" / "launch_multinode.sh")
HOSTS = ("127.0.0.1", "127.0.0.2")
STEPS = 40


def _testbed() -> tuple[Path | None, str]:
    bed = os.environ.get("BERT_SSH_TESTBED")
    if not bed:
        return None, "no ssh testbed: run `scripts/ssh_testbed.sh start DIR` and set BERT_SSH_TESTBED=DIR (CI does)"
    bed = Path(bed)
    if not (bed / "bin" / "ssh").is_file() or shutil.which("pdsh") is None:
        return None, f"BERT_SSH_TESTBED={bed} is not a running testbed, or pdsh is missing"
    for host in HOSTS:
        probe = subprocess.run([str(bed / "bin" / "ssh"), host, "true"], capture_output=True, timeout=30)
        if probe.returncode != 0:
            return None, f"the testbed in {bed} does not answer on {host}: {probe.stderr.decode()[-200:]}"
    return bed, ""


@pytest.fixture(scope="module")
def testbed():
    bed, why = _testbed()
    if bed is None:
        if os.environ.get("BERT_REQUIRE_SSH_TESTBED") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return bed


@pytest.fixture(scope="module")
def setup(tmp_path_factory, testbed):
    root = tmp_path_factory.mktemp("ssh")
    (root / "hostfile").write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    return {**make_setup(root, stage=2, dropout=0.1, world=2), "root": root}


def launch(testbed: Path, setup: dict, save: Path, *extra: str) -> subprocess.Popen:
    env = run_env()
    env.update(PATH=f"{testbed / 'bin'}{os.pathsep}{env['PATH']}", MASTER_PORT=str(free_port()))
    args = train_args(setup, save, STEPS, "--save-every", "5", "--log-every", "5")
    return subprocess.Popen(
        ["bash", SCRIPT, str(setup["root"] / "hostfile"), *extra, *args],
        cwd=ROOT,
        env=env,
        stdout=open(f"{save}.log", "a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def output(save: Path) -> str:
    return Path(f"{save}.log").read_text()


def processes_of(save: Path) -> list[psutil.Process]:
    """Every process whose command line names this run's --save: launchers, ranks, loader workers, pdsh, ssh."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if str(save) in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
            found.append(p)
    return found


def rank_process(save: Path, rank: int) -> psutil.Process:
    """The rank process (not a loader worker) of global rank `rank`, started by its node's launch.py."""
    for p in processes_of(save):
        try:
            parent = " ".join(p.parent().cmdline())
            if "deepspeed.launcher.launch" in parent and p.environ().get("RANK") == str(rank):
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            continue
    raise AssertionError(f"no rank {rank} of {save} is running")


def node_launcher(save: Path, node_rank: int) -> psutil.Process:
    """DeepSpeed's launch.py of one node (on that node, started by the remote shell)."""
    for p in processes_of(save):
        cmd = p.cmdline()
        if cmd[:4] == [cmd[0], "-u", "-m", "deepspeed.launcher.launch"] and f"--node_rank={node_rank}" in cmd:
            return p
    raise AssertionError(f"no launch.py of node {node_rank} for {save}")


def wait_for_step(proc: subprocess.Popen, save: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (
            (save / "metrics.jsonl").exists()
            and len(losses(save)) >= step
            and checkpoint.complete_tags(save, warn=False)
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step}:\n{output(save)[-3000:]}")


def ends_cleanly(proc: subprocess.Popen, save: Path, within: float) -> int:
    """The script's exit code; it must exit within `within` seconds, leaving no process of the run anywhere."""
    try:
        rc = proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the launch did not end within {within} s:\n{output(save)[-3000:]}") from None
    left = [" ".join(p.cmdline())[:150] for p in processes_of(save) if p.is_running() and p.status() != "zombie"]
    assert not left, left
    return rc


@pytest.fixture(scope="module")
def straight(testbed, setup):
    """A run over both nodes that nobody interrupts: the reference losses."""
    save = setup["root"] / "straight"
    proc = launch(testbed, setup, save)
    assert ends_cleanly(proc, save, 300) == 0, output(save)[-3000:]
    text = output(save)
    assert all(f"{host}: " in text for host in HOSTS)  # pdsh prefixes each node's lines with its name
    assert sorted(losses(save)) == list(range(1, STEPS + 1))
    return losses(save)


@pytest.mark.slow
def test_sigterm_saves_on_both_nodes_leaves_nothing_and_resumes_exactly(testbed, setup, straight):
    save = setup["root"] / "stopped"
    proc = launch(testbed, setup, save)
    wait_for_step(proc, save, 6)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler stops a job: the script's whole process group
    assert ends_cleanly(proc, save, 120) == 0, output(save)[-3000:]
    assert "stopped by a signal: every rank saved at the same step" in output(save)
    stopped = checkpoint.newest(save)[1].step
    assert 6 <= stopped < STEPS
    assert all(re.search(rf"^{re.escape(h)}: .*exits successfully", output(save), re.M) for h in HOSTS)
    proc = launch(testbed, setup, save)
    assert ends_cleanly(proc, save, 300) == 0, output(save)[-3000:]
    assert f"resumed from {save} at step {stopped}" in output(save)
    assert losses(save) == straight


@pytest.mark.slow
def test_a_killed_rank_ends_every_rank_on_every_node_and_names_the_node(testbed, setup):
    save = setup["root"] / "killed_rank"
    proc = launch(testbed, setup, save)
    wait_for_step(proc, save, 3)
    victim = rank_process(save, 1)  # the rank of the second node, 127.0.0.2
    assert victim.environ()["LOCAL_RANK"] == "0" and victim.environ()["MASTER_ADDR"] == "127.0.0.1"
    victim.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    rc = ends_cleanly(proc, save, 60)
    assert rc != 0
    assert time.monotonic() - t0 < 60
    assert "error: training failed on node 127.0.0.2: a rank was killed by SIGKILL" in output(save)


@pytest.mark.slow
def test_a_killed_node_launcher_is_named_and_max_restarts_resumes_the_job(testbed, setup, straight):
    save = setup["root"] / "restarted"
    proc = launch(testbed, setup, save, "--max-restarts", "1")
    wait_for_step(proc, save, 6)
    node_launcher(save, 1).send_signal(signal.SIGKILL)  # DeepSpeed's launch.py on 127.0.0.2
    assert ends_cleanly(proc, save, 300) == 0, output(save)[-3000:]
    text = output(save)
    assert "restart 1/1 after a failure on node 127.0.0.2: its launcher was killed" in text, text[-3000:]
    assert "resumed from" in text
    assert losses(save) == straight
