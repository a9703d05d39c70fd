# The backfill CLI and its demo, for docker compose. Tests do not use Docker.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY backfill ./backfill
COPY workers ./workers
COPY jobs ./jobs
COPY scripts ./scripts
ENV VENV_DIR=/app/.venv PYTHONUNBUFFERED=1
# The same venv setup as scripts/demo.sh, so the demo does not reinstall at start.
RUN bash -c 'source scripts/_venv.sh && ensure_venv ""'
ENV PATH="/app/.venv/bin:$PATH"
ENTRYPOINT ["backfill"]
CMD ["--help"]
