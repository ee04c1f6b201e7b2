# vlmfit workbench image.
#
#   docker build -t vlmfit .                                  # CUDA (default)
#   docker build --build-arg TORCH_VARIANT=cpu -t vlmfit:cpu . # CPU-only torch
#
# scripts/container_test.sh builds this same file with buildah on a local
# Debian bookworm base (BASE_IMAGE=localhost/vlmfit-base:bookworm) and runs the
# tests inside it: TORCH_VARIANT=cpu by default, TORCH_VARIANT=cuda for the GPU
# image (6.42 GB, ~5 min to build on 2 cores; torch loads CUDA 13, cuBLAS, cuDNN).

# "base" flavour on purpose, not "cudnn-runtime": the torch wheels bring their
# own CUDA 13 runtime, cuBLAS, cuDNN, NCCL... as nvidia-* wheels pinned in
# requirements.lock, so the runtime/cudnn images would only add ~2-3 GB of
# unused duplicate libraries. "base" still sets NVIDIA_VISIBLE_DEVICES /
# NVIDIA_DRIVER_CAPABILITIES for the NVIDIA container toolkit and ships
# cuda-compat. Ubuntu 24.04 gives python3.12, which the lock covers.
# Pin by digest too once pulled (nvidia/cuda:...@sha256:...) for bit-for-bit rebuilds.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
FROM ${BASE_IMAGE}

# cuda: install the lock as is (torch + nvidia-* + triton + torchvision from PyPI).
# cpu:  scripts/lock_filter.py --torch cpu drops nvidia-*/triton/torchvision (the
#       same filter `make setup` uses); torch==2.13.0 then resolves to 2.13.0+cpu
#       from TORCH_CPU_INDEX and/or a wheel directory mounted at WHEELS_DIR.
ARG TORCH_VARIANT=cuda
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# Optional, build-time only (both empty by default; the test script mounts them
# with `buildah bud -v`): a local --find-links directory, and a CA bundle that
# pip must trust behind a TLS-intercepting proxy. The CA is mounted outside
# /etc/ssl/certs so apt's ca-certificates stays intact, and PIP_CERT is set
# only inside the RUN steps below, never baked into the image.
ARG WHEELS_DIR=
ARG HOST_CA=
ARG USER_UID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VLMFIT_IN_CONTAINER=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/vlmfit/.cache/huggingface

# One layer for OS packages + user. No ffmpeg: the PyAV wheels bundle FFmpeg.
# Ubuntu 24.04 images ship a user "ubuntu" with uid 1000; drop it so our user
# gets uid 1000 (matches the usual host uid, so bind-mounted runs/ and the HF
# cache stay writable on both sides).
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv make git; \
    rm -rf /var/lib/apt/lists/*; \
    if getent passwd "${USER_UID}" >/dev/null; then userdel -r "$(getent passwd "${USER_UID}" | cut -d: -f1)" || true; fi; \
    useradd --create-home --uid "${USER_UID}" --shell /bin/bash vlmfit; \
    mkdir -p /workspace/vlmfit "${HF_HOME}"; \
    chown -R vlmfit:vlmfit /workspace /home/vlmfit

WORKDIR /workspace/vlmfit

# Dependencies layer: only requirements.lock is copied first, so editing code
# does not reinstall ~GBs of wheels. The venv is owned by root on purpose: the
# runtime user cannot drift it away from the lock (pip install into it fails).
# --no-deps: the lock is complete and already resolved for 3.11/3.12; pip only
# evaluates its environment markers.
COPY requirements.lock scripts/lock_filter.py /tmp/lock/
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    if [ -n "${HOST_CA}" ]; then export PIP_CERT="${HOST_CA}"; fi; \
    python3 -m venv /opt/venv; \
    python3 /tmp/lock/lock_filter.py /tmp/lock/requirements.lock --torch "${TORCH_VARIANT}" \
        > /opt/venv/requirements.installed.txt; \
    extra=""; \
    if [ "${TORCH_VARIANT}" = cpu ] && [ -n "${TORCH_CPU_INDEX}" ]; then extra="--extra-index-url ${TORCH_CPU_INDEX}"; fi; \
    if [ -n "${WHEELS_DIR}" ]; then extra="$extra --find-links ${WHEELS_DIR}"; fi; \
    /opt/venv/bin/pip install --no-deps --only-binary=:all: --progress-bar off $extra \
        -r /opt/venv/requirements.installed.txt; \
    echo "${TORCH_VARIANT}" > /opt/venv/TORCH_VARIANT; \
    rm -rf /tmp/lock

# Source layer (cheap): the repo, owned by the runtime user, then the package
# itself in editable mode. --no-build-isolation builds with the lock's pinned
# setuptools already in the venv (no network, no unpinned build deps); the
# egg-info it writes under lib/ is then handed to the runtime user (only the
# root-owned files, so the source layer is not copied twice).
COPY --chown=vlmfit:vlmfit . /workspace/vlmfit
RUN set -eu; \
    /opt/venv/bin/pip install --no-deps --no-build-isolation --no-cache-dir -e /workspace/vlmfit; \
    find /workspace/vlmfit -xdev -user root -exec chown vlmfit:vlmfit {} +

USER vlmfit
# JupyterLab (make lab): listens on the container's interface with a token, as vlmfit;
# publish it on the host's loopback only:
#   docker run -p 127.0.0.1:8888:8888 ... vlmfit make lab
EXPOSE 8888
CMD ["make", "help"]
