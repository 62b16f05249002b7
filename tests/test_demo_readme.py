"""The README's commands are real, and so are the guides' in docs/.

The README is the front door: every command in it is run by the demo or a test, and `RUN_BY` below is that
list (command -> the script or test that runs it, and what that file must contain); a README command missing
from the list, or a runner that no longer contains it, fails. Every command line of the README and of the
guides in docs/ (not PERFORMANCE.md, a log of past runs) parses with the tool's own parser, so the docs
cannot drift from the flags the tools accept, and every ds_configs/ or scripts/ file they name exists.
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
    """`python -m MODULE ...`, `scripts/launch_multinode.sh HOSTFILE <training flags>` and `sbatch [its options]
    scripts/slurm/NAME.sbatch <flags of the command it runs>`."""
    return words[:2] == ["python", "-m"] or words[0].endswith("launch_multinode.sh") or words[0] == "sbatch"


# README command (its first words) -> (file that runs it, text that file must contain to run it).
RUN_BY = {
    "bash scripts/demo.sh": ("tests/test_demo.py", '"bash", "scripts/demo.sh"'),
    "bash scripts/test.sh": (".ci/run", "bash scripts/test.sh"),
    "bash scripts/setup.sh": ("scripts/demo.sh", "bash scripts/setup.sh"),
    "bert-prep vocab": ("scripts/demo.sh", "bert-prep vocab --input"),
    "bert-prep build": ("scripts/demo.sh", "bert-prep build --input"),
    "scripts/launch_multinode.sh": ("tests/test_multinode.py", "launch_multinode.sh"),
    "sbatch": ("tests/test_slurm.py", '"sbatch", "--parsable"'),
    "bert-export": ("scripts/demo.sh", "bert-export "),
    "bert-finetune": ("scripts/demo.sh", "--module finetune.run --task classify"),
}
GUIDES = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "PERFORMANCE.md")


def command_lines(path: Path) -> list[list[str]]:
    """Every command line (continuations joined, comments and VAR=value prefixes dropped) of the bash blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        block = re.sub(r"\\\n\s*", " ", block)
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            inner = re.search(r"\$\((.*)\)", line)  # jid=$(sbatch ...): the command inside
            line = inner.group(1) if inner else line
            words = shlex.split(line) if line and not line.startswith("#") else []
            while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
                words = words[1:]
            if words:
                commands.append(words)
    return commands


def tool_commands(paths: list[Path]) -> list[list[str]]:
    """The command lines that run one of our tools (console scripts, deepspeed, python -m, the launcher)."""
    return [
        w for path in paths for w in command_lines(path) if w[0] in ENTRY_POINTS or w[0] == "deepspeed" or is_wrapper(w)
    ]


def readme_commands() -> list[list[str]]:
    return tool_commands([ROOT / "README.md", *GUIDES])


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
    elif words[0] == "sbatch":
        script = next(w for w in words if w.endswith(".sbatch"))
        assert (ROOT / script).is_file(), f"{script} does not exist"
        module = {"pretrain.sbatch": "pretrain.train", "finetune.sbatch": "finetune.run"}[Path(script).name]
        entry, argv = (module, "cli"), [module, *words[words.index(script) + 1 :]]
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


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150, "move detail to docs/, keep the README short"


@pytest.mark.parametrize("words", command_lines(ROOT / "README.md"), ids=lambda w: " ".join(w)[:60])
def test_every_readme_command_is_run_by_the_demo_or_a_test(words):
    line = " ".join(words)
    prefix = next((p for p in RUN_BY if line.startswith(p)), None)
    assert prefix, f"README command {line!r} is run by nothing: run it in the demo or a test and list it in RUN_BY"
    runner, text = RUN_BY[prefix]
    assert text in (ROOT / runner).read_text(), f"{runner} no longer runs {prefix!r} (it has no {text!r})"


def test_every_run_by_entry_is_in_the_readme():
    lines = [" ".join(w) for w in command_lines(ROOT / "README.md")]
    assert [p for p in RUN_BY if not any(line.startswith(p) for line in lines)] == []


@pytest.mark.parametrize("words", readme_commands(), ids=lambda w: " ".join(w)[:80])
def test_readme_command_parses(words, monkeypatch):
    parse(words, monkeypatch)
    for word in words:
        if word.startswith(("ds_configs/", "scripts/")):
            assert (ROOT / word).is_file(), f"the docs name {word}, which does not exist"


def test_the_docs_show_every_tool():
    used = {w[0] for w in readme_commands()}
    assert {"bert-prep", "bert-bench", "bert-export", "bert-report", "bert-finetune", "bert-glue", "deepspeed"} <= used


def test_every_docs_page_is_linked_from_the_readme():
    linked = set(re.findall(r"\]\(([\w/.]+\.md)\)", (ROOT / "README.md").read_text()))
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} - linked == set()


def test_every_readme_link_resolves():
    linked = set(re.findall(r"\]\(([\w/.]+\.md)", (ROOT / "README.md").read_text()))
    assert {name for name in linked if not (ROOT / name).is_file()} == set()
