"""Named, reusable job definitions (the ``jobs/`` package registers them here)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from backfill.core.errors import InvalidInput, JobNotFound
from backfill.job.spec import JobSpec


@dataclass(frozen=True)
class Definition:
    name: str
    doc: str
    build: Callable[[], JobSpec]

    def spec(self) -> JobSpec:
        spec = self.build()
        if not isinstance(spec, JobSpec):
            raise InvalidInput(f"defined job {self.name!r} did not return a JobSpec")
        return replace(spec, name=self.name, description=spec.description or self.summary)

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""


class Registry:
    """A name -> definition map. Register with ``@registry.job`` on a function returning a spec;
    its docstring is what ``backfill list --defined`` shows."""

    def __init__(self) -> None:
        self._defs: dict[str, Definition] = {}

    def job(
        self, fn: Callable[[], JobSpec] | None = None, *, name: str | None = None
    ) -> Callable[..., JobSpec]:
        def register(f: Callable[[], JobSpec]) -> Callable[[], JobSpec]:
            job_name = name or f.__name__
            if job_name in self._defs:
                raise InvalidInput(f"job {job_name!r} is defined twice")
            self._defs[job_name] = Definition(job_name, inspect.getdoc(f) or "", f)
            return f

        if fn is not None:
            return register(fn)
        return register  # type: ignore[return-value]

    def get(self, name: str) -> Definition:
        try:
            return self._defs[name]
        except KeyError:
            known = ", ".join(sorted(self._defs)) or "none"
            raise JobNotFound(f"no defined job named {name!r} (defined: {known})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._defs

    def __iter__(self) -> Iterator[Definition]:
        return iter(sorted(self._defs.values(), key=lambda d: d.name))


#: The module defined jobs are read from unless told otherwise; only its absence is no error.
DEFAULT_MODULE = "jobs"


def load(module: str = DEFAULT_MODULE) -> Registry:
    """Import ``module`` and return its ``registry`` (an empty one if the default ``jobs`` module
    is absent); raises :class:`InvalidInput` when another module cannot be imported."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module == DEFAULT_MODULE:
            return Registry()  # no jobs/ folder here: no defined jobs
        raise InvalidInput(f"jobs module {module!r} cannot be imported: {exc} (--jobs-module or "
                           "$BACKFILL_JOBS_MODULE names a module on the Python path)") from None
    except Exception as exc:  # the user's module failed while importing
        raise InvalidInput(f"jobs module {module!r} failed to import: "
                           f"{type(exc).__name__}: {exc}") from None
    reg = getattr(mod, "registry", None)
    if not isinstance(reg, Registry):
        raise InvalidInput(f"module {module!r} has no `registry = Registry()`")
    return reg
