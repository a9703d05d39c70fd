"""Job definitions: named, reusable backfills that ``backfill list --defined`` shows.

Add a module here, decorate a function returning a spec with ``@registry.job``, and import the
module below. The function's docstring is the job's description.
"""

from backfill import Registry

registry = Registry()

from jobs import examples  # noqa: E402,F401 - registers the definitions
