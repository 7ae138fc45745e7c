# syntax=docker/dockerfile:1.7
# The images deploy/k8s runs, one target each, built from the repository root:
#   docker build --target serving -t ghcr.io/detops/detops-serving:0.1.0 .   # bentoml serve + the `detops build` init step
#   docker build --target worker  -t ghcr.io/detops/detops-worker:0.1.0 .    # detops worker (Celery pool of /jobs)
#   docker build --target watcher -t ghcr.io/detops/detops-watcher:0.1.0 .   # deploy watch --kubernetes, smoke Job, drift/purge CronJobs
# Versions: the Python image by exact tag, every package from requirements.lock (tests/unit/test_docker.py
# checks what can be checked without a Docker daemon: sources, pins, entry commands).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DETOPS_CACHE_DIR=/tmp/detops-cache \
    BENTOML_HOME=/var/lib/bentoml \
    HOME=/home/detops
# OpenCV's runtime libraries; git for MLflow's run metadata.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 git \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/detops detops \
 && install -d -o 10001 -g 10001 /var/lib/bentoml /var/lib/detops
WORKDIR /app
COPY requirements.lock ./
# The lock pins PyPI's torch/torchvision (CUDA builds, what training machines run). These images never
# train: they take the CPU builds of the same versions (2.15.0 matches 2.15.0+cpu) and no CUDA libraries.
RUN grep -vE '^(nvidia-|triton==)' requirements.lock > /tmp/requirements.txt \
 && pip install --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple \
        -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY pyproject.toml params.yaml README.md ./
COPY pipelines ./pipelines
COPY serving ./serving
COPY deploy ./deploy
COPY monitoring ./monitoring
COPY evaluation ./evaluation
COPY training ./training
COPY labeling ./labeling
# Editable, as `make setup` does: the project root stays /app (params.yaml, PROJECT_ROOT).
RUN pip install --no-deps -e . && detops --help > /dev/null
USER 10001

FROM base AS serving
EXPOSE 3000
CMD ["bentoml", "serve", "serving.service:Detector", "--host", "0.0.0.0", "--port", "3000"]

FROM base AS worker
CMD ["detops", "worker"]

FROM base AS watcher
CMD ["detops", "deploy", "watch", "--kubernetes", "--no-webhook"]
