# syntax=docker/dockerfile:1
# Four images from one file; the Python dependencies come from pyproject.toml, the same file the
# tests install from.
#   lean (default): TensorRT lean runtime + cuda-python + NVRTC + NVML. Runs the `cuda` backend,
#                   or `tensorrt` with a plan built elsewhere (build-engine in the full image).
#                   linux/amd64 and linux/arm64 (Grace, other SBSA servers); PyPI has no arm64
#                   TensorRT lean wheels, so the arm64 image runs the `cuda` backend only:
#                   docker buildx build --platform linux/amd64,linux/arm64 .
#   full:           the full TensorRT with its builder, from NVIDIA's package index
#                   (docker build --target full --build-arg PIP_EXTRA_INDEX_URL=<NVIDIA index>).
#   jetson:         Jetson (L4T, integrated GPU, no NVML) on NVIDIA's L4T JetPack image, whose
#                   CUDA and TensorRT match the board's JetPack; on L4T base images the NVIDIA
#                   container runtime mounts them from the host instead (docs/edge.md):
#                   docker buildx build --platform linux/arm64 --target jetson .
#   reference:      CPU only, the numpy reference backend.
# The NVIDIA container runtime supplies the driver (libcuda, libnvidia-ml) at run time.
ARG PYTHON=3.12
ARG JETSON_BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0

FROM python:${PYTHON}-slim AS base
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="trt-heartbeat-exporter" \
      org.opencontainers.image.description="Prometheus exporter: canonical inference heartbeat per GPU" \
      org.opencontainers.image.version="${VERSION}"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN useradd --system --uid 65532 --no-create-home --home-dir /nonexistent heartbeat
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
EXPOSE 9470
HEALTHCHECK --interval=30s --timeout=3s --start-period=30s \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9470/ping', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["trt-heartbeat-exporter"]
CMD ["serve"]

FROM base AS reference
RUN pip install . && rm -rf /src
LABEL org.opencontainers.image.variant="reference"
WORKDIR /
USER 65532:65532

FROM base AS full
ARG PIP_EXTRA_INDEX_URL
ARG TENSORRT_VERSION=11.4.0.106
RUN pip install ".[gpu,tensorrt]" "tensorrt-cu13==${TENSORRT_VERSION}" && rm -rf /src
LABEL org.opencontainers.image.variant="full" com.nvidia.tensorrt.version="${TENSORRT_VERSION}"
WORKDIR /
USER 65532:65532

FROM ${JETSON_BASE} AS jetson
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="trt-heartbeat-exporter" \
      org.opencontainers.image.version="${VERSION}" org.opencontainers.image.variant="jetson"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# JetPack's own Python with its TensorRT bindings (python3-libnvinfer); cuda-python and NVRTC
# from their aarch64 wheels. No NVML on Jetson: memory comes from the probe's CUDA context.
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 65532 --no-create-home --home-dir /nonexistent heartbeat
COPY pyproject.toml README.md /src/
COPY exporter /src/exporter
# cuda-python's major must match JetPack's CUDA (r36: CUDA 12.6; JetPack 7: 13).
ARG CUDA_BINDINGS="cuda-bindings>=12.6,<13"
RUN python3 -m pip install "/src[gpu]" "${CUDA_BINDINGS}" && rm -rf /src
EXPOSE 9470
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9470/ping', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["trt-heartbeat-exporter"]
CMD ["serve", "--config", "/etc/trt-heartbeat/edge.yaml"]
COPY deploy/edge/edge.yaml /etc/trt-heartbeat/edge.yaml
WORKDIR /
USER 65532:65532

FROM base AS lean
ARG TENSORRT_VERSION=11.4.0.106
ARG TARGETARCH
RUN if [ "$TARGETARCH" = "arm64" ]; then pip install ".[gpu]"; \
    else pip install ".[gpu,tensorrt-lean]" "tensorrt-lean-cu13-libs==${TENSORRT_VERSION}" \
      "tensorrt-lean-cu13-bindings==${TENSORRT_VERSION}"; fi && rm -rf /src
LABEL org.opencontainers.image.variant="lean" com.nvidia.tensorrt.version="${TENSORRT_VERSION}"
WORKDIR /
USER 65532:65532
