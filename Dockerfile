# FindLady API and worker image (CPU). The same image runs `findlady serve` (default) and
# `findlady worker` (see docker-compose.yml). For CUDA workers build with a CUDA torch:
#   docker build --build-arg TORCH_INDEX=<a CUDA wheel index> -t findlady:cuda .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FINDLADY_DATA_DIR=/data

# torch first, from the CPU index: a bare `torch` requirement would pull a multi-GB CUDA build.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /srv/findlady
COPY pyproject.toml README.md alembic.ini ./
COPY findlady_core ./findlady_core
COPY findlady_examples ./findlady_examples
COPY findlady_cli ./findlady_cli
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
# Editable install: the migrations folder stays next to the code that runs it.
RUN pip install -e . \
 && useradd --system --uid 10001 --home-dir /srv/findlady --shell /usr/sbin/nologin findlady \
 && mkdir -p /data \
 && chown findlady:findlady /data

USER findlady
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["findlady", "serve", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
