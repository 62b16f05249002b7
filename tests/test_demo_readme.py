"""README commands are real: every command line in its bash blocks parses with the tool's own parser.

The demo runs the main flow end to end (tests/test_demo.py runs a short version); this test keeps the
rest of the README (corpus preparation, phase-1/2 recipes, multi-node launch, benchmark, export) from
drifting away from the flags the tools accept, and checks that every file it names exists in the repo.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {
    name: (module, func)
    for name, module, func in re.findall(r'"(bert-[a-z]+)=([\w.]+):(\w+)"', (ROOT / "setup.py").read_text())
}


class Parsed(Exception):
    """Raised instead of running the command once its arguments parsed."""


def is_wrapper(words: list[str]) -> bool:
    """`python -m MODULE ...` and `scripts/launch_multinode.sh HOSTFILE <training flags>`."""
    return words[:2] == ["python", "-m"] or words[0].endswith("launch_multinode.sh")


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = re.sub(r"\\\n\s*", " ", block)
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            words = shlex.split(line) if line else []
            while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
                words = words[1:]
            if words and (words[0] in ENTRY_POINTS or words[0] == "deepspeed" or is_wrapper(words)):
                commands.append(words)
    return commands


def parse(words: list[str], monkeypatch) -> argparse.Namespace:
    """Parse `words` with the parser of the command it names; does not run the command."""
    if words[0] == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        launcher = parse_args(words[1:])
        if launcher.module:
            module = launcher.user_script
        else:
            script = Path(launcher.user_script)
            assert (ROOT / script).is_file(), f"{script} does not exist"
            module = ".".join(script.with_suffix("").parts)
        entry = next((ep for ep in ENTRY_POINTS.values() if ep[0] == module), (module, "main"))
        argv = [module, *launcher.user_args]
    elif words[0].endswith("launch_multinode.sh"):
        assert (ROOT / words[0]).is_file(), f"{words[0]} does not exist"
        from pretrain.launcher import parse_args as launcher_args

        _, training = launcher_args(words[1:])  # its own flags, then the training flags for bert-pretrain
        entry, argv = ("pretrain.train", "cli"), ["pretrain.train", *training]
    elif words[:2] == ["python", "-m"]:
        module = importlib.import_module(words[2])
        name = next(n for n in ("cli", "main", "_main") if hasattr(module, n))
        entry, argv = (words[2], name), words[2:]
    else:
        entry = ENTRY_POINTS[words[0]]
        argv = words

    def stop(self, args=None, namespace=None):
        ns = original(self, args, namespace)
        raise Parsed(ns)

    original = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    monkeypatch.setattr(sys, "argv", argv)
    console_entry = getattr(importlib.import_module(entry[0]), entry[1])  # reads sys.argv, like the installed script
    with pytest.raises(Parsed) as parsed:
        console_entry()
    return parsed.value.args[0]


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == [
        "bash scripts/demo.sh",
        "bash scripts/test.sh",
    ]


@pytest.mark.parametrize("words", readme_commands(), ids=lambda w: " ".join(w)[:80])
def test_readme_command_parses(words, monkeypatch):
    parse(words, monkeypatch)
    for word in words:
        if word.startswith(("ds_configs/", "scripts/")):
            assert (ROOT / word).is_file(), f"README names {word}, which does not exist"


def test_readme_shows_every_tool():
    used = {w[0] if w[0] != "deepspeed" else "deepspeed" for w in readme_commands()}
    assert {"bert-prep", "bert-bench", "bert-export", "bert-report", "deepspeed"} <= used
