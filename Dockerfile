# The backfill CLI and its demo, for docker compose. Tests do not use Docker.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Installed the way a user installs it: `pip install .` into a venv, no extras, not editable
# (tests/integration/test_plain_install.py does the same from the same files). The sources
# are removed afterwards, so every process runs the installed package.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY backfill ./backfill
COPY workers ./workers
COPY jobs ./jobs
RUN python -m venv /opt/backfill \
    && /opt/backfill/bin/pip install --no-cache-dir /src \
    && rm -rf /src
# BACKFILL_USE_INSTALLED: scripts/demo.sh uses this install instead of making its own venv.
ENV PATH="/opt/backfill/bin:$PATH" BACKFILL_USE_INSTALLED=1

# The demo (compose service `demo`): scripts/demo.sh and the migration it plans (examples/).
WORKDIR /app
COPY scripts ./scripts
COPY examples ./examples
ENTRYPOINT ["backfill"]
CMD ["--help"]
