"""Command-line flags derived from config dataclasses: one declaration per setting (docs/STYLE.md, habit 11).

A field's type, default and docstring are its flag's type, default and `--help`. `option(...)` in a field
declaration adds only what a dataclass cannot say: another flag name or aliases, a metavar, choices,
`positional`, `hidden`, `cli=False` (not a flag), and `group` ("shape", ...), a property of the
field that code asks for with `fields_in`.

    @dataclass
    class RunConfig:
        save: str = option(aliases=("--out",))
        \"\"\"Checkpoint directory.\"\"\"
        steps: int = 1000
        \"\"\"Optimizer steps.\"\"\"

    parser = argparse.ArgumentParser()
    add_arguments(parser, RunConfig)
    cfg = from_args(RunConfig, parser.parse_args(argv))

Types: `bool` is a switch (`--x` when the default is False; `--no-x`, storing False, when it is True);
`int`, `float`, `str` a typed value; `X | None` a value whose absence is None; `list[X]` one or more values
(`action="append"` for a repeatable flag instead); `Literal[...]` its values as choices; a nested dataclass
adds its own flags (flattened: every field name is unique within one command) under a heading that is the
nested field's docstring. A field without a default is a required flag.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Literal

from common.errors import UserError

_KEY = "flags"


def option(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
    choices: typing.Sequence | None = None,
    action: str | None = None,
    positional: bool = False,
    hidden: bool = False,
    cli: bool = True,
    group: str | None = None,
) -> Any:
    """A dataclass field with command-line details beyond its type, default and docstring."""
    meta = dict(flag=flag, aliases=tuple(aliases), metavar=metavar, choices=choices, action=action)
    meta.update(positional=positional, hidden=hidden, cli=cli, group=group)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_KEY: meta})


def _meta(f: dataclasses.Field) -> dict:
    return f.metadata.get(_KEY, {})


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string right below it), read once from the source of `cls` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (frozen app): flags without help text
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(type without None, whether None is allowed) for `X | None` / `Optional[X]`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def flag_name(f: dataclasses.Field) -> str:
    """The flag a field is given: `--name-with-dashes` (`--no-...` for a switch that defaults to on)."""
    meta = _meta(f)
    if meta.get("flag"):
        return meta["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def _walk(cls: type):
    """(field, type) of every flag of `cls`, nested dataclasses flattened; a field with cli=False is skipped."""
    for f in dataclasses.fields(cls):
        if _meta(f).get("cli") is False:
            continue
        yield f, _hints(cls)[f.name]


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    exclude=(),
    extra: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Add a flag for every field of `cls` (see the module docstring); fields named in `exclude` are left out.
    `extra`: field name -> `add_argument` keywords that replace those the field gives (choices or help that only
    a layer above the config knows, e.g. the fine-tuning task kinds' metrics)."""
    docs = field_docs(cls)
    for f, tp in _walk(cls):
        if f.name in exclude:
            continue
        if dataclasses.is_dataclass(tp):
            target = parser.add_argument_group(docs.get(f.name, tp.__name__).split(":")[0].rstrip("."))
            add_arguments(target, tp, exclude, extra)
            continue
        _add_one(parser, f, tp, docs.get(f.name, ""), (extra or {}).get(f.name, {}))


def _add_one(parser, f: dataclasses.Field, tp: Any, doc: str, extra: dict[str, Any]) -> None:
    meta, default = _meta(f), _default(f)
    inner, optional = _unwrap(tp)
    kwargs: dict[str, Any] = {}
    if meta.get("hidden"):
        kwargs["help"] = argparse.SUPPRESS
    else:
        silent = any(default is x for x in (None, False, True, dataclasses.MISSING)) or default == []
        shown = "" if silent else f" (default: {default})"
        kwargs["help"] = (doc + shown).replace("%", "%%")
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    if inner is bool:
        kwargs["action"] = "store_false" if default is True else "store_true"
    else:
        origin = typing.get_origin(inner)
        if origin is list:
            inner = typing.get_args(inner)[0]
            if meta.get("action"):
                kwargs["action"] = meta["action"]
            else:
                kwargs["nargs"] = "+"
        if typing.get_origin(inner) is Literal:
            kwargs["choices"] = list(typing.get_args(inner))
            inner = type(kwargs["choices"][0])
        kwargs["type"] = inner
        if meta.get("choices") is not None:
            kwargs["choices"] = list(meta["choices"])
    if meta.get("positional"):
        if default is not dataclasses.MISSING:
            kwargs.update(nargs="?", default=default)
        parser.add_argument(f.name, **{**kwargs, **extra})
        return
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    parser.add_argument(flag_name(f), *meta.get("aliases", ()), dest=f.name, **{**kwargs, **extra})


def add_command(subparsers, name: str, cls: type, run) -> argparse.ArgumentParser:
    """A subcommand whose flags are `cls`'s fields and which calls `run(config)` (an exit code or None); its
    one-line help is the first line of `cls`'s docstring, its description the paragraph after it."""
    doc = inspect.cleandoc(cls.__doc__ or "").split("\n\n")
    description = " ".join(doc[1].split()) if len(doc) > 1 else None
    summary = doc[0].rstrip(".")
    p = subparsers.add_parser(name, help=summary[:1].lower() + summary[1:], description=description)
    add_arguments(p, cls)
    p.set_defaults(func=lambda args: run(from_args(cls, args)))
    return p


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of `cls` from parsed flags (nested dataclasses too); `overrides` win over the flags."""
    values = {}
    for f, tp in _walk(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif dataclasses.is_dataclass(tp):
            values[f.name] = from_args(tp, args)
        elif hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = list(value) if isinstance(value, list | tuple) else value
    return cls(**values)


def fields_in(cls: type, group: str) -> tuple[str, ...]:
    """Names of the fields of `cls` declared with `option(group=group)`."""
    return tuple(f.name for f in dataclasses.fields(cls) if _meta(f).get("group") == group)


def parse_value(cls: type, name: str, text: str) -> Any:
    """`text` converted to field `name`'s type (booleans: true/false); ValueError when it does not fit."""
    if name not in {f.name for f in dataclasses.fields(cls)}:
        raise ValueError(f"no field {name}")
    inner, optional = _unwrap(_hints(cls)[name])
    if optional and text.lower() in ("none", "null"):
        return None
    if inner is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{name} takes true or false")
        return text.lower() == "true"
    if typing.get_origin(inner) is Literal:
        choices = typing.get_args(inner)
        if text not in choices:
            raise ValueError(f"{name} takes one of {', '.join(map(str, choices))}")
        return text
    return inner(text)


def accept_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--local_rank=N` the `deepspeed` launcher appends to every rank's command line (read from the
    environment instead: LOCAL_RANK)."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def typed_fields(cfg) -> typing.Iterator[tuple[dataclasses.Field, Any]]:
    """(field, type hint) of a config instance's fields, those of nested dataclasses flattened."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            yield from typed_fields(getattr(cfg, f.name))
        else:
            yield f, hints[f.name]


def file_keys(cfg) -> dict[str, str]:
    """Config-file key -> field of `cfg` (nested ones flattened): every field's name, and its flag's name with
    underscores where the flag is named otherwise (`--data` -> prefixes, `--time-budget-hours` -> time_budget)."""
    keys = {f.name: f.name for f, _ in typed_fields(cfg)}
    for f, _ in typed_fields(cfg):
        alias = flag_name(f).lstrip("-").replace("-", "_")
        if not alias.startswith("no_"):  # --no-x stores False: its name would invert the value
            keys.setdefault(alias, f.name)
    return keys


def checked_value(hint: Any, value: Any, key: str, where: str) -> Any:
    """A config-file value as its field's type (`hint`) takes it (a single value for a list field becomes a list of
    one; an int for a float field a float), or a one-line error naming the field and the type."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [checked_value(args[0], item, key, where) for item in items]
    if origin is typing.Literal:
        ok, want = value in args, " or ".join(map(str, args))
    elif hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif hint in (int, float, str, bool, dict):
        ok, want = isinstance(value, hint) and not (hint is int and isinstance(value, bool)), hint.__name__
    else:
        return value
    if not ok:
        raise UserError(f"{where}: {key} takes {want}, not {value!r}")
    return value
