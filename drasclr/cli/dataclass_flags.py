"""Command-line flags generated from a config dataclass, so the flags and the fields never drift.

Each field becomes one typed flag: ``lr: float`` -> ``--lr 0.01`` (a float), ``out_dir: str``
-> ``--out-dir 2024`` (still the string ``"2024"``), ``amp: bool`` -> ``--amp`` / ``--no-amp``,
``max_steps: int | None`` -> ``--max-steps 100`` or ``--max-steps none``, a
``tuple[float, float]`` -> two values. A field whose metadata has ``choices`` (or whose type is a
``Literal``) becomes a validated choice. Fields of a nested dataclass are spelled
``--parent.field`` (``--augment.noise-std 0.02``). The help text is the field's
``metadata["help"]`` with its default.

Only the flags given on the command line are collected (the others keep the value of the config
file or the dataclass default): see `flag_overrides`.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable

#: prefix of the argparse destinations of generated flags, to tell them from the command's own
DEST_PREFIX = "config:"
_NONE_WORDS = ("none", "null")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one flag per field of the dataclass ``cls`` (recursing into nested dataclasses)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        hint, optional = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(hint):
            add_dataclass_flags(parser, hint, prefix=path + ".")
            continue
        help_text = f.metadata.get("help")
        if not help_text:
            raise TypeError(f"{cls.__name__}.{f.name}: no metadata['help'] to show as its flag's help")
        flag = "--" + path.replace("_", "-")
        options: dict[str, Any] = {"dest": DEST_PREFIX + path, "default": argparse.SUPPRESS,
                                   "help": f"{help_text} (default: {_default_text(f)})"}
        choices = f.metadata.get("choices")
        if typing.get_origin(hint) is typing.Literal:
            choices = typing.get_args(hint)
            hint = type(choices[0])
        if hint is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            item_types = typing.get_args(hint)
            options.update(nargs=len(item_types), metavar=tuple(t.__name__.upper() for t in item_types),
                           type=_parser_of(item_types[0], optional=False))
        elif hint in (int, float, str):
            options["type"] = _parser_of(hint, optional)
            if choices is not None:
                options["choices"] = choices
            else:
                options["metavar"] = hint.__name__.upper() + ("|none" if optional and hint is not str else "")
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {hint!r}")
        parser.add_argument(flag, **options)


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The values of the generated flags given on the command line, nested as the dataclass
    (``{"lr": 0.1, "augment": {"noise_std": 0.02}}``)."""
    overrides: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith(DEST_PREFIX):
            continue
        *parents, name = dest[len(DEST_PREFIX):].split(".")
        target = overrides
        for parent in parents:
            target = target.setdefault(parent, {})
        target[name] = list(value) if isinstance(value, tuple) else value
    return overrides


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of ``X``, ``X | None`` or ``Optional[X]``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _parser_of(kind: type, optional: bool) -> Callable[[str], Any]:
    """Parse a flag's text as ``kind``; ``none`` means None for an optional number."""
    def parse(text: str) -> Any:
        if optional and kind is not str and text.lower() in _NONE_WORDS:
            return None
        return kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value: 'x'"
    return parse


def _default_text(f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return "none" if default is None else str(default)
