# Two images from one file (deploy/kubernetes uses both):
#   docker build --target agent  -t vmad-agent:0.1.0 .   # the edge agent: no PyTorch
#   docker build --target server -t vmad-server:0.1.0 .  # trainer and controller: CPU torch
# Both run as uid 10001 (the manifests' runAsUser) with `vmad` as the entrypoint.

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vmad vmad
COPY edge_agent edge_agent
COPY trainer trainer
COPY controller controller
COPY planner planner
COPY protos protos
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/vmad \
        --shell /usr/sbin/nologin vmad
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

FROM runtime AS agent
COPY --from=wheel /wheels /wheels
# The base install is the agent's: numpy, onnxruntime, grpc, prometheus_client, no torch.
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && ! python -c "import torch" 2>/dev/null
USER 10001
ENTRYPOINT ["vmad"]
CMD ["agent", "--config", "/etc/vmad/agent.yaml"]

FROM runtime AS server
COPY --from=wheel /wheels /wheels
# torch first, from the CPU index: the default index pulls a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install "$(ls /wheels/*.whl)[train]" && rm -rf /wheels
USER 10001
ENTRYPOINT ["vmad"]
CMD ["controller", "--config", "/etc/vmad/controller.yaml"]
