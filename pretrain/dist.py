"""Rank, world size, the few collectives the training code runs itself (DeepSpeed runs the rest), and the
lifetime of a rank's processes.

Design choices:
- Every collective's tensor lives on the accelerator's current device (`device()`): a process group made
  by `init_process_group("nccl")` has no CPU backend, so a CPU tensor there fails ("No backend type
  associated with device type cpu"), while gloo (CPU runs) takes CPU tensors.
- Collectives run at world size 1 too (whenever a process group exists), so a one-GPU run exercises the
  same calls as a 64-GPU one; without a process group they return their input.
- Nothing else in the project calls `torch.distributed` collectives directly (a test checks the sources).
- A rank and its loader workers never outlive the process that started them (`die_with_parent`): a
  launcher that is killed takes its ranks with it, instead of leaving them waiting on their peers. A rank of
  scripts/launch_multinode.sh also ends with its launch's output (`die_with_launch`): a SIGKILLed supervisor
  or a lost ssh connection leaves nothing training.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import stat
import threading

import torch
import torch.distributed as dist

from data_prep import errors

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def device() -> torch.device:
    """The accelerator's current device (DeepSpeed's accelerator: `cpu` under DS_ACCELERATOR=cpu)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """`values` reduced element-wise over all ranks (`op`: sum, max or min), in float64."""
    if not initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t, op=_OPS[op])
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor, group=None) -> None:
    """Sum `t` in place over the ranks of `group` (all ranks by default); `t` lives where the optimizer's
    partitions live, the accelerator's device. Nothing to do in a group of one."""
    if initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)


def all_gather_with_local_grad(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (same shape on each) concatenated along dim 0 in rank order; gradient flows back into
    this rank's own slice only (the others are copies). `t` itself without a process group."""
    if not initialized() or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts)


def barrier() -> None:
    """Every rank waits for every other (on the accelerator's device under NCCL)."""
    if initialized():
        all_reduce([0.0])


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: this process gets `sig` when its parent dies; a parent already gone ends this process now.
    Elsewhere (no prctl): nothing."""
    parent = os.getppid()
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


LAUNCH_ID = "BERT_LAUNCH_ID"  # set by scripts/launch_multinode.sh (pretrain.launcher) for every process of a launch


def die_with_launch() -> None:
    """A rank of a supervised launch (`LAUNCH_ID` set) whose output is a pipe or socket: when the reader of that
    output goes away (the supervisor; on another node, the ssh connection that started it), kill this node's
    DeepSpeed launch.py (so it starts nothing more) and this rank. A daemon thread blocks in poll(2) on stdout,
    which reports POLLERR/POLLHUP once no reader is left: no polling interval, no cost."""
    if LAUNCH_ID not in os.environ:
        return
    try:
        mode = os.fstat(1).st_mode
    except OSError:
        return
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        threading.Thread(target=_end_with_output, name="die-with-launch", daemon=True).start()


def _end_with_output() -> None:
    poller = select.poll()
    poller.register(1, 0)  # POLLERR and POLLHUP are reported whatever the mask
    while True:
        for _, events in poller.poll():
            if events & select.POLLNVAL:  # stdout was closed here: nothing to watch
                return
            if events & (select.POLLERR | select.POLLHUP):
                parent = os.getppid()
                try:
                    launcher = b"deepspeed.launcher.launch" in open(f"/proc/{parent}/cmdline", "rb").read()
                except OSError:
                    launcher = False
                if launcher:
                    os.kill(parent, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)


def run_cli(main, argv=None, parse=None) -> int:
    """`data_prep.errors.run_cli` for a command that may start DeepSpeed: after a clean run, the bounded
    `pretrain.engine.shutdown` (every rank meets, then leaves the group); a failed run exits at once.
    With `parse`, `main` runs on `parse(argv)` (its config) and a run that returns is exit code 0."""

    def call(args):
        if parse is None:
            return main(args)
        main(parse(args))
        return 0

    rc = errors.run_cli(call, argv)
    if rc == 0:
        from pretrain.engine import shutdown

        shutdown()
    return rc
