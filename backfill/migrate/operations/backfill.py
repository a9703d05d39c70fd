"""``backfill``: a backfill job of the file's own, run in ``start``."""

from __future__ import annotations

from typing import Any

from backfill.core import sqltext
from backfill.core.errors import InvalidInput
from backfill.migrate.operations.base import Operation


class Backfill(Operation):
    """A data change of its own (transform a format, fill a column): an update job."""

    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        raw = self.get("set", required=True)
        if not isinstance(raw, dict) or not raw or not all(
                isinstance(v, str) and v.strip() for v in raw.values()):
            raise InvalidInput(f"{self.where()}: `set` must be a table of column = "
                               "\"expression\"")
        raw = {sqltext.identifier(c, slot="`set` column"): sqltext.expression(v, slot=f"set.{c}")
               for c, v in raw.items()}
        for c, v in raw.items():
            self.expr(t, v, f"set.{c}", cast_to=t.column(c).type)
        where = self.expression("where")
        if where:
            self.expr(t, where, "where", boolean=True)
        spec: dict[str, Any] = {"kind": "update", "set": [[c, v] for c, v in raw.items()]}
        if where:
            spec["where"] = where
        self.job(t, f"set {', '.join(raw)}", spec, undo_log=True)
        self.warnings.append("a backfill writes rows in place: rollback does not restore "
                             "the old values; its undo log (kept after complete and "
                             "rollback, unless undo_log = false) lets `backfill revert JOB` "
                             "restore them")
        return f"backfill {t.qualified}: set {', '.join(raw)}" + (f" where {where}" if where
                                                                   else "")
