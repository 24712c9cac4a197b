# syntax=docker/dockerfile:1
# The image every pipeline component runs in: the iagn package with kfp, mlflow, dvc and
# great-expectations, in a venv at /opt/venv. Build it with `make image` (scripts/build_image.sh).
#
# Build arguments:
#   BASE_IMAGE   a Debian bookworm image with Python 3.11 and its venv module. Where Docker
#                Hub cannot be reached, scripts/base_image.sh builds an equivalent one from
#                Debian packages (make image does so by itself).
#   TORCH_INDEX  where torch comes from: the CPU build by default; a CUDA build with
#                https://download.pytorch.org/whl/cu128, or https://pypi.org/simple (PyPI's
#                build, CUDA libraries included: see the README for its size).
#   IAGN_GIT_COMMIT  (make image passes `git rev-parse HEAD`) the iagn.git_commit tag of
#                every MLflow run the image makes: a container has no checkout to read it from.
#
# Layer order is for rebuilds: the system packages, torch and the dependencies (from
# pyproject.toml alone) come before the source, so a code change rebuilds only the last
# layers. pip's cache is a build cache mount: reused across builds, never in a layer.
# The secret `pip-ca` (optional; make image passes the host's CA bundle where pip's
# PIP_CERT or SSL_CERT_FILE names one, e.g. behind a TLS-inspecting proxy) is mounted only
# while pip runs: it is in no layer.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    DVC_NO_ANALYTICS=1 \
    GX_ANALYTICS_ENABLED=false \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# git: the fetch-data step reads the data repository with git and `dvc get`.
# Debian pins move with point releases; the base image tag fixes the distribution instead.
# A venv of its own, so that pip never touches the base image's Python (PEP 668 on Debian's).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# pip 23 (bookworm's ensurepip) takes ~10 minutes to resolve kfp + mlflow + dvc; 25 takes one.
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip-ca \
    { [ ! -s /run/secrets/pip-ca ] || export PIP_CERT=/run/secrets/pip-ca; } \
    && pip install --upgrade "pip>=25,<27"

# torch first, from the index that decides CPU or CUDA; the dependencies below then keep it.
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip-ca \
    { [ ! -s /run/secrets/pip-ca ] || export PIP_CERT=/run/secrets/pip-ca; } \
    && pip install --index-url "${TORCH_INDEX}" \
    "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# The dependencies from pyproject.toml alone: they change far less often than the code.
COPY pyproject.toml /tmp/deps/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip-ca \
    { [ ! -s /run/secrets/pip-ca ] || export PIP_CERT=/run/secrets/pip-ca; } \
    && python3 -c "import tomllib; deps = tomllib.load(open('/tmp/deps/pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/deps/requirements.txt', 'w').write('\n'.join(deps))" \
    && pip install -r /tmp/deps/requirements.txt \
    && rm -rf /tmp/deps

# The code. setuptools' build/ and egg-info are removed in the same layer they are made in.
# safe.directory: a repository mounted into the container (run-local --runner docker) belongs
# to the host's user, not 10001; git and DVC's libgit2 refuse it otherwise ("dubious
# ownership"). A pod's own clones are its user's anyway.
WORKDIR /opt/iagn
COPY pyproject.toml README.md params.yaml ./
COPY iagn ./iagn
COPY components ./components
COPY pipeline ./pipeline
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip-ca \
    { [ ! -s /run/secrets/pip-ca ] || export PIP_CERT=/run/secrets/pip-ca; } \
    && pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && pip check \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin --no-log-init iagn \
    && git config --system --add safe.directory '*'

# Last, since it changes with every commit: the commit the runs are tagged with.
ARG IAGN_GIT_COMMIT=""
ENV IAGN_GIT_COMMIT=${IAGN_GIT_COMMIT}

# A numeric user, so Kubernetes can verify runAsNonRoot without resolving names. HOME is
# its home folder (MLflow, matplotlib and DVC write there), /tmp is the temp dir.
USER 10001
ENV HOME=/home/iagn
WORKDIR /home/iagn
# Serving: `iagn serve --host 0.0.0.0 --port 5001 --model models:/iagn@champion`; probe it
# with GET /ping (see the README: a Kubernetes readinessProbe, or `docker run --health-cmd`).
EXPOSE 5001
ENTRYPOINT []
CMD ["iagn", "--help"]
