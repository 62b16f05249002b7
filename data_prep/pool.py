"""Worker processes for data preparation: in order, bounded, and never hung by a dead worker.

`multiprocessing.Pool` waits forever for the result of a worker that was killed (the OOM killer, a signal),
and forking a process that already runs threads (torch, gloo, a tokenizer's pool) can deadlock the child on a
lock held at the fork. Workers here are spawned (fresh interpreters, direct children, so getrusage's
RUSAGE_CHILDREN counts them) by `concurrent.futures.ProcessPoolExecutor`, which fails every pending item at
once when a worker dies; that failure becomes one `UserError` line. The executor itself would still wait
forever on a result message that a killed worker left half-written in its result pipe (results are larger
than a pipe's buffer), so each result travels through a file and the pipe carries only the file's name, a
write too small to be split. (As with any spawned pool, a script that calls `build` with several workers
keeps its top-level work under `if __name__ == "__main__":`.)
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

from data_prep.errors import UserError

_WORK: list[Callable] = []  # the worker's own copy of the function, set once by _init_worker


def _init_worker(work: Callable) -> None:
    _WORK.append(work)


def _run_worker(item, spool: str) -> str:
    """Run the work on `item`; the result goes to a file in `spool`, and only its name through the pipe."""
    fd, path = tempfile.mkstemp(dir=spool, suffix=".pkl")
    with os.fdopen(fd, "wb") as f:
        pickle.dump(_WORK[0](item), f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def _collect(future) -> object:
    """The result a worker left in its file (the file is removed)."""
    path = future.result()
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    finally:
        os.unlink(path)


@contextmanager
def _executor(fn: Callable, workers: int) -> Iterator[ProcessPoolExecutor]:
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(fn,))
    try:
        yield pool
    except BrokenProcessPool:
        raise UserError(
            "a worker process died (killed by a signal or out of memory?); rerun the same command to go on"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(fn, items)` over `workers` processes, in order, with at most `2 * workers` items in flight.

    `fn` travels to each worker once, pickled. (`Pool.imap` would read the whole input ahead of the workers,
    which defeats bounded memory.) `workers == 1` runs in this process, with no pickling at all.
    """
    if workers == 1:
        yield from map(fn, items)
        return
    # The spool is entered first so it is removed last, after the executor's shutdown has waited for the
    # workers: on an error, a running worker still writes its result there.
    with tempfile.TemporaryDirectory(prefix="bert-prep-pool-") as spool, _executor(fn, workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(_run_worker, item, spool))
            if len(pending) >= 2 * workers:
                yield _collect(pending.popleft())
        while pending:
            yield _collect(pending.popleft())
