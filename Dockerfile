# One image for all five services (and the offline model): they share one codebase, one
# dependency set and one version, so one build, one scan and one tag cover a release; the
# command picks the service (trellis-executor, trellis-planner, trellis-toolgateway,
# trellis-cache, trellis-costs, trellis-offline-model). Settings come only from the
# environment (TRELLIS_*, OTEL_*, OPENAI_*), see README "Configuration".
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
COPY app ./app
RUN python -m venv /opt/trellis && /opt/trellis/bin/pip install --no-compile .

FROM ${PYTHON_IMAGE}
# procps: the bundled run_command tools call uptime and free (tools.yaml).
RUN apt-get update && apt-get install -y --no-install-recommends procps \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 trellis \
 && useradd --system --uid 10001 --gid trellis --home-dir /var/lib/trellis --shell /usr/sbin/nologin trellis \
 && mkdir -p /var/lib/trellis && chown trellis:trellis /var/lib/trellis
COPY --from=build /opt/trellis /opt/trellis
ENV PATH=/opt/trellis/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TRELLIS_HOST=0.0.0.0 \
    TRELLIS_DATABASE_URL=sqlite:////var/lib/trellis/trellis.db
WORKDIR /var/lib/trellis
USER 10001:10001
# Local state (SQLite stores, usage outboxes) lives here; mount a volume to keep it.
VOLUME ["/var/lib/trellis"]
# gRPC health of whichever service runs in the container (TRELLIS_PORT).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["trellis-probe"]
CMD ["trellis-executor"]
