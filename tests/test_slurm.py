"""scripts/slurm/pretrain.sbatch on a real two-node Slurm cluster: slurmctld and the slurmd of nodes n1
(127.0.0.1) and n2 (127.0.0.2), started by scripts/slurm_testbed.sh (CI starts it; .ci/run). One task per
rank (srun), one rank per node, the job submitted with sbatch from this environment.

- A 2-node job trains and finishes (COMPLETED), one rank on each node.
- The time-limit signal (USR1 to the batch shell, as `--signal=B:USR1@300` sends it): every rank saves at the
  same step, the job requeues itself, and once released resumes and logs the losses of an uninterrupted job.
- `scancel`: the ranks save and the job ends, not requeued, with no process of it left on either node.
- A rank SIGKILLed on n2: the job ends within 60 s, FAILED, its log naming n2 and rank 1; not requeued
  (this job also takes srun flags from SRUN_ARGS and a command before python from TASK_PREFIX).

Skipped, with the reason, where the testbed is not running (BERT_SLURM_TESTBED unset); CI sets
BERT_REQUIRE_SLURM_TESTBED=1 so that a missing testbed fails there instead.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from fixtures_train import ROOT, losses, make_setup, run_env, train_args

from pretrain import slurm
from pretrain.runtime import checkpoint

SBATCH = str(ROOT / "scripts" / "slurm" / "pretrain.sbatch")
STEPS = 60


def test_srun_task_errors_are_read_as_node_and_rank():
    m = slurm.TASK_ERROR.match("srun: error: n2: task 1: Killed")
    assert m and m.groups() == ("n2", "1", "Killed")
    assert slurm.TASK_ERROR.match("srun: error: gpu-07: tasks 8-15: Exited with exit code 1")
    assert not slurm.TASK_ERROR.match("srun: error: Unable to create step for job 12: Invalid generic resource")


def test_save_directory_and_its_newest_complete_step(tmp_path):
    assert slurm.save_dir(["--data", "x", "--save", str(tmp_path)]) == tmp_path
    assert slurm.save_dir([f"--output={tmp_path}"]) == tmp_path
    recipe = tmp_path / "run.yaml"  # a --save that the recipe file gives (docs/RECIPES.md), its phase's first
    recipe.write_text(f"save: {tmp_path / 'one'}\nphases:\n  two:\n    save: {tmp_path / 'two'}\n")
    assert slurm.save_dir(["--recipe", str(recipe)]) == tmp_path / "one"
    assert slurm.save_dir(["--recipe", str(recipe), "--phase", "two"]) == tmp_path / "two"
    assert slurm.saved_step(tmp_path) is None
    (tmp_path / "latest").write_text(checkpoint.tag_name(120) + "\n")
    assert slurm.saved_step(tmp_path) == 120


def test_outside_a_job_the_batch_step_says_so_in_one_line():
    env = {k: v for k, v in run_env().items() if not k.startswith("SLURM_")}
    out = subprocess.run([sys.executable, "-m", "pretrain.slurm", "pretrain.train"], env=env, capture_output=True)
    assert out.returncode == 2
    assert out.stderr.decode().strip() == (
        "error: not inside a Slurm job: submit it with sbatch (scripts/slurm/pretrain.sbatch ...)"
    )


def _testbed() -> tuple[Path | None, str]:
    bed = os.environ.get("BERT_SLURM_TESTBED")
    if not bed:
        return None, "no Slurm testbed: run `scripts/slurm_testbed.sh start DIR`, set BERT_SLURM_TESTBED=DIR (CI does)"
    conf = Path(bed) / "slurm.conf"
    if not conf.is_file():
        return None, f"BERT_SLURM_TESTBED={bed} has no slurm.conf: start it with scripts/slurm_testbed.sh start {bed}"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=_env(conf), capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"sinfo does not answer: {e}"
    states = dict(line.split() for line in out.stdout.decode().splitlines())
    if states.get("n1") != "idle" or states.get("n2") != "idle":
        return None, f"the testbed in {bed} is not up with n1 and n2 idle: {states or out.stderr.decode()[-200:]}"
    return conf, ""


def _env(conf: Path) -> dict:
    """The submitting environment: the training one, this venv's python first on PATH, the testbed's config."""
    env = run_env()
    env.pop("MAX_REQUEUES", None)
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", SLURM_CONF=str(conf))
    return env


@pytest.fixture(scope="module")
def conf():
    conf, why = _testbed()
    if conf is None:
        if os.environ.get("BERT_REQUIRE_SLURM_TESTBED") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return conf


@pytest.fixture(scope="module")
def setup(tmp_path_factory, conf):
    root = tmp_path_factory.mktemp("slurm")
    return {**make_setup(root, stage=2, dropout=0.1, world=2), "root": root}


def run(conf: Path, *cmd: str) -> str:
    return subprocess.run(cmd, env=_env(conf), capture_output=True, text=True, check=True, timeout=30).stdout


def submit(conf: Path, setup: dict, save: Path, steps: int, **env: str) -> str:
    args = train_args(setup, save, steps, "--save-every", "10", "--log-every", "1")
    cmd = ["sbatch", "--parsable", "-N2", f"--output={save}.log", SBATCH, *args]
    return subprocess.run(cmd, env={**_env(conf), **env}, capture_output=True, text=True, check=True).stdout.strip()


def job(conf: Path, job_id: str) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
    return dict(re.findall(r"(\w+)=(\S*)", run(conf, "scontrol", "show", "job", "-o", job_id)))


def output(save: Path) -> str:
    return Path(f"{save}.log").read_text() if Path(f"{save}.log").exists() else ""


def wait_until(what, timeout: float, why: str, save: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        time.sleep(0.2)
    raise AssertionError(f"{why} within {timeout} s:\n{output(save)[-3000:]}")


def queued(conf: Path, job_id: str) -> str:
    """The job's squeue state (PENDING, RUNNING, COMPLETING), '' once it has left the queue."""
    return run(conf, "squeue", "-h", "-j", job_id, "-o", "%T").strip()


def wait_for_step(conf: Path, job_id: str, save: Path, step: int) -> None:
    def there() -> bool:
        assert queued(conf, job_id), f"the job ended before step {step}:\n{output(save)[-3000:]}"
        return (save / "metrics.jsonl").exists() and len(losses(save)) >= step and bool(checkpoint.tags(save))

    wait_until(there, 240, f"the job did not reach step {step}", save)


def left_of(save: Path) -> list[str]:
    """Every live process that names this run's --save: batch step, srun, ranks, loader workers."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(save) in cmd and p.pid != os.getpid() and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{p.pid} {cmd[:120]}")
    return found


def ended(conf: Path, job_id: str, save: Path, within: float) -> dict:
    """Wait for the job to leave the queue; then nothing of it may be left on either node."""
    wait_until(lambda: not queued(conf, job_id), within, "the job did not end", save)
    assert not left_of(save), left_of(save)
    return job(conf, job_id)


@pytest.fixture(scope="module")
def straight(conf, setup):
    """A 2-node job nobody interrupts: the reference losses."""
    save = setup["root"] / "straight"
    job_id = submit(conf, setup, save, STEPS)
    info = ended(conf, job_id, save, 300)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", output(save)[-3000:]
    return info, losses(save)


@pytest.mark.slow
def test_a_two_node_job_trains_and_finishes(straight, setup):
    info, straight_losses = straight
    assert info["NodeList"] == "n[1-2]" and info["NumTasks"] == "2"
    assert sorted(straight_losses) == list(range(1, STEPS + 1))
    assert '"world_size": 2' in output(setup["root"] / "straight")
    assert slurm.saved_step(setup["root"] / "straight") == STEPS


@pytest.mark.slow
def test_time_limit_saves_requeues_and_resumes_exactly(conf, setup, straight):
    save = setup["root"] / "requeued"
    job_id = submit(conf, setup, save, STEPS)
    wait_for_step(conf, job_id, save, 6)
    run(conf, "scancel", "--signal=USR1", "--batch", job_id)  # what --signal=B:USR1@300 sends near the limit
    wait_until(lambda: queued(conf, job_id) == "PENDING", 120, "the job did not requeue itself", save)
    stopped = checkpoint.newest(save)[1].step
    assert 6 <= stopped < STEPS
    assert f"time limit: every rank saved at step {stopped}; requeue 1 of 10" in output(save)
    requeued = time.monotonic()
    wait_until(lambda: not left_of(save), 10, "processes of the stopped job were left", save)
    # A requeued job may start again only once its old credential expired (slurm.conf's AuthInfo cred_expire, 15 s
    # on the testbed, 120 by default); released sooner, slurmctld kills it ("Job credential revoked").
    expire = re.search(r"cred_expire=(\d+)", conf.read_text())
    time.sleep(max(0.0, (int(expire.group(1)) if expire else 120) + 2 - (time.monotonic() - requeued)))
    try:
        run(conf, "scontrol", "update", f"jobid={job_id}", "StartTime=now")  # else Slurm may hold it longer
    except subprocess.CalledProcessError as err:  # the scheduler may have started it first, which is as good
        assert "no longer pending" in err.stderr, err.stderr
    info = ended(conf, job_id, save, 300)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", output(save)[-3000:]
    assert f"requeue 1 of 10, resumed at step {stopped}" in output(save)
    assert f"resumed from {save} at step {stopped}" in output(save)
    assert losses(save) == straight[1]


@pytest.mark.slow
def test_scancel_saves_and_leaves_no_task_on_either_node(conf, setup):
    save = setup["root"] / "cancelled"
    job_id = submit(conf, setup, save, 4000)
    wait_for_step(conf, job_id, save, 6)
    run(conf, "scancel", job_id)
    info = ended(conf, job_id, save, 90)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0"
    step = checkpoint.newest(save)[1].step
    assert 6 <= step < 4000 and f"stopping at step {step} (signal)" in output(save)
    assert "stopped by SIGTERM (preemption or scancel): not requeued" in output(save)


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_within_60_s_naming_the_node(conf, setup):
    save = setup["root"] / "killed"
    job_id = submit(conf, setup, save, 4000, SRUN_ARGS="--label --cpu-bind=none", TASK_PREFIX="nice -n 3")
    wait_for_step(conf, job_id, save, 3)
    victim = rank_process(save, 1)
    assert victim.environ()["SLURMD_NODENAME"] == "n2" and victim.environ()["MASTER_ADDR"] == "127.0.0.1"
    assert victim.nice() == 3 and re.search(r"^1: ", output(save), re.M)  # TASK_PREFIX, SRUN_ARGS (--label)
    victim.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    info = ended(conf, job_id, save, 60)
    assert time.monotonic() - t0 < 60
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"
    assert "error: the job failed on node n2, rank 1: Killed (first)" in output(save), output(save)[-3000:]


def rank_process(save: Path, rank: int) -> psutil.Process:
    """The rank process (a Slurm task, not a loader worker) of global rank `rank`."""
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            task = str(save) in cmd and "pretrain.train" in cmd and p.parent().name() == "slurmstepd"
            if task and p.environ().get("RANK") == str(rank):
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            continue
    raise AssertionError(f"no rank {rank} of {save} is running")
