# The idocr image: workers, beat and the producer run from it (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 10001 idocr
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY pipeline ./pipeline
COPY workers ./workers
COPY migrations ./migrations
COPY configs ./configs
COPY examples ./examples
RUN pip install ".[postgres]"
USER idocr
ENV IDOCR_DATA_DIR=/home/idocr/.idocr
CMD ["idocr", "--help"]
