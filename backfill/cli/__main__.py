"""``python -m backfill.cli``: the same as the ``backfill`` command."""

import importlib

if __name__ == "__main__":
    # Through the imported module, so plugins register their commands on that module's app.
    importlib.import_module("backfill.cli.main").main()
