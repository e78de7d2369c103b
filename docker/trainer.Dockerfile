# Trainer for docker-compose.yml (profile "trainer"): the project with its pinned dependencies,
# running `mlflow run` entry points on a GPU against the compose tracking server.
# The build context is the repository root; trainer.Dockerfile.dockerignore keeps the
# virtual environment, local stores and data out of it.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends git libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
COPY pyproject.toml README.md MLproject conda.yaml ./
COPY mlproject ./mlproject
COPY src ./src

# The PyPI wheel of torch for Linux x86_64 bundles the CUDA runtime, so the GPU needs only the host driver.
RUN pip install --no-cache-dir .

RUN useradd --create-home --uid 1000 trainer \
    && chown -R trainer /workspace
USER trainer
