"""`data_prep.pool.ordered_map`: order, bounded read-ahead, a worker's error, a worker's death (a real SIGKILL),
an early close and a dead parent, each without a hang or a process left behind."""

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fixtures_prep import ROOT, children

from common.errors import UserError
from data_prep.pool import DIED, ordered_map


def slow_square(x: int) -> int:
    time.sleep((x * 7919 % 13) / 1000)  # uneven costs, so workers finish out of order
    return x * x


def fail_on_five(x: int) -> int:
    if x == 5:
        raise ValueError(f"bad item {x}")
    return x


def die_on_three(x: int) -> int:
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.01)
    return x


def sleep_long(x: int) -> int:
    time.sleep(0 if x == 0 else 60)
    return x


def test_results_come_in_order_and_the_input_is_read_at_most_two_per_worker_ahead():
    read = []

    def items():
        for i in range(60):
            read.append(i)
            yield i

    out = []
    for r in ordered_map(slow_square, items(), 3):
        assert len(read) - len(out) <= 2 * 3, (len(read), len(out))
        out.append(r)
    assert out == [i * i for i in range(60)]
    assert multiprocessing.active_children() == []


def test_a_large_result_and_an_empty_input():
    assert list(ordered_map(bytes, [3_000_000, 5], 2)) == [bytes(3_000_000), bytes(5)]  # > a pipe's buffer
    assert list(ordered_map(slow_square, [], 2)) == []


def test_a_worker_error_is_raised_with_its_type_and_the_workers_stop():
    with pytest.raises(ValueError, match="bad item 5") as e:
        list(ordered_map(fail_on_five, range(20), 2))
    assert any("in the worker process" in note for note in e.value.__notes__)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("attempt", range(10))
def test_a_worker_killed_by_sigkill_is_one_user_error_and_nothing_hangs(attempt):
    start = time.monotonic()
    got = []
    with pytest.raises(UserError, match="worker process died") as e:
        for r in ordered_map(die_on_three, range(40), 2):
            got.append(r)
    assert str(e.value) == DIED
    assert got == list(range(len(got))) and len(got) <= 3
    assert multiprocessing.active_children() == []
    assert time.monotonic() - start < 30


def test_closing_early_stops_busy_workers_at_once():
    start = time.monotonic()
    results = ordered_map(sleep_long, range(10), 2)
    assert next(results) == 0
    results.close()  # the other worker sleeps 60 s in its item
    assert multiprocessing.active_children() == []
    assert time.monotonic() - start < 30


ORPHAN = """
import sys, time
from data_prep.pool import ordered_map
def work(x):
    time.sleep(0.2)
    return x
if __name__ == "__main__":
    for r in ordered_map(work, range(10**6), 2):
        print("got", r, flush=True)
"""


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(textwrap.dedent(ORPHAN))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("got 0")
        workers = [pid for pid, cmdline in children(proc.pid) if "spawn_main" in cmdline]
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 20
        while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in workers):
            assert time.monotonic() < deadline, f"workers {workers} outlived their parent"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
