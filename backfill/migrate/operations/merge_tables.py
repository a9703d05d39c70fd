"""``merge_tables``: a second table's columns join the first, kept in sync until ``complete``."""

from __future__ import annotations

from psycopg import sql

from backfill.core.errors import InvalidInput
from backfill.migrate.operations.base import Operation, any_changed, object_name, touched
from backfill.migrate.shape import ColumnShape, quote


class MergeTables(Operation):
    """Bring a table's columns into another that shares its key: new nullable columns, a
    trigger mirroring writes to the source, a backfill, then complete drops the source."""

    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        src = self.shape.table(self.text("from"))
        cols = self.names("columns", required=False) or tuple(
            c for c in src.columns if c not in src.primary_key)
        key = src.primary_key
        if not key or t.primary_key != key:
            raise InvalidInput(f"{self.where()}: {t.qualified} and {src.qualified} must have "
                               f"the same primary key columns (they have "
                               f"({', '.join(t.primary_key)}) and ({', '.join(key)}))")
        for c in cols:
            src.column(c)
            if c in t.columns:
                raise InvalidInput(f"{self.where()}: {t.qualified} already has a column {c!r}")
        ids = sql.SQL(", ").join
        self.add("start", f"add {', '.join(cols)} to {t.qualified} (nullable, no rewrite)",
                 "tx", sql.SQL("ALTER TABLE {} {}").format(t.ident, ids(
                     sql.SQL("ADD COLUMN {} {}").format(sql.Identifier(c),
                                                        sql.SQL(src.column(c).type))
                     for c in cols)), lock=self.brief(t))
        self.add("rollback", f"drop {', '.join(cols)} from {t.qualified}", "tx",
                 sql.SQL("ALTER TABLE {} {}").format(t.ident, ids(
                     sql.SQL("DROP COLUMN IF EXISTS {}").format(sql.Identifier(c))
                     for c in cols)), lock=self.brief(t))
        for c in cols:
            t.columns[c] = ColumnShape(c, src.column(c).type, False, None)

        def match(rec: str) -> sql.Composable:
            return sql.SQL(" AND ").join([sql.SQL("{} = {}.{}").format(
                sql.Identifier(k), sql.SQL(rec), sql.Identifier(k)) for k in key])

        # The old version writes the source table, the new one the merged columns of the
        # target (through the version schema's view). Each write is carried to the other side
        # for the columns it changed only (the last write of each column wins), guarded so the
        # other side's trigger does not send it back.
        body = sql.SQL(
            "    IF {syncing} THEN RETURN NULL; END IF;\n"
            "    IF TG_OP = 'DELETE' THEN\n{clear}\n        RETURN NULL;\n    END IF;\n"
            "{set}\n    RETURN NULL;").format(
                syncing=self.syncing(),
                clear=self.guarded(sql.SQL("        UPDATE {t} SET {nulls} WHERE {old};").format(
                    t=t.ident, old=match("OLD"),
                    nulls=ids(sql.SQL("{} = NULL").format(sql.Identifier(c)) for c in cols))),
                set=self.guarded(sql.SQL("        UPDATE {t} AS bf_t SET {set} WHERE {new};").format(
                    t=t.ident, new=sql.SQL(" AND ").join([sql.SQL("bf_t.{k} = NEW.{k}").format(
                        k=sql.Identifier(k)) for k in key]),
                    set=ids(sql.SQL("{c} = CASE WHEN {t} THEN NEW.{c} ELSE bf_t.{c} END").format(
                        c=sql.Identifier(c), t=touched(c)) for c in cols))))
        self.trg = object_name("merge", src.name, t.name)
        self.trigger(src, self.trg, "AFTER", "INSERT OR UPDATE OR DELETE", body)
        every = (*key, *cols)
        self.back = object_name("unmerge", t.name, src.name)
        self.trigger(t, self.back, "AFTER", "INSERT OR UPDATE", sql.SQL(
            "    IF {syncing} OR NOT {new_app} THEN RETURN NULL; END IF;\n"
            "    IF TG_OP = 'UPDATE' AND NOT ({any}) THEN RETURN NULL; END IF;\n"
            "{upsert}\n    RETURN NULL;").format(
                syncing=self.syncing(), new_app=self.from_new(),
                any=any_changed(cols),
                upsert=self.guarded(sql.SQL(
                    "        INSERT INTO {src} AS bf_s ({cols}) VALUES ({vals})\n"
                    "            ON CONFLICT ({key}) DO UPDATE SET {set};").format(
                    src=src.ident, cols=ids(map(sql.Identifier, every)),
                    vals=ids(sql.SQL("NEW.{}").format(sql.Identifier(c)) for c in every),
                    key=ids(map(sql.Identifier, key)),
                    set=ids(sql.SQL("{c} = CASE WHEN {t} THEN EXCLUDED.{c} ELSE bf_s.{c} END")
                            .format(c=sql.Identifier(c), t=touched(c)) for c in cols)))))
        # The new version deletes the merged row; the source row goes first (BEFORE: a foreign
        # key from the source would refuse the target's delete).
        self.back_del = object_name("unmergedel", t.name, src.name)
        self.trigger(t, self.back_del, "BEFORE", "DELETE", sql.SQL(
            "    IF NOT {syncing} AND {new_app} THEN\n{delete}\n    END IF;\n"
            "    RETURN OLD;").format(
                syncing=self.syncing(), new_app=self.from_new(),
                delete=self.guarded(sql.SQL("        DELETE FROM {src} WHERE {m};").format(
                    src=src.ident, m=sql.SQL(" AND ").join(
                        [sql.SQL("{k} = OLD.{k}").format(k=sql.Identifier(k)) for k in key])))))
        self.shape.version(t)
        # A target row inserted after its source row takes the source's values.
        self.pull = object_name("pull", t.name, src.name)
        self.trigger(t, self.pull, "BEFORE", "INSERT", sql.SQL(
            "    IF {none} THEN\n"
            "        SELECT {scols} INTO {ncols} FROM {src} AS s WHERE {match};\n"
            "    END IF;\n    RETURN NEW;").format(
                none=sql.SQL(" AND ").join([sql.SQL("NEW.{} IS NULL").format(sql.Identifier(c))
                                            for c in cols]),
                scols=ids(sql.SQL("s.{}").format(sql.Identifier(c)) for c in cols),
                ncols=ids(sql.SQL("NEW.{}").format(sql.Identifier(c)) for c in cols),
                src=src.ident, match=sql.SQL(" AND ").join([sql.SQL("s.{k} = NEW.{k}").format(
                    k=sql.Identifier(k)) for k in key])))
        src_q = src.ident.as_string(self.conn)
        tgt_q = t.ident.as_string(self.conn)
        where = " AND ".join(f"s.{quote(k)} = {tgt_q}.{quote(k)}" for k in key)
        self.job(t, f"fill {', '.join(cols)} from {src.qualified}", {
            "kind": "update",
            # Identifiers quoted above; the engine runs these as the job's SET expressions.
            # FOR SHARE: the newest committed source value, not the batch snapshot's.
            "set": [[c, f"(SELECT s.{quote(c)} FROM {src_q} AS s WHERE {where} "  # noqa: S608
                        "FOR SHARE)"] for c in cols]})
        on = sql.SQL(" AND ").join([sql.SQL("t.{k} = s.{k}").format(k=sql.Identifier(k))
                                    for k in key])
        row = ids(sql.SQL("{a}.{c}").format(a=sql.Identifier(a), c=sql.Identifier(c))
                  for a in ("s",) for c in cols)
        trow = ids(sql.SQL("t.{c}").format(c=sql.Identifier(c)) for c in cols)
        self.check("start", f"every row of {src.qualified} is in {t.qualified}, with the "
                   "same values", sql.SQL(
                       "SELECT NOT EXISTS (SELECT 1 FROM {s} AS s LEFT JOIN {t} AS t ON {on} "
                       "WHERE t.{k} IS NULL OR ROW({row}) IS DISTINCT FROM ROW({trow}))").format(
                           s=src.ident, t=t.ident, on=on, k=sql.Identifier(key[0]), row=row,
                           trow=trow), duration="scan", table=src.qualified)
        self.add("complete", f"drop triggers {self.trg}, {self.pull}, {self.back} and "
                 f"{self.back_del}, drop table "
                 f"{src.qualified} (one transaction)", "tx",
                 *self.drop_trigger_statements(src, self.trg),
                 *self.drop_trigger_statements(t, self.pull),
                 *self.drop_trigger_statements(t, self.back),
                 *self.drop_trigger_statements(t, self.back_del),
                 sql.SQL("DROP TABLE IF EXISTS {}").format(src.ident),
                 # The new version's writes lock the target, then (its trigger) the source:
                 # take them in that order, or dropping the source's trigger first and then
                 # waiting for the target deadlocks with such a write.
                 lock=f"ACCESS EXCLUSIVE on {t.qualified}, then {src.qualified} (as the new "
                      "version's writes take them; brief, under lock_timeout)",
                 lock_order=tuple((x.schema, x.name, "ACCESS EXCLUSIVE") for x in (t, src)),
                 risk="high")
        self.shape.drop(src)
        self.src = src
        return f"merge {', '.join(cols)} of {src.qualified} into {t.qualified}"

    def irreversible(self) -> str | None:
        return f"table {self.src.qualified} (its columns live on in the merged table)"
