# ITP treatment-response service. Serves a bundle mounted at /models/itp-response
# (default), or a registered model: -e ITP_MODEL_URI=models:/itp-response@champion
# -e MLFLOW_TRACKING_URI=http://tracking:5000
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY training ./training
COPY service ./service
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin itp

USER 10001
ENV ITP_MODEL_URI=/models/itp-response \
    ITP_HOST=0.0.0.0 \
    ITP_PORT=8000 \
    MPLCONFIGDIR=/tmp/matplotlib
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["itp-serve"]
