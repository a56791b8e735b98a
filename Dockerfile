# syntax=docker/dockerfile:1
# Targets:
#   cpu  (default) - API and CPU workers: python:3.11-slim, CPU torch wheel, onnxruntime, the web app at /ui/.
#   gpu            - GPU workers: CUDA runtime image, CUDA torch wheel, onnxruntime-gpu.
# Build: docker build --target cpu -t ttaseg:cpu .   |   docker build --target gpu -t ttaseg:gpu .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
ARG NODE_IMAGE=node:20-bookworm-slim

# ---------------------------------------------------------------- project source (shared by both builds)
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY models/ /src/models/
COPY trainer/ /src/trainer/
COPY cli/ /src/cli/
COPY service/ /src/service/
COPY workers/ /src/workers/

# ---------------------------------------------------------------- web app (static files, built once)
FROM ${NODE_IMAGE} AS web-build
WORKDIR /web
COPY service/web/package.json service/web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY service/web/ ./
RUN npm run build

# ---------------------------------------------------------------- CPU dependencies
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
COPY --from=source /src ./
# The project itself: its dependencies are constrained in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[cpu]"

# ---------------------------------------------------------------- GPU dependencies
FROM ${CUDA_IMAGE} AS gpu-base
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS gpu-build
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
ARG TORCH_CUDA=cu128
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" torch==2.13.0
WORKDIR /src
COPY --from=source /src ./
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[gpu]"

# ---------------------------------------------------------------- GPU runtime (GPU workers)
FROM gpu-base AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH \
    TTASEG_DATA_DIR=/data TTASEG_BUNDLES=/app/bundles TTASEG_DEVICE=cuda TTASEG_WORKER_QUEUES=gpu
RUN useradd --create-home --uid 10001 ttaseg && mkdir -p /data /app && chown ttaseg:ttaseg /data
COPY --from=gpu-build /opt/venv /opt/venv
COPY bundles/ /app/bundles/
WORKDIR /app
USER 10001
CMD ["python", "-m", "workers"]

# ---------------------------------------------------------------- CPU runtime (API and CPU workers); default target
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH \
    TTASEG_DATA_DIR=/data TTASEG_BUNDLES=/app/bundles TTASEG_DEVICE=cpu TTASEG_WEB_DIST=/app/web
RUN useradd --create-home --uid 10001 ttaseg && mkdir -p /data /app && chown ttaseg:ttaseg /data
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=web-build /web/dist /app/web/
COPY bundles/ /app/bundles/
WORKDIR /app
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
