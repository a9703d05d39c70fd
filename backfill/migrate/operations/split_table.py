"""``split_table``: columns move to a new table, kept in sync with the old one until ``complete``."""

from __future__ import annotations

from psycopg import sql

from backfill.core.errors import InvalidInput
from backfill.migrate.operations.base import Operation, any_changed, object_name, touched


class SplitTable(Operation):
    """Move columns to a new table sharing the key: a trigger mirrors every write, a copy job
    fills the rest, the application switches to the new table, complete drops the old columns."""

    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        into = self.text("into")
        cols = self.names("columns")
        key = t.primary_key
        if not key:
            raise InvalidInput(f"{self.where()}: {t.qualified} has no primary key to share")
        for c in cols:
            if c in key:
                raise InvalidInput(f"{self.where()}: {c} is part of the key; it is copied "
                                   "to the new table anyway")
            t.column(c)
        keep = self.flag("keep_columns")
        defs = [sql.SQL("{} {} NOT NULL").format(sql.Identifier(k), sql.SQL(t.column(k).type))
                for k in key]
        defs += [sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t.column(c).type))
                 for c in cols]
        new = self.shape.create(into, [t.column(k) for k in key] + [t.column(c) for c in cols],
                                key)
        # Filled by the copy: the source's rows, and its size in proportion to the columns.
        new.rows = t.rows
        new.bytes = (t.bytes or 0) * (len(key) + len(cols)) // max(1, len(t.columns))
        ids = sql.SQL(", ").join
        defs.append(sql.SQL("PRIMARY KEY ({})").format(ids(map(sql.Identifier, key))))
        self.add("start", f"create table {new.qualified}", "tx",
                 sql.SQL("CREATE TABLE {} ({})").format(new.ident, ids(defs)),
                 lock="none (a new table)")
        self.add("rollback", f"drop table {new.qualified}", "tx",
                 sql.SQL("DROP TABLE IF EXISTS {}").format(new.ident), lock=self.brief(new))
        every = (*key, *cols)
        # Both versions write between start and complete, each its own shape: the old one
        # the moved columns on the source, the new one the new table (and the source's other
        # columns, through the version schema's view that lacks the moved ones). Each write
        # is carried to the other side for the columns it changed only (the last write of
        # each column wins), guarded so the other side's trigger does not send it back.
        def key_is(rec: str, alias: str | None = None) -> sql.Composable:
            return sql.SQL(" AND ").join(
                sql.SQL("{a}{k} = {r}.{k}").format(
                    a=sql.SQL(f"{alias}.") if alias else sql.SQL(""), k=sql.Identifier(k),
                    r=sql.SQL(rec)) for k in key)

        key_changed = any_changed(key)
        upsert = sql.SQL(
            "        INSERT INTO {new} AS bf_t ({cols}) VALUES ({vals})\n"
            "            ON CONFLICT ({key}) DO UPDATE SET {set};").format(
                new=new.ident, cols=ids(map(sql.Identifier, every)),
                vals=ids(sql.SQL("NEW.{}").format(sql.Identifier(c)) for c in every),
                key=ids(map(sql.Identifier, key)),
                set=ids(sql.SQL("{c} = CASE WHEN {t} THEN EXCLUDED.{c} ELSE bf_t.{c} END").format(
                    c=sql.Identifier(c), t=touched(c)) for c in cols))
        # The old version's inserts and updates (AFTER: with a foreign key from the new table
        # the source row must exist). An INSERT by the new version is left alone: it inserts
        # the new table's row itself, which must not collide with one made here.
        body = sql.SQL(
            "    IF {syncing} THEN RETURN NULL; END IF;\n"
            "    IF TG_OP = 'INSERT' THEN\n"
            "        IF {new_app} THEN RETURN NULL; END IF;\n"
            "    ELSIF {key_changed} THEN\n"
            "{move}\n"
            "        RETURN NULL;\n"
            "    ELSIF NOT ({any}) THEN\n"
            "        RETURN NULL;\n"
            "    END IF;\n"
            "{upsert}\n"
            "    RETURN NULL;").format(
                syncing=self.syncing(), new_app=self.from_new(), key_changed=key_changed,
                any=any_changed(cols),
                move=self.guarded(sql.SQL(
                    "        DELETE FROM {new} WHERE {m};\n"
                    "        INSERT INTO {new} ({cols}) VALUES ({vals});").format(
                    new=new.ident, m=key_is("OLD"), cols=ids(map(sql.Identifier, every)),
                    vals=ids(sql.SQL("NEW.{}").format(sql.Identifier(c)) for c in every))),
                upsert=self.guarded(upsert))
        self.trg = object_name("split", t.name, new.name)
        self.trigger(t, self.trg, "AFTER", "INSERT OR UPDATE", body)
        # Deletes, by either version (BEFORE: a foreign key from the new table would refuse
        # the source row's delete before an AFTER trigger ran).
        self.trg_del = object_name("splitdel", t.name, new.name)
        self.trigger(t, self.trg_del, "BEFORE", "DELETE", sql.SQL(
            "    IF NOT {syncing} THEN\n{delete}\n    END IF;\n    RETURN OLD;").format(
                syncing=self.syncing(), delete=self.guarded(sql.SQL(
                    "        DELETE FROM {new} WHERE {m};").format(
                        new=new.ident, m=key_is("OLD")))))
        # The new version's writes to the new table flow back to the source's columns.
        # (The copy job and the trigger above run in old-version sessions, or guarded.)
        self.trg_back = object_name("unsplit", new.name, t.name)
        self.trigger(new, self.trg_back, "AFTER", "INSERT OR UPDATE OR DELETE", sql.SQL(
            "    IF {syncing} OR NOT {new_app} THEN RETURN NULL; END IF;\n"
            "    IF TG_OP = 'DELETE' THEN\n{clear}\n        RETURN NULL;\n    END IF;\n"
            "{back}\n"
            "    RETURN NULL;").format(
                syncing=self.syncing(), new_app=self.from_new(),
                clear=self.guarded(sql.SQL("        UPDATE {t} SET {nulls} WHERE {m};").format(
                    t=t.ident, m=key_is("OLD"),
                    nulls=ids(sql.SQL("{} = NULL").format(sql.Identifier(c)) for c in cols))),
                back=self.guarded(sql.SQL(
                    "        UPDATE {t} AS bf_s SET {set} WHERE {m};").format(
                    t=t.ident, m=key_is("NEW", "bf_s"),
                    set=ids(sql.SQL("{c} = CASE WHEN {t} THEN NEW.{c} ELSE bf_s.{c} END").format(
                        c=sql.Identifier(c), t=touched(c)) for c in cols)))))
        self.shape.version(t)
        # on_conflict=update copies lock the source rows they read (FOR SHARE), so a batch
        # never overwrites a newer value the trigger mirrored with the one it read earlier.
        self.job(t, f"copy {', '.join(cols)} into {new.qualified}",
                 {"kind": "copy", "dest": new.qualified, "columns": list(every),
                  "on_conflict": "update"})
        self.dropped = not keep
        # The new version's writes to the new table lock it, then the source (its trigger,
        # the foreign key's check); its deletes of source rows lock the source, then the new
        # table. No order of the two suits both, so complete locks one table per transaction:
        # the new table's trigger first (the old version, the only one its copy served, is
        # gone), then the source's triggers and columns.
        self.drop_trigger(new, self.trg_back, "complete")
        stmts = [*self.drop_trigger_statements(t, self.trg),
                 *self.drop_trigger_statements(t, self.trg_del)]
        if not keep:
            stmts.append(sql.SQL("ALTER TABLE {} {}").format(t.ident, ids(
                sql.SQL("DROP COLUMN IF EXISTS {}").format(sql.Identifier(c)) for c in cols)))
            for c in cols:
                del t.columns[c]
        self.add("complete", f"drop triggers {self.trg}, {self.trg_del}"
                 + (f", drop {', '.join(cols)} from {t.qualified}" if not keep else "")
                 + " (one transaction)", "tx", *stmts, lock=self.brief(t),
                 risk="high" if not keep else "low")
        self.t, self.cols = t, cols
        return f"split {', '.join(cols)} of {t.qualified} into {new.qualified}"

    def irreversible(self) -> str | None:
        return (f"columns {', '.join(self.cols)} of {self.t.qualified} (kept in the new table)"
                if self.dropped else None)
