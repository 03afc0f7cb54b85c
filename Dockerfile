# CPU image by default. For CUDA: docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    HF_HUB_DISABLE_TELEMETRY=1 \
    RAY_USAGE_STATS_ENABLED=0

RUN apt-get update && apt-get install -y --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/evomerge
# torch first, from the chosen index, so the project install keeps it instead of pulling another build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml constraints.txt README.md ./
COPY evomerge ./evomerge
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt .
COPY search_spaces ./search_spaces
COPY evaluators ./evaluators
COPY experiments ./experiments

RUN useradd --create-home evomerge && chown -R evomerge /opt/evomerge
USER evomerge
ENTRYPOINT ["evomerge"]
CMD ["--help"]
