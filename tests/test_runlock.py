"""pretrain.runlock: one writer per --save. The unit rules against hand-written lock records (dead, reused,
rebooted, stale, requeued holders), the lease renewal, and real `python -m pretrain.train` processes: a second
run on a held --save is refused at once, writes nothing there and names the holder; a SIGKILLed holder is
taken over."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures_train import ROOT, free_port, make_setup, run_env, train_args

from common.errors import UserError
from common.files import write_text_atomic
from pretrain import runlock


def record(**kw) -> dict:
    now = time.time()
    base = dict(host=socket.gethostname(), boot_id=runlock._boot_id(), pid=os.getpid(), started_unix=now - 60)
    base.update(pid_start=runlock.process_start(os.getpid()), lease_unix=now, renew_every_s=60.0, token="other")
    base.update(slurm_job_id=None, slurm_restart_count=None)
    base.update(kw)
    return base


def write_record(save: Path, **kw) -> dict:
    save.mkdir(parents=True, exist_ok=True)
    r = record(**kw)
    (save / runlock.RECORD).write_text(json.dumps(r))
    return r


@pytest.fixture
def sleeper():
    """A live process that is not ours to lock with (a holder elsewhere)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p
    p.kill()
    p.wait()


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "BERT_SLURM_JOB_ID", "BERT_SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(runlock.LEASE_ENV, raising=False)


def test_the_record_names_the_holder_and_a_second_lock_is_refused_until_release(tmp_path):
    save = tmp_path / "save"
    lock = runlock.RunLock.acquire(save)
    r = json.loads((save / runlock.RECORD).read_text())
    assert r["format"] == "bert-run-lock" and r["version"] == 1
    me = (socket.gethostname(), os.getpid(), runlock.process_start(os.getpid()))
    assert (r["host"], r["pid"], r["pid_start"]) == me
    assert r["slurm_job_id"] is None and abs(r["lease_unix"] - time.time()) < 60
    with pytest.raises(UserError, match=rf"in use by another run: pid {os.getpid()} on {socket.gethostname()}") as e:
        runlock.RunLock.acquire(save)  # the OS lock is held (another open file description)
    assert "\n" not in str(e.value) and "delete" in str(e.value)
    lock.release()
    assert not (save / runlock.RECORD).exists() and (save / runlock.FLOCK).exists()
    runlock.RunLock.acquire(save).release()


def test_a_live_holder_on_this_host_is_refused_without_the_os_lock(tmp_path, sleeper):
    # what a filesystem without flock leaves: the record alone, of a live process
    write_record(tmp_path, pid=sleeper.pid, pid_start=runlock.process_start(sleeper.pid))
    with pytest.raises(UserError, match=f"pid {sleeper.pid} .*it is alive or its lease is fresh"):
        runlock.RunLock.acquire(tmp_path)
    assert json.loads((tmp_path / runlock.RECORD).read_text())["pid"] == sleeper.pid  # untouched


def test_a_held_os_lock_refuses_even_without_a_record(tmp_path):
    import fcntl

    with open(tmp_path / runlock.FLOCK, "w") as f:  # a run that is starting: flock taken, record not yet written
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=rf"no readable run.lock\) \(it holds the OS lock on {tmp_path}"):
            runlock.RunLock.acquire(tmp_path)
    assert not (tmp_path / runlock.RECORD).exists()


def test_without_an_os_lock_the_lease_alone_decides_with_a_warning(tmp_path, sleeper, monkeypatch):
    """What Lustre without `-o flock` or NFS without lockd answer (the fault injected: flock's ENOLCK)."""
    import errno
    import fcntl

    def no_lock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_lock)
    with pytest.warns(UserWarning, match="has no OS lock .* relies on its lease alone"):
        first = runlock.RunLock.acquire(tmp_path / "a")
    with pytest.warns(UserWarning, match="no OS lock"), pytest.raises(UserError, match="it is alive"):
        runlock.RunLock.acquire(tmp_path / "a")  # the record of a live holder on this host still refuses
    first.release()
    write_record(tmp_path / "b", host="other-node", pid=sleeper.pid, lease_unix=time.time() - 700)
    with pytest.warns(UserWarning, match="no OS lock"), pytest.warns(UserWarning, match="stale after 600 s"):
        runlock.RunLock.acquire(tmp_path / "b").release()


def test_a_dead_or_reused_pid_or_a_reboot_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cases = {
        "gone": dict(pid=dead.pid),
        "reused": dict(pid_start=runlock.process_start(os.getpid()) - 1),  # our PID, another start time
        "rebooted": dict(boot_id="another-boot"),
    }
    for name, fields in cases.items():
        save = tmp_path / name
        write_record(save, **fields)
        with pytest.warns(UserWarning, match="taking over --save"):
            lock = runlock.RunLock.acquire(save)
        assert json.loads((save / runlock.RECORD).read_text())["token"] == lock.token, name
        lock.release()


def test_a_holder_on_another_host_is_taken_over_only_once_its_lease_is_stale(tmp_path, sleeper, monkeypatch):
    monkeypatch.setenv(runlock.LEASE_ENV, "1.5")
    live = dict(host="other-node", pid=sleeper.pid, renew_every_s=0.15)
    write_record(tmp_path, **live)
    with pytest.raises(UserError, match="pid .* on other-node"):
        runlock.RunLock.acquire(tmp_path)
    time.sleep(2.0)
    with pytest.warns(UserWarning, match=r"last renewed \d+ s ago \(stale after 1.5 s"):
        runlock.RunLock.acquire(tmp_path).release()
    # the holder's own renewal period counts: a lease renewed every 60 s is not stale after 1.5 s
    write_record(tmp_path, **{**live, "renew_every_s": 60.0, "lease_unix": time.time() - 30})
    with pytest.raises(UserError, match="on other-node"):
        runlock.RunLock.acquire(tmp_path)


def test_the_same_slurm_job_after_a_requeue_takes_over(tmp_path, sleeper, monkeypatch):
    write_record(tmp_path, host="node-7", pid=sleeper.pid, slurm_job_id="4242", slurm_restart_count=None)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with pytest.raises(UserError, match=r"on node-7 \(Slurm job 4242\)"):  # same job, not requeued: alive
        runlock.RunLock.acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "999")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(UserError, match="Slurm job 4242"):  # another job's requeue is no licence
        runlock.RunLock.acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with pytest.warns(UserWarning, match="Slurm requeued job 4242 \\(restart 1\\)"):
        lock = runlock.RunLock.acquire(tmp_path)
    r = json.loads((tmp_path / runlock.RECORD).read_text())
    assert (r["slurm_job_id"], r["slurm_restart_count"]) == ("4242", 1)
    lock.release()


def test_a_cut_short_record_is_taken_over(tmp_path):
    (tmp_path / runlock.RECORD).write_text('{"host": "n1", "pi')
    with pytest.warns(UserWarning, match="taking over"):
        runlock.RunLock.acquire(tmp_path).release()


def test_the_lease_is_renewed_while_the_holder_lives_and_a_takeover_ends_it(tmp_path, monkeypatch):
    monkeypatch.setenv(runlock.LEASE_ENV, "1")
    lock = runlock.RunLock.acquire(tmp_path)
    first = json.loads((tmp_path / runlock.RECORD).read_text())["lease_unix"]
    time.sleep(0.5)
    assert json.loads((tmp_path / runlock.RECORD).read_text())["lease_unix"] > first
    lock.release()
    # a holder whose lock was taken over while it slept exits at once (in a child: it calls os._exit)
    code = (
        "import json, sys, time; from pathlib import Path; from pretrain import runlock\n"
        "lock = runlock.RunLock.acquire(sys.argv[1]); p = Path(sys.argv[1]) / runlock.RECORD\n"
        "r = json.loads(p.read_text()); r['token'] = 'thief'; r['host'] = 'n9'; p.write_text(json.dumps(r))\n"
        "time.sleep(30)"
    )
    env = dict(os.environ, **{runlock.LEASE_ENV: "1", "PYTHONPATH": str(ROOT)})
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], env=env, capture_output=True, text=True)
    assert run.returncode == runlock.LOST_EXIT_CODE, run.stderr
    assert "was taken over by pid" in run.stderr and "on n9" in run.stderr


def test_bad_lease_settings_are_one_line_errors(tmp_path, monkeypatch):
    for bad in ("ten", "0", "-5"):
        monkeypatch.setenv(runlock.LEASE_ENV, bad)
        with pytest.raises(UserError, match=runlock.LEASE_ENV):
            runlock.RunLock.acquire(tmp_path)


def test_atomic_writes_of_one_path_from_two_writers_never_collide(tmp_path):
    """The fixed `latest.tmp` let one writer rename the other's half-written file, or fail on it."""
    path, errors = tmp_path / "latest", []

    def writer(text: str) -> None:
        try:
            for _ in range(200):
                write_text_atomic(path, text)
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t * 500,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and path.read_text() in ("a" * 500, "b" * 500)
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


# ---- real processes ------------------------------------------------------------------------------------------


def snapshot(save: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(save.rglob("*"))}


@pytest.mark.slow
def test_a_second_run_is_refused_at_once_and_a_killed_holder_is_taken_over(tmp_path):
    setup = make_setup(tmp_path, dropout=0.0)
    save = tmp_path / "save"
    first_log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        [sys.executable, "-m", "pretrain.train", *train_args(setup, save, 100000)],
        cwd=ROOT,
        env=run_env(),
        stdout=first_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (save / "metrics.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGSTOP)  # the holder writes nothing while we look (its OS lock stays held)
        before = snapshot(save)
        t0 = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "pretrain.train", *train_args(setup, save, 2)],
            cwd=ROOT,
            env=run_env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        took = time.monotonic() - t0
        assert snapshot(save) == before  # nothing written, nothing touched
        os.killpg(first.pid, signal.SIGCONT)
        assert second.returncode != 0
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"in use by another run: pid {first.pid} on {socket.gethostname()}" in errors[0]
        assert "since " in errors[0] and "delete" in errors[0]
        assert took < 120, took  # at start-up, before any model is built (loaded machine: generous)

        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        third = subprocess.run(
            [sys.executable, "-m", "pretrain.train", *train_args(setup, save, 2)],
            cwd=ROOT,
            env=run_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
        assert f"from pid {first.pid} on {socket.gethostname()}" in third.stderr
        assert "that process is gone" in third.stderr
        assert not (save / runlock.RECORD).exists()  # released at the end
        steps = [json.loads(line)["step"] for line in (save / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]  # the killed run's steps were cut back: nothing twice
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        first_log.close()


@pytest.mark.slow
def test_every_rank_of_a_refused_two_process_launch_ends_with_the_refusal(tmp_path):
    setup = make_setup(tmp_path, dropout=0.0, world=2)
    save = tmp_path / "save"
    holder = runlock.RunLock.acquire(save)  # this test process holds --save
    try:
        before = snapshot(save)
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pretrain.train"]
        run = subprocess.run(
            [*cmd, *train_args(setup, save, 2)], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=240
        )
        assert run.returncode != 0 and snapshot(save) == before
        errors = [line for line in run.stdout.splitlines() + run.stderr.splitlines() if "error: " in line]
        assert any(f"in use by another run: pid {os.getpid()}" in line for line in errors), errors
        assert any("rank 0 could not lock --save" in line for line in errors), errors  # rank 1 learnt it too
        assert "Traceback" not in run.stdout + run.stderr
    finally:
        holder.release()
