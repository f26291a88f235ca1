# s4serve container image.
#
# The build context must hold a wheelhouse (default ./wheelhouse) with the s4serve wheel and
# every runtime dependency, torch included; nothing is fetched from the network while building:
#
#   pip wheel -w wheelhouse . "torch==2.13.0"        # CPU torch wheel from your pip config
#   docker build -t s4serve .
#   docker run -p 8000:8000 s4serve
#
# Built where a C compiler is, the s4serve wheel carries a portable build of the native S4D step
# (x86-64 with AVX2 and FMA; model/native_build.py), which the image, having no compiler, streams
# with.
#
# Build arguments:
#   BASE        base image with python3 >= 3.11 and its venv module (default: official slim image;
#               deploy/docker/smoke.sh passes a local debootstrap-built Debian image instead)
#   TORCH_SPEC  the torch requirement to install from the wheelhouse
#   VARIANT     cpu (default) or cuda; cuda expects a CUDA torch wheel (and its nvidia-* wheels)
#               in the wheelhouse and marks the image for the NVIDIA container runtime
#   WHEELHOUSE  wheelhouse folder inside the build context

ARG BASE=python:3.11-slim-bookworm
ARG VARIANT=cpu

FROM ${BASE} AS builder
ARG TORCH_SPEC=torch==2.13.0
ARG WHEELHOUSE=wheelhouse
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# Torch alone first, in its own layer: rebuilds after a code change reuse it from the cache.
# Its C++ tests and headers (about 150 MB) are not needed to serve.
COPY ${WHEELHOUSE}/torch-*.whl /wheelhouse/
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --find-links /wheelhouse --no-deps "${TORCH_SPEC}" \
 && rm -rf /opt/venv/lib/python3*/site-packages/torch/test \
           /opt/venv/lib/python3*/site-packages/torch/include
COPY ${WHEELHOUSE}/ /wheelhouse/
# TORCH_SPEC again so that its dependencies come in and the project's open "torch>=" range
# cannot replace the pinned wheel.
RUN /opt/venv/bin/pip install --no-index --find-links /wheelhouse "${TORCH_SPEC}" s4serve \
 && /opt/venv/bin/pip uninstall --yes pip

FROM ${BASE} AS runtime-base
# Fixed ids so volume permissions and Kubernetes securityContext (runAsUser) can rely on them.
RUN groupadd --system --gid 10001 s4serve \
 && useradd --system --uid 10001 --gid s4serve --home-dir /home/s4serve --create-home \
      --shell /usr/sbin/nologin s4serve \
 && install -d -o 10001 -g 10001 /home/s4serve/var /home/s4serve/var/sessions
COPY --from=builder /opt/venv /opt/venv
# MKL without its buffer cache: predict's peak memory stays within predict_memory_mb
ENV PATH=/opt/venv/bin:$PATH \
    MKL_DISABLE_FAST_MM=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    S4SERVE_SNAPSHOT_DIR=/home/s4serve/var/sessions
USER 10001:10001
WORKDIR /home/s4serve
EXPOSE 8000
# Liveness only: readiness (models loaded and warmed) is /readyz, probed by the orchestrator.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# exec form: the server is PID 1 and gets SIGTERM directly, so it can drain and snapshot sessions.
CMD ["s4serve", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime-base AS runtime-cpu

FROM runtime-base AS runtime-cuda
# Asks the NVIDIA container runtime to mount the driver; the CUDA libraries come with the
# torch wheels (nvidia-* packages), so no CUDA base image is needed.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# hadolint ignore=DL3006
FROM runtime-${VARIANT}
