"""Rank, world size, the few collectives the training code runs itself (DeepSpeed runs the rest), and the
lifetime of a rank's processes and of its process group (`init_distributed`, `shutdown`).

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
- The process group is DeepSpeed's (`deepspeed.comm`), joined and left here; DeepSpeed is imported inside
  these functions, so this module sits below the engine (pretrain.runtime.engine) and `run_cli` can end a run
  without importing it.
"""

from __future__ import annotations

import ctypes
import datetime
import faulthandler
import os
import select
import signal
import socket
import stat
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from common.log import get_logger

log = get_logger(__name__)

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


def on_gpu() -> bool:
    return torch.cuda.is_available()


def _deepspeed():
    """DeepSpeed, imported on first use (pretrain.runtime.engine is the one module that imports it at the top),
    with the CPU accelerator where there is no GPU: DeepSpeed reads DS_ACCELERATOR when it is imported."""
    if not on_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm  # noqa: F401  (deepspeed.comm, the process group DeepSpeed's engine uses)

    return deepspeed


def _ensure_dist_env() -> None:
    """A plain `python -m pretrain.train` (no launcher) is a world of one: give DeepSpeed what a launcher would."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


SHUTDOWN_TIMEOUT_S = 120.0


def shutdown(timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Leave the process group cleanly once a run succeeded: every rank meets, then tears the group down.

    A rank that exits with the group alive can abort in the backend's destructor ("terminate called without
    an active exception") while a peer is still talking to it, turning a finished run into a failed launch.
    A peer that never arrives (it died after the last step) must not keep this rank alive: after `timeout_s`
    the process dumps every thread's stack and exits with code 1 (faulthandler's watchdog thread, which fires
    even while this thread waits inside the backend).
    """
    ds_dist = _deepspeed().comm
    if not ds_dist.is_initialized():
        return
    faulthandler.dump_traceback_later(timeout_s, exit=True)
    try:
        barrier()
        if not on_gpu():
            _unlink_shm_buffer(ds_dist.get_rank())
        ds_dist.destroy_process_group()
    finally:
        faulthandler.cancel_dump_traceback_later()


def shm_buffer_name(rank: int) -> str:
    """The `/dev/shm` name of the 69 MB buffer DeepSpeed's CPU comm op makes for each rank (as in its shm.cpp)."""
    env = os.environ
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"


def _unlink_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU comm op never removes its buffer; after the barrier every peer has mapped it, so the name
    can go and the memory with it."""
    Path("/dev/shm", shm_buffer_name(rank)).unlink(missing_ok=True)


def share_cpu_cores() -> None:
    """Several CPU ranks on one machine: each gets its share of the cores, unless `OMP_NUM_THREADS` is set.

    torch gives every process a thread per core, so N ranks on C cores would run N x C threads that wait on
    one another at every op: two ranks on two cores fine-tuned 4.6x slower so (docs/PERFORMANCE.md).
    The rank count comes from the `deepspeed` launcher (`LOCAL_SIZE`) or torchrun (`LOCAL_WORLD_SIZE`).
    """
    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if on_gpu() or local < 2 or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // local)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        if os.environ.get("LOCAL_RANK", "0") == "0":
            log.info(f"{local} CPU ranks on {cores} cores: {threads} torch thread(s) each (OMP_NUM_THREADS overrides)")


DIST_TIMEOUT_MIN = 10.0


def init_distributed(timeout_min: float = DIST_TIMEOUT_MIN) -> None:
    """Join the process group (a world of one without a launcher). `timeout_min`: how long a collective waits
    for a missing peer before it fails (the process-group timeout)."""
    if "LOCAL_RANK" in os.environ:  # started by a launcher (deepspeed, torchrun): end with it
        die_with_parent()
        die_with_launch()
    deepspeed = _deepspeed()  # the process group is DeepSpeed's (deepspeed.comm), as the engine expects
    _ensure_dist_env()
    share_cpu_cores()
    if not deepspeed.comm.is_initialized():
        backend = "gloo" if not on_gpu() else "nccl"
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_min))
