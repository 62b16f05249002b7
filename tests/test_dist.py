"""pretrain.runtime.dist: every collective the project runs itself goes through it, on the accelerator's device, at any
world size; a rank's processes die with their parent.

A CPU run cannot show a CPU tensor handed to an NCCL group (gloo takes it), so the class is closed three ways:
no module but pretrain/runtime/dist.py calls a torch.distributed collective (checked on the sources);
pretrain.runtime.dist puts its tensors on the accelerator's device (faked here as `meta`); and every
multi-process test launch runs under tests/strict_collectives, which fails any collective, ours or DeepSpeed's,
whose tensor is off that device.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures_train import ROOT, run_env

from pretrain.runtime import dist

COLLECTIVES = {"all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "barrier"}
COLLECTIVES |= {"reduce_scatter", "reduce_scatter_tensor", "all_to_all_single", "monitored_barrier", "gather"}
PACKAGES = ("data_prep", "pretrain", "finetune", "embed")


def collective_calls(path: Path) -> list[str]:
    """`x.all_reduce(...)`-style calls whose receiver is torch.distributed or an alias of it."""
    tree = ast.parse(path.read_text())
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                full = f"{getattr(node, 'module', '') or ''}.{alias.name}".strip(".")
                if full in ("torch.distributed", "deepspeed.comm"):
                    aliases.add(alias.asname or alias.name)
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.module == "torch.distributed"
                    and alias.name in COLLECTIVES
                ):
                    return [f"{path}: imports {alias.name} from torch.distributed"]
    found = []
    for node in ast.walk(tree):
        call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES
        if call and ast.unparse(node.func.value) in aliases:
            found.append(f"{path}:{node.lineno}: {ast.unparse(node.func)}")
    return found


def test_no_module_but_pretrain_dist_runs_a_collective():
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != ROOT / "pretrain" / "runtime" / "dist.py":
                offenders += collective_calls(path)
    assert not offenders, offenders
    # the scan does see a collective where there is one
    assert collective_calls(ROOT / "pretrain" / "runtime" / "dist.py")


def test_collective_tensors_live_on_the_accelerators_device(monkeypatch):
    seen = []
    monkeypatch.setattr(dist, "initialized", lambda: True)
    monkeypatch.setattr(dist, "device", lambda: torch.device("meta"))
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: seen.append((t.device, t.dtype, op)))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: [0.0] * t.numel())
    dist.all_reduce([1.0, 2.0], op="max")
    dist.barrier()
    assert seen == [
        (torch.device("meta"), torch.float64, torch.distributed.ReduceOp.MAX),
        (torch.device("meta"), torch.float64, torch.distributed.ReduceOp.SUM),
    ]


def test_collectives_without_a_process_group_return_their_input():
    from pretrain.runtime.dist import shutdown

    shutdown()  # the group an earlier test's in-process main(cfg) left for the next run (a one-rank group: no wait)
    assert not dist.initialized() and dist.rank() == 0 and dist.world_size() == 1
    assert dist.all_reduce([1.5, 2.0]) == [1.5, 2.0]


CHECK = """
import os, sys, torch, torch.distributed as d
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
d.init_process_group("gloo", rank=0, world_size=1)
t = torch.ones(2)
d.all_reduce(t)
d.all_reduce(torch.ones(1, device=sys.argv[2]))
"""


@pytest.mark.parametrize("device, fails", [("cpu", False), ("meta", True)])
def test_the_strict_collectives_check_is_live_in_test_launches(tmp_path, device, fails):
    from fixtures_train import free_port

    env = dict(run_env(), BERT_COLLECTIVES_LOG=str(tmp_path / "calls"))
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, str(free_port()), device], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert (proc.returncode != 0) == fails, proc.stderr[-2000:]
    assert ("got a tensor on meta; the accelerator is cpu" in proc.stderr) == fails
    assert len((tmp_path / "calls").read_text().splitlines()) == 1 + (not fails)


def test_a_process_dies_with_its_parent(tmp_path):
    """die_with_parent: the grandchild is killed as soon as its parent is, without any help."""
    code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'from pretrain.runtime.dist import die_with_parent; import time; die_with_parent(); "
        'print("ready", flush=True); '
        "time.sleep(60)'], stdout=sys.stdout)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    child = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "ready"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie is dead; its reaper (init) may not have collected it yet
