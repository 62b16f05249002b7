"""The supervisor behind `scripts/launch_multinode.sh`: one pretraining job over a DeepSpeed hostfile that
fails fast, stops cleanly and leaves nothing behind on any node.

    scripts/launch_multinode.sh HOSTFILE [--max-restarts N] [--stop-timeout S] <bert-pretrain flags>

Design choices:
- DeepSpeed's runner starts the job (pdsh by default: DeepSpeed's `launch.py` on every node, which starts
  that node's ranks) and this process watches its output. pdsh waits for every node, so without a watcher
  the ranks of a healthy node would wait in a collective for a dead peer until the process-group timeout.
- Every process of a launch carries `BERT_LAUNCH_ID=<id>` in its environment (set for the runner and, through
  DeepSpeed's env file, on every node), so this process finds the ranks, their loader workers and each
  node's `launch.py` by `/proc/PID/environ` (on other nodes over pdsh), not by guessing at command lines.
- Failure: a rank's non-zero exit, a node's launcher or ssh connection that ended, a traceback's last line or
  an `error:` line names the node. Two seconds later (time for the other nodes' consequences to show, so that
  the first cause is told from its echoes) every process of the launch on every node is killed: with a peer
  gone nothing more can be saved, and the newest complete checkpoint is intact. The exit is non-zero and the
  message names the node and the cause. `--max-restarts N` then relaunches the same command, which resumes
  from the newest complete checkpoint, up to N times (as `torchrun --max-restarts` does).
- Stop: SIGTERM/SIGINT here are passed to the ranks alone: not to `launch.py`, which would kill them 30 s
  later, nor to pdsh. The ranks stop at the same micro-batch, save and exit 0, and the launch ends by
  itself; whatever is left after `--stop-timeout` seconds is killed. A second Ctrl-C kills at once.
- The supervisor exits only once no process of the launch is left on any node (checked, not assumed).
- Nothing outlives the supervisor, even a SIGKILLed one: a guard process (its own session) holds a pipe from
  it; when that pipe closes without a "done" line, the supervisor is gone, and the guard kills the runner's
  process group (runner, local launch.py and ranks, pdsh and its ssh clients) and sweeps every node by the
  launch id. The ranks watch their own output too (`pretrain.runtime.dist.die_with_launch`): when its reader goes
  away (the supervisor, or the ssh connection to their node), they kill their node's launch.py and themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError, run_cli
from common.flags import add_arguments, from_args, option
from pretrain.failures import Failure, describe, parse_failure

LAUNCH_ID = "BERT_LAUNCH_ID"
EXPORTED = re.compile(r"^(NCCL_|DS_|OMP_|CUDA_|WANDB_|HF_|TORCH_|BERT_)")
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE")
SETTLE_S = 2.0  # between the first sign of a failure and the teardown: the other nodes' echoes arrive
SSH_KEEPALIVE = "-o ServerAliveInterval=10 -o ServerAliveCountMax=3"  # a node that vanishes ends its ssh in ~30 s

# Run on a node by `sh -c`: list or signal this launch's processes there. Ranks (and their loader workers)
# carry LOCAL_RANK; DeepSpeed's per-node launcher is told by its command line.
_SWEEP = r"""id={id}; who={who}; what={what}
for f in $(grep -lzx "{key}=$id" /proc/[0-9]*/environ 2>/dev/null); do
  p=${{f#/proc/}}; p=${{p%/environ}}
  if tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | grep -q deepspeed.launcher.launch; then [ "$who" = all ] || continue
  elif ! grep -qz '^LOCAL_RANK=' "$f" 2>/dev/null; then continue; fi
  if [ "$what" = list ]; then echo "$p $(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | cut -c1-100)"
  else kill -$what $p 2>/dev/null; fi
done; true"""

# Run by `sh -c` in a process of its own, its stdin a pipe from the supervisor: the runner's process group id,
# then "done" once the launch ended. End of input before "done" means the supervisor died: kill the runner's
# process group and sweep ($1) this node, or every node of $2 over pdsh.
_GUARD = r"""read pgid || exit 0
if read done; then exit 0; fi
kill -s KILL -- "-$pgid" 2>/dev/null
if [ -n "$2" ]; then PDSH_RCMD_TYPE=ssh pdsh -S -u 60 -w "$2" "$1"; else sh -c "$1"; fi"""


@dataclass(kw_only=True)
class LaunchConfig:
    """What `scripts/launch_multinode.sh` takes besides the training flags (which go to bert-pretrain)."""

    hostfile: str = option(positional=True)
    """DeepSpeed hostfile: one `hostname slots=N` line per node; the first host is the rendezvous master."""
    max_restarts: int = 0
    """After a failure, relaunch the same command (it resumes from the newest complete checkpoint) up to N
    times."""
    stop_timeout: float = 600.0
    """Seconds the ranks get to save after SIGTERM/SIGINT before whatever is left is killed."""


@dataclass
class Outcome:
    code: int
    stopped: bool = False
    failures: list[Failure] = field(default_factory=list)


def read_hostfile(path: str) -> list[str]:
    """Host names of a DeepSpeed hostfile, in order; every line `hostname slots=N` with N a positive integer."""
    if not Path(path).is_file():
        raise UserError(f"hostfile {path} does not exist; pass a file with lines 'hostname slots=N'")
    hosts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+)\s+slots=(\S*)\s*(#.*)?$", line)
        if not m:
            raise UserError(f"hostfile {path} line {n}: bad line {line!r}; write 'hostname slots=N'")
        if not re.fullmatch(r"[0-9]+", m.group(2)) or int(m.group(2)) < 1:
            raise UserError(
                f"hostfile {path} line {n}: slots={m.group(2)} is not a positive integer; write 'hostname slots=N' "
                "with N the number of GPUs (processes) on that node"
            )
        if m.group(1) in hosts:
            raise UserError(f"hostfile {path} line {n}: host {m.group(1)} is named twice; give each node one line")
        hosts.append(m.group(1))
    if not hosts:
        raise UserError(f"hostfile {path} names no host; write one 'hostname slots=N' line per node")
    return hosts


class Launch:
    """One start of the job: the DeepSpeed runner, the watch on its output, and the sweeps over the nodes."""

    def __init__(self, cfg: LaunchConfig, hosts: list[str], train_args: list[str], log_path: Path):
        self.cfg, self.hosts, self.log_path = cfg, hosts, log_path
        self.id = uuid.uuid4().hex
        self.extra = shlex.split(os.environ.get("LAUNCHER_ARGS", ""))
        self.launcher = os.environ.get("LAUNCHER", "pdsh")
        self.node = self._own_node()
        self.remote = self.launcher == "pdsh" and "--no_ssh" not in self.extra and len(hosts) > 1
        master = os.environ.get("MASTER_ADDR") or hosts[0]
        self.cmd = ["deepspeed", "--hostfile", cfg.hostfile, "--launcher", self.launcher, "--master_addr", master]
        self.cmd += ["--master_port", os.environ.get("MASTER_PORT", "29500"), *self.extra]
        self.cmd += ["--module", "pretrain.train", *train_args]
        self.failures: list[Failure] = []
        self.first_failure_at: float | None = None
        self.lock = threading.Lock()

    def _own_node(self) -> str:
        if "--node_rank" in self.extra:  # --no_ssh: this process started one node, named by --node_rank
            return self.hosts[int(self.extra[self.extra.index("--node_rank") + 1])]
        return self.hosts[0]

    def environment(self, env_file: str) -> dict:
        """The runner's environment: ours with the launch id, minus a rank's own variables (a launcher sets
        those for each rank; inherited ones would make every process of the launch look like a rank)."""
        env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
        env.update(DS_ENV_FILE=env_file, **{LAUNCH_ID: self.id})
        append = env.get("PDSH_SSH_ARGS_APPEND", "")
        env["PDSH_SSH_ARGS_APPEND"] = f"{append} {SSH_KEEPALIVE}".strip()
        return env

    def write_env_file(self, path: str) -> None:
        """What every node's ranks get through DeepSpeed's env file (pdsh exports it there)."""
        names = ["PATH", "VIRTUAL_ENV", "PYTHONPATH"] + sorted(k for k in os.environ if EXPORTED.match(k))
        lines = [f"{k}={os.environ[k]}" for k in names if k in os.environ and k != "DS_ENV_FILE"]
        # the job id for the --save lock's requeue rule (pretrain.runlock); pdsh does not pass Slurm's variables
        lines += [f"BERT_{k}={os.environ[k]}" for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT") if k in os.environ]
        Path(path).write_text("\n".join([*lines, f"{LAUNCH_ID}={self.id}"]) + "\n")

    def guard(self) -> subprocess.Popen:
        """The dead man's switch of this launch (see the module docstring); `arm` tells it the runner."""
        hosts = ",".join(self.hosts) if self.remote else ""
        script = _SWEEP.format(id=self.id, who="all", what="KILL", key=LAUNCH_ID)
        return subprocess.Popen(
            ["sh", "-c", _GUARD, "bert-launch-guard", script, hosts],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # neither a Ctrl-C at the terminal nor a kill of our group reaches it
        )

    def sweep(self, what: str, who: str = "all") -> list[str]:
        """`what` (list, TERM or KILL) this launch's processes on every node; `who`: ranks or all."""
        script = _SWEEP.format(id=self.id, who=who, what=what, key=LAUNCH_ID)
        if self.remote:
            cmd = ["pdsh", "-S", "-w", ",".join(self.hosts), script]
            env = dict(os.environ, PDSH_RCMD_TYPE="ssh")
        else:
            cmd, env = ["sh", "-c", script], None
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60).stdout
        except subprocess.TimeoutExpired:
            return ["(a node did not answer the sweep within 60 s)"]
        return [line for line in out.splitlines() if line.strip()]

    def watch(self, stream, log) -> None:
        """Echo the launch's output and collect what it says of failures (until the teardown starts)."""
        for line in stream:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()
            failure = parse_failure(line.rstrip("\n"), self.hosts, self.node)
            if failure is not None:
                with self.lock:
                    if self.first_failure_at is None:
                        self.first_failure_at = time.monotonic()
                    if time.monotonic() - self.first_failure_at <= SETTLE_S:
                        self.failures.append(failure)

    def run(self, stop: StopRequest) -> Outcome:
        with tempfile.NamedTemporaryFile("w", prefix="deepspeed_env.", delete=False) as f:
            env_file = f.name
        self.write_env_file(env_file)
        try:
            return self._supervise(stop, env_file)
        finally:
            os.unlink(env_file)

    def _supervise(self, stop: StopRequest, env_file: str) -> Outcome:
        print("launching: " + shlex.join(self.cmd), file=sys.stderr, flush=True)
        guard = self.guard()
        try:
            outcome = self._start(stop, env_file, guard)
        except BaseException:
            guard.stdin.close()  # no "done": the guard ends whatever this launch left
            raise
        guard.stdin.write("done\n")  # everything of the launch has ended (`_finish` checked)
        guard.stdin.close()
        guard.wait()
        return outcome

    def _start(self, stop: StopRequest, env_file: str, guard: subprocess.Popen) -> Outcome:
        proc = subprocess.Popen(
            self.cmd,
            env=self.environment(env_file),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # Ctrl-C at a terminal reaches this process only; it decides what to pass on
        )
        guard.stdin.write(f"{proc.pid}\n")  # the runner leads its own process group (its new session)
        guard.stdin.flush()
        with open(self.log_path, "a") as log:
            reader = threading.Thread(target=self.watch, args=(proc.stdout, log), daemon=True)
            reader.start()
            outcome = self._wait(proc, stop)
            reader.join(timeout=10)
        return outcome

    def _wait(self, proc: subprocess.Popen, stop: StopRequest) -> Outcome:
        """Until the runner ends: tear down on a failure, pass a stop on to the ranks."""
        torn_down, stop_sent = False, 0.0
        while proc.poll() is None:
            time.sleep(0.2)
            settled = self.first_failure_at is not None and time.monotonic() - self.first_failure_at > SETTLE_S
            if (settled or stop.now) and not torn_down:
                self.teardown(proc)
                torn_down = True
            elif stop.requested and not torn_down:
                if time.monotonic() - stop_sent > 5.0:  # again every 5 s: ranks that were still starting
                    self.sweep("TERM", who="ranks")
                    stop_sent = time.monotonic()
                if time.monotonic() - stop.requested > self.cfg.stop_timeout:
                    print(
                        f"ranks still running {self.cfg.stop_timeout:.0f} s after the stop: killing them",
                        file=sys.stderr,
                    )
                    self.teardown(proc)
                    torn_down = True
        return self._finish(proc, stop)

    def teardown(self, proc: subprocess.Popen) -> None:
        """Kill every process of the launch on every node, then the local runner."""
        with self.lock:
            self.first_failure_at = self.first_failure_at or time.monotonic()
        self.sweep("KILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def _finish(self, proc: subprocess.Popen, stop: StopRequest) -> Outcome:
        """The runner has ended: make sure nothing of the launch is left anywhere."""
        left = self.sweep("list")
        deadline = time.monotonic() + 30.0
        while left and time.monotonic() < deadline:  # ranks of a finished launch exit within moments
            time.sleep(1.0)
            left = self.sweep("list")
        if left:
            self.sweep("KILL")
            self.failures.append(Failure(self.node, f"processes were left after the launch ended: {left[:3]}", 5))
        with self.lock:
            failures = list(self.failures)
        code = proc.returncode
        if failures:
            return Outcome(code if code > 0 else 1, failures=failures)
        return Outcome(code, stopped=bool(stop.requested) and code == 0)


class StopRequest:
    """SIGTERM/SIGINT to the supervisor: `requested` (time of the first), `now` (a second Ctrl-C)."""

    def __init__(self):
        self.requested = 0.0
        self.now = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            self.now = True
        self.requested = self.requested or time.monotonic()


def parse_args(argv: list[str] | None) -> tuple[LaunchConfig, list[str]]:
    p = argparse.ArgumentParser(
        prog="scripts/launch_multinode.sh",
        description="Pretrain on every node of a DeepSpeed hostfile. Every other flag goes to bert-pretrain "
        "(bert-pretrain --help). A failure on any node ends every rank on every node at once and names the "
        "node; SIGTERM/SIGINT make every rank save at the same step and exit 0. Environment: LAUNCHER (pdsh, "
        "openmpi, slurm, ...), LAUNCHER_ARGS (e.g. '--no_ssh --node_rank 1'), MASTER_ADDR, MASTER_PORT.",
    )
    add_arguments(p, LaunchConfig)
    args, rest = p.parse_known_args(argv)
    return from_args(LaunchConfig, args), rest


def main(argv: list[str] | None = None) -> int:
    cfg, train_args = parse_args(argv)
    hosts = read_hostfile(cfg.hostfile)
    if cfg.max_restarts < 0 or cfg.stop_timeout <= 0:
        raise UserError("--max-restarts must be 0 or more and --stop-timeout positive")
    stop = StopRequest()
    stop.install()
    fd, log_name = tempfile.mkstemp(prefix="launch_multinode.", suffix=".log")
    os.close(fd)
    for attempt in range(cfg.max_restarts + 1):
        outcome = Launch(cfg, hosts, train_args, Path(log_name)).run(stop)
        if not outcome.failures:
            break
        what = describe(outcome.failures)
        if stop.requested or attempt == cfg.max_restarts:
            print(
                f"error: training failed on {what}; every rank on every node was ended (log: {log_name})",
                file=sys.stderr,
            )
            return outcome.code or 1
        print(
            f"restart {attempt + 1}/{cfg.max_restarts} after a failure on {what}: relaunching, which resumes from "
            "the newest complete checkpoint",
            file=sys.stderr,
            flush=True,
        )
    if outcome.code != 0:
        print(f"error: the launch failed with exit code {outcome.code} (log: {log_name})", file=sys.stderr)
        return outcome.code
    if outcome.stopped:
        print(
            "stopped by a signal: every rank saved at the same step; relaunch the same command to resume",
            file=sys.stderr,
        )
    os.unlink(log_name)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
