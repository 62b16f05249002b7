"""The batch step of `scripts/slurm/pretrain.sbatch` (and `finetune.sbatch`): start every rank with `srun`,
pass a stop on, requeue the job at its time limit, and name the task that failed first.

    python -m pretrain.slurm MODULE [ARGS...]      (inside an sbatch allocation; the .sbatch files call it)

Design choices:
- One Slurm task per rank (`srun`, the allocation's `--ntasks-per-node`, one per GPU), not one task per node
  running DeepSpeed's launcher: Slurm is then the supervisor. `srun --kill-on-bad-exit=1` ends every task
  of the job when one dies and names it ("srun: error: n2: task 1: Killed"); a signal to the step reaches
  every rank (and its loader workers) directly; nothing needs ssh, pdsh or a hostfile. A task learns its
  rank from `SLURM_PROCID`/`SLURM_LOCALID`/`SLURM_NTASKS` (DeepSpeed reads RANK, LOCAL_RANK, WORLD_SIZE).
- The rendezvous is the first node's `NodeAddr` (from `scontrol`, so a cluster whose node names do not
  resolve works too) at `MASTER_PORT` = 20000 + job id mod 20000: two jobs sharing a node differ.
- Time limit (`--signal=B:USR1@300` sends USR1 to this process): SIGTERM goes to the ranks through
  `scancel --signal=TERM JOBID` (the steps only: a SIGTERM to `srun` itself would kill the step); every rank
  stops at the same step and saves (pretrain.train's StopFlag); then `scontrol requeue` puts the job back
  in the queue, up to `MAX_REQUEUES` restarts (`SLURM_RESTART_COUNT`, which counts every requeue of the job).
  The restarted job resumes from the newest complete checkpoint, as any relaunch does.
- SIGTERM here (preemption, `scancel`): Slurm has sent SIGTERM to the ranks too; they save within `KillWait`
  and this script does not requeue (a cluster with PreemptMode=REQUEUE requeues the job itself).
- The tasks run `python` from PATH, the submitting shell's (sbatch exports it): the virtualenv active there.
  `SRUN_ARGS` adds srun flags (pyxis's `--container-image`, `--cpu-bind`, ...); `TASK_PREFIX` goes before
  `python` in each task (`apptainer exec --nv IMAGE.sif`).
- Failure: srun's first "error: NODE: task N: ..." line is repeated as this job's one-line verdict, and the
  job exits non-zero without a requeue.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

from common.errors import UserError, run_cli

USAGE = "usage: python -m pretrain.slurm MODULE [ARGS...] (inside an sbatch allocation: see scripts/slurm/*.sbatch)"
TASK_ERROR = re.compile(r"^srun: error: (\S+): tasks? ([\d,\-]+): (.*)$")
# Each task: the rank variables DeepSpeed (torch.distributed's env:// rendezvous) reads, then the module itself.
TASK = (
    "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS"
    ' LOCAL_SIZE=$SLURM_NTASKS_PER_NODE; exec "$@"'
)


def hostnames(nodelist: str) -> list[str]:
    """`n[1-2]` -> ['n1', 'n2'] (scontrol show hostnames)."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def node_address(node: str) -> str:
    """The node's NodeAddr (its host name unless slurm.conf says otherwise)."""
    out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True, check=True)
    m = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    return m.group(1) if m else node


def master_port(job_id: int) -> int:
    return 20000 + job_id % 20000


def save_dir(args: list[str]) -> Path | None:
    """The --save (or --output) directory among the module's arguments, else in its --recipe file (--phase)."""
    given = {flag: _value(args, flag) for flag in ("--save", "--output", "--recipe", "--phase")}
    found = given["--save"] or given["--output"]
    if found is None and given["--recipe"]:
        from pretrain.recipe import read_file

        try:
            recipe = read_file(given["--recipe"])
        except UserError:  # the run itself says so, in one line
            return None
        recipe |= (recipe.get("phases") or {}).get(given["--phase"], {}) if given["--phase"] else {}
        found = recipe.get("save") or recipe.get("output")
    return Path(found) if found else None


def _value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def saved_step(save: Path | None) -> int | None:
    """Step of the newest complete checkpoint (SAVE/latest names it; pretrain.runtime.checkpoint writes it last)."""
    try:
        m = re.match(r"^step_(\d+)", (save / "latest").read_text().strip()) if save else None
    except OSError:
        return None
    return int(m.group(1)) if m else None


def say(msg: str) -> None:
    print(f"[slurm job {os.environ.get('SLURM_JOB_ID', '?')}] {msg}", file=sys.stderr, flush=True)


class Batch:
    """One run of the batch step: the srun, the signals that reach this process, and what srun said."""

    def __init__(self, module: str, args: list[str]):
        self.module, self.args = module, args
        self.job = os.environ["SLURM_JOB_ID"]
        self.restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        self.max_requeues = int(os.environ.get("MAX_REQUEUES", "10"))
        self.save = save_dir(args)
        self.signal: int | None = None
        self.errors: list[str] = []

    def environment(self) -> dict:
        """The ranks' environment: the submitting one (sbatch exports it), the rendezvous, and the threads."""
        env = dict(os.environ)
        nodes = hostnames(env["SLURM_JOB_NODELIST"])
        env.update(MASTER_ADDR=node_address(nodes[0]), MASTER_PORT=str(master_port(int(self.job))))
        if env.get("SLURM_CPUS_PER_TASK"):  # else the user's OMP_NUM_THREADS, or pretrain's share of the cores
            env["OMP_NUM_THREADS"] = env["SLURM_CPUS_PER_TASK"]
        return env

    def _handle(self, signum, frame) -> None:
        first = self.signal is None
        self.signal = self.signal or signum
        if first:  # the steps only: srun itself would answer a SIGTERM by killing its tasks
            subprocess.run(["scancel", "--signal=TERM", self.job], capture_output=True)

    def run(self) -> int:
        if self.restarts:
            step = saved_step(self.save)
            at = f"resumed at step {step}" if step is not None else "no checkpoint yet: starting from step 0"
            say(f"requeue {self.restarts} of {self.max_requeues}, {at}")
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        cmd = ["srun", "--kill-on-bad-exit=1", "--export=ALL", *shlex.split(os.environ.get("SRUN_ARGS", ""))]
        cmd += ["bash", "-c", TASK, "task", *shlex.split(os.environ.get("TASK_PREFIX", ""))]
        cmd += ["python", "-m", self.module, *self.args]
        proc = subprocess.Popen(cmd, env=self.environment(), stderr=subprocess.PIPE, text=True, errors="replace")
        reader = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        reader.start()
        rc = proc.wait()
        reader.join(timeout=10)
        return self._verdict(rc)

    def _read(self, stream) -> None:
        for line in stream:
            sys.stderr.write(line)
            sys.stderr.flush()
            if TASK_ERROR.match(line.rstrip("\n")):
                self.errors.append(line.rstrip("\n"))

    def _verdict(self, rc: int) -> int:
        step = saved_step(self.save)
        if self.signal == signal.SIGUSR1 and rc == 0:
            return self._requeue(step)
        if self.signal in (signal.SIGTERM, signal.SIGINT):
            say(f"stopped by {signal.Signals(self.signal).name} (preemption or scancel): not requeued by this script")
            return 0
        if rc != 0 or self.errors:
            first = TASK_ERROR.match(self.errors[0]) if self.errors else None
            where = f"node {first[1]}, rank {first[2]}: {first[3]}" if first else f"srun exited with code {rc}"
            say(f"error: the job failed on {where} (first); every task of the job was ended; not requeued")
            return rc or 1
        return 0

    def _requeue(self, step: int | None) -> int:
        at = f"every rank saved at step {step}" if step is not None else "no checkpoint was saved"
        if self.restarts >= self.max_requeues:
            say(f"time limit: {at}; not requeued: MAX_REQUEUES={self.max_requeues} reached (submit again to resume)")
            return 0
        say(f"time limit: {at}; requeue {self.restarts + 1} of {self.max_requeues}")
        out = subprocess.run(["scontrol", "requeue", self.job], capture_output=True, text=True)
        if out.returncode != 0:
            say(f"error: scontrol requeue failed: {out.stderr.strip()} (submit again to resume)")
            return 1
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-"):
        raise UserError(USAGE)
    if "SLURM_JOB_ID" not in os.environ:
        raise UserError("not inside a Slurm job: submit it with sbatch (scripts/slurm/pretrain.sbatch ...)")
    if not os.environ.get("MAX_REQUEUES", "10").isdigit():
        raise UserError(f"MAX_REQUEUES={os.environ['MAX_REQUEUES']!r}: set it to a whole number (0: never requeue)")
    return Batch(argv[0], argv[1:]).run()


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
