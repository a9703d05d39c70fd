"""Option values without pydantic, where typer's coercion of them is the identity.

Typer (from 0.2x) coerces every option value through a pydantic ``TypeAdapter`` built on first
use: importing pydantic and building the adapters costs about 50 ms of CPU in every process,
a quarter of ``backfill db upgrade``'s own work (fixed costs, issue 16). For the values our
commands read, that coercion changes nothing: a ``str`` option given a ``str`` (argv, an
environment variable, a default), a flag given a ``bool``, a ``list[str]`` given strings,
an option with its own ``parser`` (which then does all the work). Those are passed through
here; any other value or type (an ``int`` with bounds, a ``Path``, a flag read from the
environment) goes to typer's own coercion, built on demand, so errors read exactly as before.

With a typer that has no such coercion (older ones use click's types), nothing is changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def install() -> None:
    try:
        from typer import core as typer_core
        from typer._coercion import RuntimeParam, TypeDescriptor
    except ImportError:
        return
    found = getattr(typer_core, "build_runtime_param", None)
    if found is None or getattr(found, "_backfill_plain", False):
        return
    typers_own: Callable[[Any], Any] = found

    @dataclass(frozen=True)
    class Plain(RuntimeParam):
        """``kind``: str, bool, list (of str) or parser; else typer's own (``descriptor``)."""

        kind: str
        descriptor: TypeDescriptor

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if self.kind == "str" and type(value) is str:
                return value
            if self.kind == "bool" and type(value) is bool:
                return value
            if (self.kind == "list" and isinstance(value, list | tuple)
                    and all(type(v) is str for v in value)):
                return list(value)
            if self.kind == "parser":
                parser = self.parameter_info.parser
                assert parser is not None
                try:
                    return parser(value)
                except (ValueError, AssertionError):
                    pass  # typer's own reports it, worded as it words it
            return typers_own(self.descriptor)._coerce_value(value, param=param, ctx=ctx)

    def build(descriptor: TypeDescriptor) -> Any:
        kind = _plain_kind(descriptor)
        if kind is None:
            return typers_own(descriptor)
        return Plain(parameter_info=descriptor.parameter_info, annotation=descriptor.annotation,
                     kind=kind, descriptor=descriptor)

    build._backfill_plain = True  # type: ignore[attr-defined]
    build._typers_own = typers_own  # type: ignore[attr-defined]  # the tests compare the two
    setattr(typer_core, "build_runtime_param", build)  # noqa: B010  (typer's name, looked up at use)


def _plain_kind(d: Any) -> str | None:
    """Which plain coercion a parameter takes, or None for typer's own."""
    try:
        if d.is_file or d.is_path or d.is_choice or d.is_ranged or d.is_datetime:
            return None
    except AttributeError:  # a descriptor this module does not know
        return None
    if d.parameter_info.parser is not None:
        return None if d.is_list or d.is_tuple else "parser"
    if d.annotation is str:
        return "str"
    if d.annotation is bool:
        return "bool"
    if d.annotation == list[str]:
        return "list"
    return None
