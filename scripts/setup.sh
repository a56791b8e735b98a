#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine with Python 3.11:
#   - a virtual environment in .venv with the CPU build of torch and everything else from pyproject.toml;
#   - with root and apt (or TTASEG_APT=1): Orthanc + DICOMweb plugin and dicom3tools for the PACS tests, and
#     Chromium for the web app's browser tests;
#   - with npm: the web app (service/web) built into service/web/dist, which the API serves at /ui/.
# GPU hosts: set TTASEG_GPU=1 to install onnxruntime-gpu instead of onnxruntime (torch CUDA wheels: see Dockerfile).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [[ ${TTASEG_APT:-auto} != 0 && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  if ! command -v Orthanc >/dev/null || ! command -v dciodvfy >/dev/null || ! command -v redis-server >/dev/null \
    || [[ ! -x /usr/bin/chromium ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb dicom3tools redis-server chromium \
      >/dev/null
  fi
fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.13.0"
EXTRA=dev,federated
[[ ${TTASEG_GPU:-0} == 1 ]] && EXTRA=gpu,dev,federated
.venv/bin/pip install -q -e ".[$EXTRA]"
# Flower pins exact releases of the web stack that the service also uses (fastapi, starlette, typer, rich);
# federated training needs none of them, only what the `federated` extra lists
.venv/bin/pip install -q --no-deps "flwr==1.42.0"
if command -v npm >/dev/null; then
  (cd service/web && npm ci --no-audit --no-fund --loglevel=error >/dev/null && npm run --silent build)
else
  echo "npm not found: the web app (/ui/) is not built; the HTTP API works without it" >&2
fi
echo "set-up done: $(.venv/bin/python -c 'import torch, monai; print("torch", torch.__version__, "monai", monai.__version__)')"
