# Strawgate: the same install the README's commands do (scripts/bootstrap), in two stages.
#   docker build -t strawgate .
#   docker run -e SECRET_KEY=... -e ENCRYPTION_KEYS=... -e DATABASE_URL=... \
#              -e MAIL_SERVER=... -e MAIL_FROM=... -p 8000:8000 strawgate
FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/strawgate
COPY requirements/runtime.lock pyproject.toml README.md alembic.ini ./
# The pinned runtime dependencies first (a layer that changes only with the lock; no
# test or development tool) ...
RUN /opt/strawgate/bin/pip install -r runtime.lock
# ... then Strawgate itself as a wheel: migrations, templates and data inside.
COPY db ./db
COPY graph ./graph
COPY alembic ./alembic
RUN /opt/strawgate/bin/pip install --no-deps .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /srv/strawgate --create-home strawgate
COPY --from=build /opt/strawgate /opt/strawgate
ENV PATH=/opt/strawgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ENVIRONMENT=production \
    LOG_FORMAT=json
USER strawgate
WORKDIR /srv/strawgate
EXPOSE 8000
# Liveness only: /readyz is for load balancers (a database outage makes it 503, and a
# process that recovers by itself must not be restarted for it).
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
# Migrations are a deploy step: run `strawgate migrate` (same image) before rolling out.
# Behind a proxy, set FORWARDED_ALLOW_IPS to its address; WORKERS needs REDIS_URL above 1.
CMD ["sh", "-c", "exec strawgate serve --host 0.0.0.0 --port 8000 --workers ${WORKERS:-1}"]
