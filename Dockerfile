# The l0sweep image. One image runs every part of the service: the MLflow server, the study-creation job,
# the workers, the dashboard and the report job (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# g++: torch.compile (a trial's `compile: true`) builds its kernels with it.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

# Dependencies first, from pyproject.toml alone, so a code change does not reinstall torch (about 5 GB).
# The pinned torch wheel carries CUDA and runs on CPU-only hosts too; a GPU needs only the NVIDIA toolkit.
COPY pyproject.toml README.md ./
RUN mkdir l0core sweeps dashboards && touch l0core/__init__.py sweeps/__init__.py dashboards/__init__.py \
 && pip install ".[service]" && pip uninstall -y l0sweep && rm -rf l0core sweeps dashboards

COPY l0core l0core
COPY sweeps sweeps
COPY dashboards dashboards
COPY studies studies
RUN pip install --no-deps .

# Not root. /out holds baselines, logs and reports; /data the datasets; /mlartifacts the MLflow artifacts.
# Named volumes mounted there start with this ownership.
RUN useradd --create-home --uid 1000 l0sweep \
 && mkdir -p /out /data /mlartifacts && chown l0sweep:l0sweep /out /data /mlartifacts
USER l0sweep
ENV L0SWEEP_OUT=/out L0SWEEP_DATA_DIR=/data

ENTRYPOINT ["l0sweep"]
CMD ["--help"]
