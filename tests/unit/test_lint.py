"""The SQL linter, both ways: unsafe statements are flagged with the right rule and line, safe
ones pass clean."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from backfill.core.errors import InvalidInput
from backfill.migrate.lint import RULES, lint_sql

ROOT = Path(__file__).resolve().parents[2]
T = "SET lock_timeout = '2s';\n"


def rules(sql: str) -> list[str]:
    return [f.rule for f in lint_sql(sql)]


@pytest.mark.parametrize(("sql", "rule"), [
    (T + "CREATE INDEX i ON orders (customer_id);", "index-not-concurrent"),
    (T + "BEGIN; CREATE INDEX CONCURRENTLY i ON orders (c); COMMIT;", "concurrently-in-transaction"),
    (T + "ALTER TABLE orders ADD CONSTRAINT c CHECK (total > 0);", "constraint-not-not-valid"),
    (T + "ALTER TABLE orders ADD CONSTRAINT f FOREIGN KEY (cid) REFERENCES customers (id);",
     "constraint-not-not-valid"),
    (T + "ALTER TABLE orders ALTER COLUMN total SET NOT NULL;", "set-not-null"),
    (T + "ALTER TABLE orders ADD COLUMN token uuid DEFAULT gen_random_uuid();", "volatile-default"),
    (T + "ALTER TABLE orders ALTER COLUMN total TYPE bigint;", "type-change"),
    (T + "ALTER TABLE orders RENAME COLUMN total TO amount;", "rename-column"),
    (T + "ALTER TABLE orders RENAME TO purchases;", "rename-table"),
    (T + "ALTER TABLE orders DROP COLUMN note;", "drop-column"),
    (T + "DROP TABLE orders;", "drop-table"),
    ("UPDATE orders SET total = qty * price;", "unbounded-update"),
    ("DELETE FROM orders;", "unbounded-delete"),
    (T + "ALTER TABLE orders ADD PRIMARY KEY (id);", "constraint-without-index"),
    (T + "ALTER TABLE orders ADD CONSTRAINT u UNIQUE (email);", "constraint-without-index"),
    ("VACUUM FULL orders;", "vacuum-full"),
    ("CLUSTER orders USING orders_pkey;", "cluster"),
    ("REINDEX INDEX orders_pkey;", "reindex-not-concurrent"),
    ("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE;", "lock-table"),
    ("TRUNCATE orders;", "truncate"),
    ("CREATE TABLE t (id serial PRIMARY KEY, v text);", "int-primary-key"),
    ("CREATE TABLE t (id int PRIMARY KEY, v text);", "int-primary-key"),
    ("ALTER TABLE orders ADD COLUMN note text;", "missing-lock-timeout"),
    (T + "DROP INDEX orders_customer_idx;", "drop-index-not-concurrent"),
    (T + "DROP INDEX IF EXISTS s.i, s.j;", "drop-index-not-concurrent"),
    (T + "ALTER TABLE orders ADD COLUMN region text NOT NULL;", "add-column-not-null-no-default"),
    (T + "ALTER TABLE orders ADD COLUMN region text NOT NULL DEFAULT NULL;",
     "add-column-not-null-no-default"),
    (T + "ALTER TABLE orders ADD COLUMN region int DEFAULT CAST(NULL AS int) NOT NULL;",
     "add-column-not-null-no-default"),
    (T + "ALTER TABLE orders ADD COLUMN seq bigserial;", "add-column-rewrite"),
    (T + "ALTER TABLE orders ADD COLUMN n bigint GENERATED ALWAYS AS IDENTITY;",
     "add-column-rewrite"),
    (T + "ALTER TABLE orders ADD COLUMN t numeric GENERATED ALWAYS AS (qty * price) STORED;",
     "add-column-rewrite"),
    (T + "ALTER TABLE rooms ADD CONSTRAINT x EXCLUDE USING gist (during WITH &&);",
     "exclusion-constraint"),
    ("DROP DATABASE app;", "drop-database"),
])
def test_unsafe_statements_are_flagged(sql: str, rule: str) -> None:
    assert rule in rules(sql)
    assert rule in RULES


@pytest.mark.parametrize("sql", [
    T + "CREATE INDEX CONCURRENTLY i ON orders (customer_id);",
    T + "ALTER TABLE orders ADD CONSTRAINT c CHECK (total > 0) NOT VALID;\n"
        "ALTER TABLE orders VALIDATE CONSTRAINT c;",
    T + "ALTER TABLE orders ADD CONSTRAINT f FOREIGN KEY (cid) REFERENCES customers (id) "
        "NOT VALID;\nALTER TABLE orders VALIDATE CONSTRAINT f;",
    T + "ALTER TABLE orders ADD COLUMN note text;",
    T + "ALTER TABLE orders ADD COLUMN status text NOT NULL DEFAULT 'new';",
    T + "ALTER TABLE orders ADD COLUMN created timestamptz DEFAULT now();",
    T + "ALTER TABLE orders ALTER COLUMN name TYPE text;",
    T + "ALTER TABLE orders ALTER COLUMN amount TYPE numeric;",
    T + "ALTER TABLE orders ADD CONSTRAINT total_nn CHECK (total IS NOT NULL) NOT VALID;\n"
        "ALTER TABLE orders VALIDATE CONSTRAINT total_nn;\n"
        "ALTER TABLE orders ALTER COLUMN total SET NOT NULL;\n"
        "ALTER TABLE orders DROP CONSTRAINT total_nn;",
    T + "CREATE UNIQUE INDEX CONCURRENTLY u ON orders (email);\n"
        "ALTER TABLE orders ADD CONSTRAINT u UNIQUE USING INDEX u;",
    "UPDATE orders SET total = qty * price WHERE id > 1000 AND id <= 2000;",
    "DELETE FROM orders WHERE id > 1000 AND id <= 2000;",
    "-- a comment\nCOMMENT ON TABLE orders IS 'orders';",
    "CREATE TABLE t (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);\n"
    "CREATE INDEX t_v ON t (v);\nALTER TABLE t ADD CONSTRAINT c CHECK (v <> '');",
    "REINDEX INDEX CONCURRENTLY orders_pkey;",
    "VACUUM orders;",
    T + "DROP INDEX CONCURRENTLY IF EXISTS orders_customer_idx;",
    T + "ALTER TABLE orders ADD COLUMN region text NOT NULL DEFAULT 'eu';",
    T + "ALTER TABLE orders ADD COLUMN seq bigint;",
    # A table created in the same file: nobody else uses it yet.
    "CREATE TABLE t (id bigint PRIMARY KEY, v text);\n"
    "ALTER TABLE t ADD COLUMN w text NOT NULL;\n"
    "ALTER TABLE t ADD COLUMN n bigint GENERATED ALWAYS AS IDENTITY;\n"
    "ALTER TABLE t ADD CONSTRAINT x EXCLUDE USING gist (v WITH =);\n"
    "CREATE INDEX t_v ON t (v);\nDROP INDEX t_v;",
])
def test_safe_statements_pass_clean(sql: str) -> None:
    assert rules(sql) == []


def test_findings_carry_line_why_and_the_safe_alternative() -> None:
    sql = (T + "-- add the index\n"
           "CREATE INDEX i ON orders (customer_id);\n\n"
           "UPDATE orders SET total = 0;\n")
    findings = lint_sql(sql, "m.sql")
    assert [(f.line, f.rule) for f in findings] == [(3, "index-not-concurrent"),
                                                     (5, "unbounded-update")]
    first = findings[0]
    assert first.file == "m.sql"
    assert "SHARE lock" in first.why
    assert "CONCURRENTLY" in first.instead
    assert first.statement == "CREATE INDEX i ON orders (customer_id)"


def test_an_ignore_comment_silences_one_statement_only() -> None:
    sql = ("-- backfill-lint: ignore unbounded-update\n"
           "UPDATE settings SET value = 'x';\n"
           "UPDATE orders SET total = 0;\n")
    assert [(f.line, f.rule) for f in lint_sql(sql)] == [(3, "unbounded-update")]


def test_unparseable_sql_is_a_clear_error() -> None:
    with pytest.raises(InvalidInput, match=r"m\.sql: cannot parse SQL"):
        lint_sql("ALTER TABLE orders ADD COLUM x int;", "m.sql")


def test_the_cli_exits_1_on_findings_and_speaks_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sql"
    bad.write_text("CREATE INDEX i ON orders (c);\n")
    good = tmp_path / "good.sql"
    good.write_text(T + "CREATE INDEX CONCURRENTLY i ON orders (c);\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "backfill.cli.main", "lint", *args],
                              capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)

    res = run(str(bad), "--format", "json")
    assert res.returncode == 1, res.stderr
    found = json.loads(res.stdout)["findings"]
    assert {f["rule"] for f in found} == {"index-not-concurrent", "missing-lock-timeout"}
    assert run(str(good)).returncode == 0
    res = run(str(tmp_path / "missing.sql"))
    assert res.returncode == 2
    assert "cannot read" in res.stderr
