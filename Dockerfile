# CPU image: the same set-up script as `make setup`, with the embedded model and MT-Bench baked in.
#   docker build -t sp-samp .
#   docker run --rm -v "$PWD/datasets:/app/datasets" sp-samp predict --config configs/baseline.yaml --data.limit 2
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make git && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN make setup TORCH_VERSION=$TORCH_VERSION TORCH_INDEX_URL=$TORCH_INDEX_URL \
    && .venv/bin/python -c "from src.models.embedded import ensure_converted; ensure_converted('embedded:smollm2-135m-instruct')"
ENV PATH="/app/.venv/bin:$PATH" WANDB_MODE=offline
ENTRYPOINT ["python", "-m", "src"]
CMD ["--help"]
