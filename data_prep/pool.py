"""Worker processes for data preparation: in order, bounded, and never hung by a dead worker.

`multiprocessing.Pool` waits forever for the result of a worker that was killed (the OOM killer, a signal),
and forking a process that already runs threads (torch, gloo, a tokenizer's pool) can deadlock the child on a
lock held at the fork. `concurrent.futures.ProcessPoolExecutor` notices a dead worker, but through feeder and
manager threads and one queue shared by all workers, and a build whose worker was SIGKILLed still hung in it
(once in four CI runs; where, it did not show). So this pool has no threads and nothing shared:
- each worker is spawned (a fresh interpreter and a direct child, so getrusage's RUSAGE_CHILDREN counts it)
  with its own pipe, and has at most one item at a time;
- the parent waits on every worker's pipe and process sentinel at once (`multiprocessing.connection.wait`), so
  a worker's death is seen the moment it happens and becomes one `UserError` line, and the others are killed;
- a result travels through a file and the pipe carries only the file's name, a write too small to be split,
  so a worker killed while it answers cannot leave half a message that the parent would wait on;
- a worker whose parent died reads the end of its pipe and exits.
(As with any spawned pool, a script that calls `build` with several workers keeps its top-level work under
`if __name__ == "__main__":`.)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait

from common.errors import UserError

DIED = "a worker process died (killed by a signal or out of memory?); rerun the same command to go on"


def _worker_main(work: Callable, conn: Connection, spool: str) -> None:
    """Take items until the parent says stop (None) or is gone; answer each with ("ok", result file) or
    ("error", exception, its traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the workers
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        try:
            result = work(item)
        except Exception as e:  # noqa: BLE001 - handed to the parent, which raises it
            try:
                conn.send(("error", e, traceback.format_exc()))
            except Exception:  # noqa: BLE001 - an exception that does not pickle goes as its text
                conn.send(("error", RuntimeError(repr(e)), traceback.format_exc()))
            continue
        fd, path = tempfile.mkstemp(dir=spool, suffix=".pkl")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            conn.send(("ok", path))
        except OSError:  # the parent is gone
            return


class _Worker:
    def __init__(self, ctx, work: Callable, spool: str):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(work, child, spool), daemon=True)
        self.process.start()
        child.close()  # the worker's end lives only in the worker, so its death closes the pipe
        self.index: int | None = None  # the item it has, if any

    def give(self, index: int, item) -> None:
        try:
            self.conn.send(item)
        except OSError:  # the worker is gone (broken pipe, reset)
            raise UserError(DIED) from None
        self.index = index


def _load(path: str) -> object:
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    finally:
        os.unlink(path)


def _answer(message: tuple) -> str:
    """The result file of an answer, or the worker's exception raised here (its traceback as a note)."""
    if message[0] == "ok":
        return message[1]
    _, error, remote = message
    error.add_note(f"in the worker process:\n{remote}")
    raise error


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(fn, items)` over `workers` processes, in order, with at most `2 * workers` items between the one
    the caller takes next and the last one read from `items` (results not taken yet wait on disk).

    `fn` travels to each worker once, pickled. (`Pool.imap` would read the whole input ahead of the workers,
    which defeats bounded memory.) `workers == 1` runs in this process, with no pickling at all.
    """
    if workers == 1:
        yield from map(fn, items)
        return
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bert-prep-pool-") as spool:
        pool: list[_Worker] = []
        try:
            pool.extend(_Worker(ctx, fn, spool) for _ in range(workers))  # inside: a failed start stops the others
            yield from _run(pool, iter(items), 2 * workers)
            for w in pool:  # the work is done: a worker that died since has nothing left to lose
                with contextlib.suppress(OSError):
                    w.conn.send(None)
            for w in pool:
                w.process.join()
        finally:  # an error, or the caller closed us early: stop every worker now, before the spool goes
            for w in pool:
                if w.process.is_alive():
                    w.process.kill()
                w.process.join()
                w.conn.close()


def _run(pool: list[_Worker], items: Iterator, window: int) -> Iterator:
    done: dict[int, str] = {}  # item index -> result file, finished but not yet yielded
    head = sent = 0  # the next index to yield; the next index to read from `items`
    exhausted = False
    while True:
        while head in done:
            yield _load(done.pop(head))
            head += 1
        for w in pool:  # give idle workers the next items, as far as the window allows
            if w.index is None and not exhausted and sent < head + window:
                item = next(items, _END)
                if item is _END:
                    exhausted = True
                else:
                    w.give(sent, item)
                    sent += 1
        if head == sent and exhausted:
            return
        busy = {w.conn: w for w in pool if w.index is not None}
        for ready in wait([*busy, *(w.process.sentinel for w in pool)]):
            if ready in busy:  # an answer (read before any death that followed it), or the end of a dead one
                w = busy[ready]
                try:
                    message = w.conn.recv()
                except (EOFError, OSError):
                    raise UserError(DIED) from None
                done[w.index] = _answer(message)
                w.index = None
        if any(not w.process.is_alive() for w in pool):
            raise UserError(DIED)


_END = object()
