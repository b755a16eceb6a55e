# The cloud side of splitserve: `python -m cloud_server` behind port 8000.
#
#   docker build -t splitserve-cloud .
#   docker run --rm -p 8000:8000 -e SPLITSERVE_API_KEYS=secret splitserve-cloud
#
# Two stages: `build` installs into a venv with pip and the build backend around; `runtime` gets
# only that venv. The same Python patch release as CI, so the image runs what the tests ran.

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

# The project's extras in the image: `cloud` (the service), `cloud,ray` for Ray Serve (the
# compose `ray` profile and deploy/rayservice.yaml): docker build --build-arg EXTRAS=cloud,ray
ARG EXTRAS=cloud

# The CPU build of torch, from PyTorch's CPU-only index and nothing else: a bare `torch` from
# PyPI is the CUDA build (several GB of nvidia-* wheels). With --index-url (not --extra-index-url)
# pip cannot fall back to PyPI's CUDA wheel; if the version is missing there the build fails
# loudly instead. `==2.13.0` matches the index's `2.13.0+cpu` (a local version label).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Its own layer, before the source is copied: editing the code does not re-download torch.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
# Only what the wheel is built from; .dockerignore keeps everything else out of the context.
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY device_client/ device_client/
COPY cloud_server/ cloud_server/

# torch is already satisfied, so the project's `torch>=2.2` installs nothing more. The check
# fails the build if a CUDA torch got in anyway. "./[cloud]" is ".[cloud]" spelled so that
# hadolint sees a local path (DL3013 wants every PyPI name pinned; the project pins itself).
RUN pip install --no-cache-dir "./[${EXTRAS}]" \
    && python -c "import torch, sys; sys.exit(torch.version.cuda is not None)"


FROM ${PYTHON_IMAGE} AS runtime

# A fixed numeric uid/gid so volume permissions and `runAsUser` policies can name it. A home
# directory because torch and friends look for ~/.cache. -l: no huge sparse lastlog entry.
RUN groupadd --gid 10001 splitserve \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home --home-dir /home/splitserve \
        --shell /usr/sbin/nologin splitserve

# Owned by root and read-only to the server: the process cannot rewrite its own code.
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SPLITSERVE_HOST=0.0.0.0 \
    SPLITSERVE_PORT=8000

WORKDIR /home/splitserve
USER 10001:10001
EXPOSE 8000

# Ready, not just live: 503 while the models load and profile. That took 110 s on 2 busy cores,
# hence the start period: failures inside it do not count.
# A 503 or a refused connection raises, and the uncaught exception exits 1: unhealthy.
# Plain HTTP on purpose: with --ssl-certfile set, override the healthcheck too.
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status == 200 else 1)"]

# SIGTERM makes uvicorn stop accepting, finish in-flight requests (up to
# SPLITSERVE_GRACEFUL_SHUTDOWN_S, default 30 s) and run the lifespan shutdown.
STOPSIGNAL SIGTERM

# The command the integration tests run, bound to every interface instead of 127.0.0.1. The flags
# win over SPLITSERVE_HOST/PORT; those two serve `docker run IMAGE python -m cloud_server`.
# Every other setting comes from SPLITSERVE_* variables.
CMD ["python", "-m", "cloud_server", "--host", "0.0.0.0", "--port", "8000"]
