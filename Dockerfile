# syntax=docker/dockerfile:1
# One image per service, all from this file:
#   docker build --target predictor -t liveloop/predictor:0.1.0 .
# A CPU-only torch keeps the images small: pass the CPU wheel index of your choice with
#   --build-arg TORCH_INDEX_URL=<index url>   (empty: the default index, which may bring CUDA wheels).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------
# build: the whole distribution, installed once into /opt/venv and shared by every service target.
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=""
# Keep equal to the torch pin in pyproject.toml (tests/unit/test_deploy.py checks it).
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first and alone: it is by far the largest layer and changes least often.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi

WORKDIR /src
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
# Not editable: the runtime stages copy only /opt/venv, never the sources (pip also writes the .pyc files).
RUN pip install .

# ---------------------------------------------------------------------------------------------------
# runtime: what every service image shares; uid 10001, no shell login, writable paths under /var/lib/liveloop.
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/liveloop
RUN groupadd --system --gid 10001 liveloop \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/liveloop --no-create-home \
        --shell /usr/sbin/nologin liveloop \
    && mkdir -p /etc/liveloop /var/lib/liveloop/state /var/lib/liveloop/artifacts \
    && chown -R 10001:10001 /var/lib/liveloop
COPY --from=build /opt/venv /opt/venv
WORKDIR /var/lib/liveloop
USER 10001:10001

# ---------------------------------------------------------------------------------------------------
# One small target per service: only its environment, ports and command differ.

FROM runtime AS config
ENV LIVELOOP_CONFIG_HOST=0.0.0.0 \
    LIVELOOP_CONFIG_PORT=50051 \
    LIVELOOP_CONFIG_METRICS_PORT=9451 \
    LIVELOOP_CONFIG_LOG_FORMAT=json
EXPOSE 50051 9451
CMD ["liveloop-config"]

FROM runtime AS predictor
ENV LIVELOOP_PREDICTOR_HOST=0.0.0.0 \
    LIVELOOP_PREDICTOR_PORT=50061 \
    LIVELOOP_PREDICTOR_METRICS_PORT=9461 \
    LIVELOOP_PREDICTOR_LOG_FORMAT=json \
    LIVELOOP_PREDICTOR_STATE_DIR=/var/lib/liveloop/state \
    LIVELOOP_PREDICTOR_MODEL_DIR=/var/lib/liveloop/artifacts
EXPOSE 50061 9461
CMD ["liveloop-predictor"]

FROM runtime AS ingest
ENV LIVELOOP_INGEST_HOST=0.0.0.0 \
    LIVELOOP_INGEST_PORT=50071 \
    LIVELOOP_INGEST_METRICS_PORT=9471 \
    LIVELOOP_INGEST_LOG_FORMAT=json
EXPOSE 50071 9471
CMD ["liveloop-ingest"]

FROM runtime AS trainer
ENV LIVELOOP_TRAINER_HOST=0.0.0.0 \
    LIVELOOP_TRAINER_PORT=50081 \
    LIVELOOP_TRAINER_METRICS_PORT=9481 \
    LIVELOOP_TRAINER_LOG_FORMAT=json \
    LIVELOOP_TRAINER_ARTIFACT_DIR=/var/lib/liveloop/artifacts
EXPOSE 50081 9481
CMD ["liveloop-trainer"]

FROM runtime AS monitor
ENV LIVELOOP_MONITOR_HOST=0.0.0.0 \
    LIVELOOP_MONITOR_PORT=50091 \
    LIVELOOP_MONITOR_METRICS_PORT=9491 \
    LIVELOOP_MONITOR_LOG_FORMAT=json
EXPOSE 50091 9491
CMD ["liveloop-monitor"]
