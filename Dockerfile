# The idocr image: workers, beat, the metrics endpoint and the producer run from it (see
# docker-compose.yml). Layers go from the least to the most often changed: a change to the
# sources rebuilds only the last two, not the dependencies.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# libGL and GLib: OpenCV's shared libraries (the local OCR engine) need them; slim lacks both.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 idocr
WORKDIR /app

# 1. Dependencies only, pinned by deploy/constraints.txt; rebuilt when either file changes.
COPY pyproject.toml deploy/constraints.txt ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt -c constraints.txt \
    && rm /tmp/requirements.txt

# 2. The sources, installed without touching the dependencies above.
COPY README.md alembic.ini ./
COPY migrations ./migrations
COPY configs ./configs
COPY examples ./examples
COPY workers ./workers
COPY pipeline ./pipeline
RUN pip install --no-deps .

USER idocr
# PROMETHEUS_MULTIPROC_DIR: every process of a container writes its metrics there and the one
# serving /metrics adds them up; compose mounts a fresh tmpfs on it.
ENV IDOCR_DATA_DIR=/home/idocr/.idocr PROMETHEUS_MULTIPROC_DIR=/tmp/idocr-metrics
# The database answers with the current schema and Redis answers (compose adds a liveness
# check of its own for workers: a Celery ping).
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 CMD ["idocr", "health"]
CMD ["idocr", "--help"]
