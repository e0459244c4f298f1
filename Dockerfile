# streamgen service image. CUDA 13 + cuDNN 9 runtime: what onnxruntime-gpu 1.31's
# CUDA provider links against. On a machine without a GPU the same image runs
# on the CPU provider (`--device auto` checks quietly before asking for CUDA).
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY streamgen ./streamgen
# The serving install only: no torch. The export toolchain (torch, transformers,
# Optimum) is made on the first start, when the model is pulled, in the /models
# volume beside it, and reused after that. The export runs on the CPU, so it
# takes PyTorch's CPU build even on a GPU machine (a tenth of the CUDA one).
RUN pip install --no-cache-dir .

# The model is pulled into this volume on first start and reused afterwards.
ENV STREAMGEN_HOME=/models \
    STREAMGEN_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    STREAMGEN_HOST=0.0.0.0 \
    STREAMGEN_PORT=8000
VOLUME /models
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s \
    CMD python3 -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/ready').status != 200)"
CMD ["streamgen", "serve"]
