# syntax=docker/dockerfile:1
# CPU image with the reference backend. GPU images (TensorRT lean runtime, full TensorRT) follow
# with the GPU backends.
FROM python:3.12-slim AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="trt-heartbeat-exporter" \
      org.opencontainers.image.description="Prometheus exporter: canonical inference heartbeat per GPU" \
      org.opencontainers.image.version="${VERSION}"

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# The same pyproject.toml the tests install from.
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN pip install . && rm -rf /src

RUN useradd --system --uid 65532 --no-create-home heartbeat
USER 65532:65532
WORKDIR /

EXPOSE 9470
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9470/ping', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["trt-heartbeat-exporter"]
CMD ["serve"]
