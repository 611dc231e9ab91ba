# ITP treatment-response service. Serves a bundle mounted at /models/itp-response
# (default), or a registered model: -e ITP_MODEL_URI=models:/itp-response@champion
# -e MLFLOW_TRACKING_URI=http://tracking:5000
# Only the serving dependencies (pyproject.toml's base set, no [train] extra), at the versions
# constraints.txt pins. Runs with a read-only root filesystem: it writes only under /tmp.

# --- build: dependencies first, so an edit of the code does not reinstall them ---------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
# The venv gets no pip of its own: the base image's installs into it (--python), so neither
# pip nor setuptools ends up in the runtime image.
RUN python -m venv --without-pip /opt/venv \
    && mkdir -p training service \
    && touch training/__init__.py service/__init__.py \
    && python -m pip --python /opt/venv/bin/python install --no-cache-dir -c constraints.txt . \
    && python -m pip --python /opt/venv/bin/python uninstall --yes itp-response
COPY training ./training
COPY service ./service
RUN python -m pip --python /opt/venv/bin/python install --no-cache-dir --no-deps .

# --- runtime: the virtual environment only, a non-root user, nothing written outside /tmp ---
FROM python:3.11-slim

COPY --from=build /opt/venv /opt/venv
RUN useradd --no-create-home --home-dir /tmp --uid 10001 --shell /usr/sbin/nologin itp

USER 10001
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ITP_MODEL_URI=/models/itp-response \
    ITP_HOST=0.0.0.0 \
    ITP_PORT=8000 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    MLFLOW_DISABLE_TELEMETRY=true
EXPOSE 8000
# Healthy means ready to score (a model is loaded), on whatever port ITP_PORT says.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('ITP_PORT', '8000'), timeout=4)"]
CMD ["itp-serve"]
