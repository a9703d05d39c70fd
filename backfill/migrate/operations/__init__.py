"""The migration operations, one module each, by the name a migration file gives them."""

from __future__ import annotations

from backfill.migrate.operations.add_check import AddCheck
from backfill.migrate.operations.add_column import AddColumn
from backfill.migrate.operations.add_foreign_key import AddForeignKey
from backfill.migrate.operations.add_unique import AddUnique
from backfill.migrate.operations.backfill import Backfill
from backfill.migrate.operations.base import Operation
from backfill.migrate.operations.change_type import ChangeType
from backfill.migrate.operations.copy_from import CopyFrom
from backfill.migrate.operations.create_index import CreateIndex
from backfill.migrate.operations.create_table import CreateTable
from backfill.migrate.operations.drop_column import DropColumn
from backfill.migrate.operations.drop_index import DropIndex
from backfill.migrate.operations.drop_table import DropTable
from backfill.migrate.operations.merge_tables import MergeTables
from backfill.migrate.operations.raw_sql import RawSql
from backfill.migrate.operations.rename_column import RenameColumn
from backfill.migrate.operations.split_table import SplitTable

OPERATIONS: dict[str, type[Operation]] = {
    "create_table": CreateTable, "drop_table": DropTable,
    "add_column": AddColumn, "drop_column": DropColumn,
    "rename_column": RenameColumn, "change_type": ChangeType,
    "add_foreign_key": AddForeignKey, "add_check": AddCheck, "add_unique": AddUnique,
    "create_index": CreateIndex, "drop_index": DropIndex,
    "split_table": SplitTable, "merge_tables": MergeTables,
    "backfill": Backfill, "copy_from": CopyFrom, "sql": RawSql,
}
