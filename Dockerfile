# The image every pipeline component runs in: the iagn package with kfp, mlflow, dvc and
# great-expectations. CPU torch by default; a CUDA build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# IAGN_GIT_COMMIT (make image passes `git rev-parse HEAD`) becomes the iagn.git_commit tag
# of every MLflow run the image makes: a container has no checkout to read it from.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG IAGN_GIT_COMMIT=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    GX_ANALYTICS_ENABLED=false \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
    IAGN_GIT_COMMIT=${IAGN_GIT_COMMIT}

# git: the fetch-data step clones the data repository to `dvc pull` from it.
# Debian pins move with point releases; the base image tag fixes the distribution instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the index that decides CPU or CUDA; `pip install .` then keeps it.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" \
    "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/iagn
COPY pyproject.toml README.md params.yaml ./
COPY iagn ./iagn
COPY components ./components
COPY pipeline ./pipeline
RUN pip install --no-cache-dir . \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin --no-log-init iagn

# A numeric user, so Kubernetes can verify runAsNonRoot without resolving names.
USER 10001
WORKDIR /home/iagn
ENTRYPOINT []
CMD ["iagn", "--help"]
