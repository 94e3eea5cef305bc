# Multi-stage image: the first stage builds the client (its wheel build generates
# the stubs from protos/) and the server into a venv; the runtime stage holds that
# venv alone (no Redis: point it at one with TALLY_REDIS_URL) and runs as a
# non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY protos protos
COPY client client
COPY src src
RUN python -m venv /opt/tally \
 && /opt/tally/bin/pip install --no-cache-dir -c constraints.txt ./client .

FROM python:3.11-slim
# A fixed uid and gid, so Kubernetes' runAsUser/runAsGroup/fsGroup can name them.
RUN groupadd --system --gid 10001 tally \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /var/lib/tally tally
COPY --from=build /opt/tally /opt/tally
USER tally
WORKDIR /var/lib/tally
# The image holds no redis-server: set TALLY_REDIS_URL (redis://:PASSWORD@host:6379/0,
# a Redis with appendonly yes and maxmemory-policy noeviction; see README, Durability),
# passed as a variable rather than a flag, which `ps` would show. Without it the start
# stops at once (exit 3: the embedded default has no redis-server to run). The ledger
# defaults to SQLite under the /var/lib/tally volume (one replica); a fleet sets
# TALLY_LEDGER_URL=postgresql://... (deploy/compose, deploy/k8s).
# All interfaces, every call authenticated (a bearer token from `tally tokens create`,
# see README, Authentication; or a mapped client certificate). The first admin token
# can come from a file you wrote and mount read-only (README, Docker):
#   -v "$PWD/bootstrap-token:/run/secrets/tally-bootstrap-token:ro"
#   -e TALLY_BOOTSTRAP_TOKEN_FILE=/run/secrets/tally-bootstrap-token
# registered at start as an unscoped admin, once (a revoked one stays revoked).
# TLS material comes from files mounted read-only, e.g. at /etc/tally/tls:
#   -e TALLY_TLS_CERT=/etc/tally/tls/server.pem -e TALLY_TLS_KEY=/etc/tally/tls/server.key
#   [-e TALLY_TLS_CLIENT_CA=/etc/tally/tls/clients-ca.pem]
# and TALLY_TLS_CA=/etc/tally/tls/ca.pem for the health check (see README, Docker).
# Prometheus /metrics on every interface of the container (it has no authentication:
# publish port 9464 on a private network only). `tally flusher` reads the same variables.
ENV PATH=/opt/tally/bin:$PATH \
    TALLY_LISTEN=0.0.0.0:50051 \
    TALLY_AUTH=required \
    TALLY_DATA_DIR=/var/lib/tally \
    TALLY_METRICS_LISTEN=0.0.0.0:9464 \
    TALLY_METRICS_ALLOW_REMOTE=true \
    PYTHONUNBUFFERED=1
VOLUME /var/lib/tally
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["tally", "health", "--target", "127.0.0.1:50051"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tally", "serve"]
