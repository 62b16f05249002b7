"""`bert-prep` flags come from the subcommands' config dataclasses: same defaults, names kept, help from docstrings."""

from __future__ import annotations

import dataclasses

import pytest

from common import flags
from data_prep import cli
from data_prep.build import BuildConfig
from data_prep.corpus import CorpusConfig
from data_prep.inspect import InspectConfig
from data_prep.vocab import VocabConfig

REQUIRED = {
    "build": (BuildConfig, ["--input", "a.txt", "b/", "--tokenizer", "tok", "--output", "out/d"]),
    "vocab": (VocabConfig, ["--input", "a.txt", "--vocab-size", "100", "--output", "tok"]),
    "corpus": (CorpusConfig, ["--output", "c.txt"]),
    "inspect": (InspectConfig, ["data/d"]),
}


def parse(command: str, *argv: str):
    cls, required = REQUIRED[command]
    return flags.from_args(cls, cli.parser().parse_args([command, *required, *argv]))


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_defaults_are_the_dataclass_defaults_and_help_is_the_docstrings(command, capsys):
    cls, _ = REQUIRED[command]
    cfg = parse(command)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory
        if default is not dataclasses.MISSING:
            assert getattr(cfg, f.name) == (default() if callable(default) else default), f.name
    with pytest.raises(SystemExit):
        cli.parser().parse_args([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name, doc in flags.field_docs(cls).items():
        assert doc[:40] in out, (name, doc)


def test_kept_flag_names_and_aliases():
    cfg = parse("build", "--jsonl-key", "body", "--no-split-sentences", "--no-ascii-fast-path", "--no-progress")
    assert (cfg.text_key, cfg.split_sentences, cfg.ascii_fast_path, cfg.progress) == ("body", False, False, False)
    assert parse("build", "--text-key", "content").text_key == "content"
    cfg = parse("build", "--chunk-mb", "0.5", "--format", "parquet", "--doc-boundary", "file", "--shards", "4")
    assert (cfg.chunk_mb, cfg.format, cfg.doc_boundary, cfg.shards) == (0.5, "parquet", "file", 4)
    assert parse("build", "--special-tokens", "cls=<s>", "sep=</s>").special_tokens == ["cls=<s>", "sep=</s>"]
    assert parse("build").input == ["a.txt", "b/"] and parse("build").format is None
    assert parse("vocab", "--jsonl-key", "body", "--cased").text_key == "body"
    assert parse("inspect", "--verify", "--show", "3").prefix == "data/d"
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["build", *REQUIRED["build"][1], "--format", "csv"])
