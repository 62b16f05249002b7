"""common.flags: a config dataclass field is its flag; common.log: one output setup, rank 0 by default."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from common import flags, log
from common.flags import option


@dataclass
class Inner:
    """Nested settings."""

    files: list[str] = option(flag="--input", metavar="PATH")
    """Input files (or globs), 100% of them."""
    rate: float = 0.5
    """A rate."""


@dataclass(kw_only=True)
class Base:
    name: str = "base"
    """The name."""


@dataclass(kw_only=True)
class Outer(Base):
    """A command."""

    out: str = option(aliases=("--output",))
    """Where to write."""
    inner: Inner
    """Inner group: nested settings."""
    steps: int = 10
    """How many steps."""
    limit: int | None = None
    """An optional limit."""
    mode: Literal["a", "b"] = "a"
    """The mode."""
    verbose: bool = False
    """Say more."""
    split: bool = True
    """Split things."""
    sets: list[str] = option(default_factory=list, action="append", metavar="K=V")
    """Repeatable overrides."""
    shape: int = option(3, group="shape")
    """A shape field."""
    internal: int = option(7, cli=False)
    """Not a flag."""
    where: str = option("x", positional=True)
    """A positional argument."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo")
    flags.add_arguments(p, Outer)
    return p


def test_every_field_is_its_flag_with_type_default_and_help():
    args = parser().parse_args(["--out", "o", "--input", "a", "b"])
    cfg = flags.from_args(Outer, args)
    assert cfg == Outer(out="o", inner=Inner(["a", "b"]))
    assert cfg.where == "x" and cfg.internal == 7 and cfg.name == "base"
    full = [
        "y",
        "--output",
        "o",
        "--input",
        "a",
        "--rate",
        "0.25",
        "--steps",
        "3",
        "--limit",
        "9",
        "--mode",
        "b",
        "--verbose",
        "--no-split",
        "--sets",
        "k=1",
        "--sets",
        "j=2",
        "--name",
        "n",
        "--shape",
        "4",
    ]
    cfg = flags.from_args(Outer, parser().parse_args(full))
    assert cfg == Outer(
        name="n",
        out="o",
        inner=Inner(["a"], 0.25),
        steps=3,
        limit=9,
        mode="b",
        verbose=True,
        split=False,
        sets=["k=1", "j=2"],
        shape=4,
        where="y",
    )
    help_text = " ".join(parser().format_help().split())
    assert "--steps STEPS How many steps. (default: 10)" in help_text
    assert "--no-split Split things." in help_text and "--verbose Say more." in help_text
    assert "100% of them" in help_text and "Inner group:" in help_text and "--input PATH [PATH ...]" in help_text
    assert "--internal" not in help_text and "{a,b}" in help_text


@pytest.mark.parametrize(
    "argv",
    [[], ["--out", "o"], ["--out", "o", "--input", "a", "--mode", "c"], ["--out", "o", "--input", "a", "--steps", "x"]],
)
def test_bad_flags_are_refused(argv):
    with pytest.raises(SystemExit):
        parser().parse_args(argv)


def test_groups_and_typed_values():
    assert flags.fields_in(Outer, "shape") == ("shape",)
    assert flags.parse_value(Outer, "steps", "5") == 5
    assert flags.parse_value(Outer, "verbose", "true") is True
    assert flags.parse_value(Outer, "limit", "none") is None
    for name, text in (("verbose", "yes"), ("steps", "x"), ("mode", "c"), ("nope", "1")):
        with pytest.raises(ValueError):
            flags.parse_value(Outer, name, text)
    assert flags.field_docs(Outer)["steps"] == "How many steps." and flags.field_docs(Outer)["name"] == "The name."


def test_log_goes_to_the_current_stdout_from_rank_0_only(capsys, monkeypatch):
    logger = log.get_logger("tests.flags")
    monkeypatch.delenv("RANK", raising=False)
    logger.info("hello %s", "there")
    monkeypatch.setenv("RANK", "1")
    logger.info("from rank one")
    assert not log.is_rank0()
    monkeypatch.setenv("BERT_LOG_RANKS", "all")
    logger.info("every rank")
    assert capsys.readouterr().out.splitlines() == ["hello there", "[rank 1] every rank"]


def test_field_without_help_source_still_parses():
    cls = dataclass(type("Made", (), {"__annotations__": {"x": int}, "x": field(default=1)}))
    p = argparse.ArgumentParser()
    flags.add_arguments(p, cls)
    assert flags.from_args(cls, p.parse_args(["--x", "2"])).x == 2


def test_a_subcommand_takes_its_flags_help_and_description_from_its_config():
    @dataclass
    class Job:
        """Do the job (quickly).

        The long description of
        the job.
        """

        size: int = 3
        """How big."""

    parser = argparse.ArgumentParser(prog="tool")
    flags.add_command(parser.add_subparsers(dest="command"), "job", Job, lambda cfg: cfg.size * 2)
    args = parser.parse_args(["job", "--size", "5"])
    assert args.func(args) == 10
    assert "do the job (quickly)" in parser.format_help()
    sub = parser._subparsers._group_actions[0].choices["job"]
    assert sub.description == "The long description of the job." and "How big. (default: 3)" in sub.format_help()
