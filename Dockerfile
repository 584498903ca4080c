# ShardBroker in a container: non-root, the data directory a volume. See docs/OPERATIONS.md ("Docker").
#   docker build -t shardbroker .
#   docker run -d --name mqtt -p 1883:1883 -v shardbroker-data:/data shardbroker
#   docker kill --signal HUP mqtt     # reload the configuration (nobody is disconnected)
#   docker stop -t 30 mqtt            # orderly shutdown (SIGTERM), within server.shutdown_timeout
FROM python:3.11-slim AS build

# A C compiler in this stage only: the wheel built here has the hot path compiled (setup.py,
# shardbroker/_compiled.py); the image below gets the wheel, not the compiler.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY shardbroker ./shardbroker
COPY storage ./storage
COPY cli ./cli
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid/gid, so that a bind-mounted data directory can be given to it: chown 1883:1883 DIR
RUN groupadd --system --gid 1883 shardbroker \
 && useradd --system --uid 1883 --gid shardbroker --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin shardbroker \
 && mkdir /data && chown shardbroker:shardbroker /data && chmod 0750 /data

COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
COPY contrib/shardbroker.toml /etc/shardbroker/shardbroker.toml

USER shardbroker
WORKDIR /data
VOLUME ["/data"]
EXPOSE 1883
# Every shard and the acceptor answer on the control socket (exit 1 when one does not, 2 when
# the broker does not run).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD shardbroker ctl --data-dir /data --timeout 5 stats --json > /dev/null || exit 1
STOPSIGNAL SIGTERM
# The flags win over the file: the data directory is the volume, and the container listens on
# every address (publish the port with -p).
CMD ["shardbroker", "serve", "--config", "/etc/shardbroker/shardbroker.toml", "--host", "0.0.0.0", "--data-dir", "/data"]
