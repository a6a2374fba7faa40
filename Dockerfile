# One image for every thaw process: the API, the CPU and GPU workers, and migrations.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    THAW_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
# torch 2.14.1 from PyPI is the CUDA build: the same image runs the CPU and the GPU worker.
RUN pip install --no-cache-dir -e . \
    && useradd --create-home --uid 1000 thaw \
    && mkdir -p /data && chown thaw /data
USER thaw
VOLUME ["/data"]
EXPOSE 8000
CMD ["thaw", "api", "--host", "0.0.0.0", "--port", "8000"]
