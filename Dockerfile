# The web app (and `python -m pneumonia ...`, `pacs watch` included) as a container image, served as
# the Procfile serves it: `gunicorn app:app` with gunicorn.conf.py, the shipped model inside, ONNX
# Runtime, no TensorFlow. docs/containers.md says how to build, run and deploy it.
#
#   docker build -t pneumonia .
#   docker run --rm -p 8000:8000 --read-only --tmpfs /tmp pneumonia
#
# BASE: any Debian-like image with python3 (3.11) and python3 -m venv; the default is the official
# slim image. Without a registry, build on a local one (docs/containers.md: a debootstrap base):
#   docker build --network host --build-arg BASE=pneumonia-base:bookworm -t pneumonia .
# Behind a TLS-intercepting proxy, put its CA certificate(s) in the build context as extra-ca.pem
# (git-ignored): pip trusts them during the build; they are not in the image.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
# The serving set and the pacs set (`pacs screen` / `pacs watch`, DICOM results from the API); set
# REQUIREMENTS=requirements.txt for the serving set alone.
ARG REQUIREMENTS="requirements.txt requirements-pacs.txt"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=120
# The glob copies extra-ca.pem when the context has one and nothing otherwise.
COPY requirements*.txt extra-ca.pe[m] /build/
RUN python3 -m venv /opt/venv \
 && if [ -f /build/extra-ca.pem ]; then \
      cat "$(/opt/venv/bin/python -c 'from pip._vendor import certifi; print(certifi.where())')" \
          /build/extra-ca.pem > /build/ca-bundle.pem \
      && export PIP_CERT=/build/ca-bundle.pem; \
    fi \
 && cd /build \
 && /opt/venv/bin/pip install $(for file in $REQUIREMENTS; do printf -- '-r %s ' "$file"; done) \
 && /opt/venv/bin/pip uninstall -y pip \
 && find /opt/venv \( -name tests -o -name test \) -type d -path '*/site-packages/*' -prune \
      -exec rm -rf {} + \
 && rm -rf /build

FROM ${BASE}
# UID 1000, as Hugging Face Spaces and most Kubernetes policies expect; no password, no login shell.
RUN groupadd --gid 1000 app \
 && useradd --uid 1000 --gid 1000 --home-dir /home/app --create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY app.py gunicorn.conf.py ./
COPY pneumonia/ pneumonia/
COPY model/ model/
# Byte-compiled here, as root: the container's file system is read-only at run time.
RUN /opt/venv/bin/python -m compileall -q /app/pneumonia /app/app.py /app/gunicorn.conf.py

# Nothing is written at run time but under /tmp (a tmpfs with --read-only) and /dev/shm (gunicorn's
# heartbeat files): gunicorn's control socket goes to $XDG_RUNTIME_DIR (else under $HOME, read-only
# here), and ONNX Runtime's telemetry, which would persist a device ID under $HOME, is off.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/app \
    TMPDIR=/tmp \
    XDG_RUNTIME_DIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    ORT_DISABLE_TELEMETRY=1 \
    PORT=8000
USER 1000:1000
EXPOSE 8000
# /healthz answers 200 once the model is loaded and warmed up, 503 with the reason before.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"
# gunicorn is PID 1: SIGTERM (docker stop, Kubernetes) stops accepting, answers what is in flight
# (up to graceful_timeout, 30 s) and exits.
STOPSIGNAL SIGTERM
CMD ["gunicorn", "app:app"]
