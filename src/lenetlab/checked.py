"""Records read back from files, checked against their dataclasses' field types.

A run folder may come from someone else, checksums and all, so what from_dict built is
checked field by field before anything uses it: a wrong type becomes one TypeError naming
the field (the readers turn it into their one-line error), never a crash three modules later.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from functools import cache
from pathlib import PurePosixPath


@cache
def _hints(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def check(value: object, hint: typing.Any, where: str) -> None:
    """TypeError naming where unless value is of type hint (dataclasses checked field by field)."""
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                check(value, option, where)
                return
            except TypeError:
                continue
        raise TypeError(f"{where}: unexpected {type(value).__name__} {_show(value)}")
    if hint is type(None):
        if value is not None:
            raise TypeError(f"{where}: expected nothing (null), got {_show(value)}")
        return
    if origin is None and dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise TypeError(f"{where}: expected a {hint.__name__} record, got {type(value).__name__}")
        for name, field_hint in _hints(hint).items():
            check(getattr(value, name), field_hint, f"{where}.{name}")
        return
    base = origin or hint
    if base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, base)
    if not ok:
        raise TypeError(f"{where}: expected {getattr(base, '__name__', base)}, got {type(value).__name__} "
                        f"{_show(value)}")
    args = typing.get_args(hint)
    if base is list and args:
        for index, item in enumerate(value):
            check(item, args[0], f"{where}[{index}]")
    elif base is tuple and args:
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise TypeError(f"{where}: expected {len(items)} items, got {len(value)}")
        for index, (item_hint, item) in enumerate(zip(items, value)):
            check(item, item_hint, f"{where}[{index}]")
    elif base is dict and args:
        for key, item in value.items():
            check(key, args[0], f"{where} key")
            check(item, args[1], f"{where}[{key!r}]")


def checked(record: typing.Any, where: str = "") -> typing.Any:
    """record itself, once check() found every field of the type its dataclass declares."""
    check(record, type(record), where or type(record).__name__)
    return record


def require(condition: bool, message: str) -> None:
    """ValueError(message) unless condition: a record whose values do not fit together."""
    if not condition:
        raise ValueError(message)


def is_folder_name(name: object) -> bool:
    """A single printable folder name: no separators or control characters, not '.' or '..'."""
    return (isinstance(name, str) and bool(name) and PurePosixPath(name).name == name
            and name not in (".", "..") and name.isprintable())


def is_name(name: object) -> bool:
    """A name to show: text of one printable line (a configuration's, which may hold '/')."""
    return isinstance(name, str) and bool(name) and name.isprintable()


def is_inside(relative: object) -> bool:
    """A relative path (as a run folder records its files) that stays inside its folder."""
    if not isinstance(relative, str) or not relative or not relative.isprintable():
        return False
    path = PurePosixPath(relative)
    return not path.is_absolute() and ".." not in path.parts
