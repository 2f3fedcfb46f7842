# PCB defect inspection on NVIDIA Triton: the serving image (default target) and the engine-builder image
# that makes the detector's TensorRT engine. Both start from the same NVIDIA monthly release, so the engine is
# built by the TensorRT the server loads it with (check: docs/gpu.md).
#
#   docker build -t pcb-inspect .                                        # serving
#   docker build --target engine-builder -t pcb-engine-builder .         # engine build + validation
#
# The release is pinned here once; override with --build-arg NVIDIA_RELEASE=yy.mm.
ARG NVIDIA_RELEASE=26.08

# ---- engine builder: TensorRT + polygraphy, runs tools.engine.build / tools.engine.validate on the GPU ----
FROM nvcr.io/nvidia/tensorrt:${NVIDIA_RELEASE}-py3 AS engine-builder
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /workspace
COPY docker/requirements-engine-builder.txt /tmp/requirements-engine-builder.txt
RUN python3 -m pip install --no-cache-dir -r /tmp/requirements-engine-builder.txt \
    && rm /tmp/requirements-engine-builder.txt \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin builder
COPY tools/ tools/
COPY models/ models/
USER 10001
CMD ["python3", "-m", "tools.engine.build"]

# ---- serving: Triton with the Python packages the preprocess/postprocess models import ----
FROM nvcr.io/nvidia/tritonserver:${NVIDIA_RELEASE}-py3 AS serving
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CUPY_CACHE_DIR=/tmp/cupy-kernels
COPY docker/requirements-serving.txt /tmp/requirements-serving.txt
RUN python3 -m pip install --no-cache-dir -r /tmp/requirements-serving.txt \
    && rm /tmp/requirements-serving.txt \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin triton-pcb
# The repository baked in here serves as is with --model-config-name=cpu; the GPU config needs
# pcb_defect_detector/1/model.plan, built for the serving GPU (Kubernetes mounts the built store over /models).
COPY models/ /models/
# The canary check of the liveness probe (python3 -m tools.healthcheck, run from this folder): the tools package,
# of which it imports the contract, the detections and tools/serve/healthcheck.py with its known board.
WORKDIR /opt/pcb-inspect
COPY tools/ /opt/pcb-inspect/tools/
USER 10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
ENTRYPOINT ["tritonserver", "--model-repository=/models"]
CMD []
