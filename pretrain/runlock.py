"""One writer per `--save` directory: a lock that rank 0 takes before anything is written there.

    SAVE/run.lock    JSON record of the holder (host, PID, start, Slurm job), its lease renewed while it lives
    SAVE/run.flock   empty file held with flock(2) by the holder where the filesystem supports it

Design choices:
- Two signs of life, because shared filesystems differ: an OS lock (flock) is exact and free on a local disk
  and on NFS with working lock daemons, but is missing on some mounts (Lustre without `-o flock`, NFS without
  lockd), and may not be coherent between nodes (Lustre `localflock`). So a held flock always refuses, but a
  free one proves nothing about a holder on another node; the lease decides there.
- The lease is `lease_unix` in the record, rewritten (unique temporary file, fsync, rename) every
  `renew_every_s` by a daemon thread of the holder. A holder is stale once its lease is older than
  `BERT_LOCK_LEASE_S` (default 600 s) and three renewal periods; a run that sleeps longer than that (a
  stopped process, a frozen node) loses the directory, and its renewal thread ends it when it wakes.
- Takeover, each with a one-line warning: a holder on this host (same host name and boot) whose PID is gone
  or now names another process (its start time differs); a holder on this host before a reboot; a holder of
  the same Slurm job with a lower SLURM_RESTART_COUNT (the job was requeued); a stale lease. Anything else
  is refused at once with one line naming the holder and how to take over.
- A new record is created with link(2) (atomic and exclusive on NFS too); a takeover replaces the record by
  rename and reads it back, so of two runs that take over at once only one goes on.
- The job id comes from SLURM_JOB_ID, or BERT_SLURM_JOB_ID where a launcher forwarded it to a node that does
  not see Slurm's environment (pdsh does not pass it; scripts/launch_multinode.sh forwards it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from common.errors import UserError
from pretrain.runtime import dist

RECORD = "run.lock"
FLOCK = "run.flock"
FORMAT = "bert-run-lock"
LEASE_ENV = "BERT_LOCK_LEASE_S"
DEFAULT_LEASE_S = 600.0
LOST_EXIT_CODE = 75  # the renewal thread found the directory taken over by another run


def lease_s() -> float:
    """Seconds after the last renewal at which a holder counts as stale (`BERT_LOCK_LEASE_S`)."""
    raw = os.environ.get(LEASE_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_LEASE_S
    except ValueError:
        raise UserError(f"{LEASE_ENV}={raw!r} is not a number of seconds; unset it or pass e.g. 600") from None
    if value <= 0:
        raise UserError(f"{LEASE_ENV} must be positive (seconds), not {raw}")
    return value


def _boot_id() -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return None


def process_start(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux /proc), to tell a reused PID; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may hold spaces and ')'


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    now = process_start(pid)
    return start is None or now is None or now == start


def _slurm() -> tuple[str | None, int | None]:
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("BERT_SLURM_JOB_ID") or None
    restarts = os.environ.get("SLURM_RESTART_COUNT") or os.environ.get("BERT_SLURM_RESTART_COUNT")
    return job, int(restarts) if restarts and restarts.isdigit() else None


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(record: dict) -> str:
    """'pid P on HOST (Slurm job J), since T, lease renewed S s ago' for messages."""
    job = f" (Slurm job {record['slurm_job_id']})" if record.get("slurm_job_id") else ""
    if not record.get("started_unix"):  # no record, or a cut-short one
        return f"pid {record.get('pid', '?')} on {record.get('host', '?')}{job} (no readable {RECORD})"
    age = time.time() - float(record.get("lease_unix", 0))
    since = _utc(float(record["started_unix"]))
    return f"pid {record.get('pid')} on {record.get('host')}{job}, since {since}, lease renewed {age:.0f} s ago"


class RunLock:
    """The lock of one `--save` directory, held by this process (`acquire`, `release`)."""

    def __init__(self, save: Path, lease: float):
        self.save, self.lease = save, lease
        self.renew_every = min(60.0, lease / 10)
        self.record_path, self.token = save / RECORD, uuid.uuid4().hex
        self.flock_fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        job, restarts = _slurm()
        now = time.time()
        self.record = {
            "format": FORMAT,
            "version": 1,
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid": os.getpid(),
            "pid_start": process_start(os.getpid()),
            "started_unix": now,
            "started": _utc(now),
            "lease_unix": now,
            "renew_every_s": self.renew_every,
            "slurm_job_id": job,
            "slurm_restart_count": restarts,
            "command": " ".join(sys.argv)[:500],
            "token": self.token,
        }

    @classmethod
    def acquire(cls, save: str | os.PathLike) -> RunLock:
        """Take the lock of `save` (created if missing) or raise a one-line UserError naming its holder."""
        lock = cls(Path(save), lease_s())
        lock.save.mkdir(parents=True, exist_ok=True)
        try:
            lock._acquire()
        except BaseException:
            lock._unlock()
            raise
        lock._thread = threading.Thread(target=lock._renew_loop, name="runlock-renew", daemon=True)
        lock._thread.start()
        return lock

    def _acquire(self) -> None:
        if self._flock():
            holder = self._read() or {"host": socket.gethostname(), "pid": "?"}
            raise self._refusal(holder, f"it holds the OS lock on {self.save / FLOCK}")
        for _ in range(3):  # a record that vanishes or appears between our looks: look again
            if self._create():
                return
            holder = self._read()
            if holder is None:
                continue
            reason = self._takeover_reason(holder)
            if reason is None:
                raise self._refusal(holder, "it is alive or its lease is fresh")
            self._write()
            mine = self._read()
            if mine is None or mine.get("token") != self.token:  # another run took it over at the same moment
                raise self._refusal(mine or holder, "it took the directory over at the same moment")
            warnings.warn(f"taking over --save {self.save} from {describe(holder)}: {reason}", stacklevel=2)
            return
        raise UserError(f"--save {self.save}: {RECORD} keeps changing; is another run starting there?")

    def _flock(self) -> bool:
        """Whether a live process holds the OS lock (then: refuse); False when we hold it or none exists."""
        import fcntl

        fd = os.open(self.save / FLOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return True
            warnings.warn(
                f"the filesystem of --save {self.save} has no OS lock ({os.strerror(e.errno)}); the lock relies on "
                f"its lease alone ({LEASE_ENV}={self.lease:g} s)",
                stacklevel=2,
            )
            return False
        self.flock_fd = fd
        return False

    def _takeover_reason(self, holder: dict) -> str | None:
        """Why the holder in `holder` may be taken over, or None when it may be alive."""
        me = self.record
        if holder.get("host") == me["host"]:
            if holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
                return "this host was rebooted since it started"
            pid = holder.get("pid")
            if not isinstance(pid, int) or pid <= 0 or not _alive(pid, holder.get("pid_start")):
                return "that process is gone"
        job = holder.get("slurm_job_id")
        if (
            job
            and job == me["slurm_job_id"]
            and (holder.get("slurm_restart_count") or 0) < (me["slurm_restart_count"] or 0)
        ):
            return f"Slurm requeued job {me['slurm_job_id']} (restart {me['slurm_restart_count']})"
        age = time.time() - float(holder.get("lease_unix", 0))
        stale = max(self.lease, 3 * float(holder.get("renew_every_s", 0)))
        if age > stale:
            return f"its lease was last renewed {age:.0f} s ago (stale after {stale:g} s, {LEASE_ENV})"
        return None

    def _refusal(self, holder: dict, why: str) -> UserError:
        return UserError(
            f"--save {self.save} is in use by another run: {describe(holder)} ({why}); wait for it to end or stop "
            f"it, or, if it is not running, delete {self.record_path} (a lease older than {self.lease:g} s, "
            f"{LEASE_ENV}, is taken over by itself)"
        )

    def _text(self) -> str:
        return json.dumps(self.record, indent=2) + "\n"

    def _create(self) -> bool:
        """Write the record if there is none (link(2): exclusive, also on NFS); whether we did."""
        tmp = self._temporary()
        try:
            os.link(tmp, self.record_path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _write(self) -> None:
        os.replace(self._temporary(), self.record_path)

    def _temporary(self) -> Path:
        tmp = self.save / f".{RECORD}.{self.token[:12]}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            f.write(self._text())
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _read(self) -> dict | None:
        try:
            return json.loads(self.record_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # cut short by a crash: nobody's record, anyone may take it
            return {"host": "?", "pid": 0, "lease_unix": 0, "started_unix": 0}

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                current = self._read()
                if current is not None and current.get("token") != self.token:
                    print(
                        f"error: --save {self.save} was taken over by {describe(current)} while this run's lease "
                        "was stale; exiting at once so that only one run writes there",
                        file=sys.stderr,
                        flush=True,
                    )
                    os._exit(LOST_EXIT_CODE)
                self.record["lease_unix"] = time.time()
                self._write()
            except OSError as e:  # a filesystem hiccup: the next renewal tries again, the lease has slack
                warnings.warn(f"could not renew the lock of --save {self.save}: {e}", stacklevel=1)

    def release(self) -> None:
        """Stop renewing, remove the record if it is still ours, drop the OS lock (run.flock stays)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self._read()
        if current is not None and current.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.record_path.unlink()
        self._unlock()

    def _unlock(self) -> None:
        if self.flock_fd is not None:
            os.close(self.flock_fd)  # closing drops the flock
            self.flock_fd = None


@contextlib.contextmanager
def hold(save: str) -> Iterator[RunLock | None]:
    """Rank 0 takes the lock of `save` for the block; every rank learns whether it did (a collective, after
    the process group exists) and all raise the refusal together."""
    lock, refusal = None, ""
    if dist.is_rank0():
        try:
            lock = RunLock.acquire(save)
        except UserError as e:
            refusal = str(e)
    if dist.all_reduce([float(bool(refusal))], "max")[0]:
        raise UserError(refusal or f"rank 0 could not lock --save {save} (rank 0's error names the run holding it)")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
