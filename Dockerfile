# syntax=docker/dockerfile:1
# The fleetroute image: `docker build -t fleetroute:0.1.0 .` then `docker run -p 8080:8080 fleetroute:0.1.0
# serve --replica http://HOST:8000`. The Helm chart (helm/fleetroute) and deploy/ run it as uid 10001 with
# a read-only root filesystem.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what `pip install .` packages: see [tool.setuptools] in pyproject.toml.
COPY pyproject.toml README.md ./
COPY router ./router
COPY policies ./policies
COPY emulator ./emulator
COPY loadgen ./loadgen
RUN python -m venv /opt/fleetroute && /opt/fleetroute/bin/pip install .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 fleetroute \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin fleetroute
COPY --from=build /opt/fleetroute /opt/fleetroute
ENV PATH=/opt/fleetroute/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 8081
ENTRYPOINT ["fleetroute"]
CMD ["serve"]
