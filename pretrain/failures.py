"""What went wrong in a launch, read from one line of its output (pretrain.launcher watches every line).

`parse_failure` names the node and the cause of a failure line (a rank's non-zero exit, a node's launcher or
ssh connection that ended, a traceback's last line, an `error:` line), ranked by how surely it is a first cause
rather than an echo of one: a rank or launcher killed by a signal > a lost ssh connection > an error line or
traceback > a peer's connection error > an exit code; `describe` names the surest first cause among those seen,
then the other nodes that failed.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass


@dataclass
class Failure:
    """One sign that a node failed, read from the launch's output."""

    node: str
    cause: str
    rank: int  # how surely this is a first cause rather than an echo of one: lower is surer


_SIGNALS = {s.value: s.name for s in signal.Signals}


_PEER_ECHO = re.compile(r"connection (reset|closed) by peer|timed out|timeout|broken pipe|remote process", re.I)


def parse_failure(line: str, hosts: list[str], default_node: str) -> Failure | None:
    """The failure a line of the launch's output reports, if any (pdsh prefixes remote lines with `host: `)."""
    m = re.match(r"^pdsh@[^:]+: (\S+): ssh exited with exit code (\d+)", line)
    if m:
        code = int(m.group(2))
        if code == 255:
            return Failure(m.group(1), "its launcher was killed or the ssh connection to the node was lost", 1)
        if code > 128:
            return Failure(m.group(1), f"its launcher was killed by {_SIGNALS.get(code - 128, code - 128)}", 0)
        return Failure(m.group(1), f"its launcher exited with code {code}", 4)
    m = re.match(r"^pdsh@[^:]+: (\S+): ssh killed by signal (\d+)", line)
    if m:
        return Failure(m.group(1), f"its ssh connection was killed by {_SIGNALS.get(int(m.group(2)), m.group(2))}", 0)
    node, text = default_node, line
    m = re.match(r"^(\S+): (.*)$", line)
    if m and m.group(1) in hosts:
        node, text = m.group(1), m.group(2)
    text = re.sub(r"^\[rank\d+\]:\s*", "", text)
    m = re.search(r"exits with return code = (-?\d+)", text)
    if m:
        code = int(m.group(1))
        if code < 0:
            return Failure(node, f"a rank was killed by {_SIGNALS.get(-code, -code)}", 0)
        return Failure(node, f"a rank exited with code {code}", 4)
    if text.startswith("error: "):
        return Failure(node, text, 2)
    m = re.match(r"^([A-Za-z_.]*(?:Error|Exception)): (.*)$", text)
    if m:
        return Failure(node, f"{m.group(1)}: {m.group(2)[:300]}", 3 if _PEER_ECHO.search(text) else 2)
    return None


def describe(failures: list[Failure]) -> str:
    """'node X: cause' of the surest first cause, then the other nodes that failed."""
    first = min(failures, key=lambda f: f.rank)  # stable: among equals, the earliest
    others = []
    for f in failures:
        if f.node != first.node and f.node not in others:
            others.append(f.node)
    tail = f"; then on {', '.join(others)}, as a consequence" if others else ""
    return f"node {first.node}: {first.cause}{tail}"
