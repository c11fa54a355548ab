# syntax=docker/dockerfile:1
# SMTP Mux image: build the TypeScript in one stage, ship only dist/, the selector library and the
# production node_modules in the next. tests/image.test.ts lints this file (dockerfile-utils), reads the
# runtime stage with dockerfile-ast, stages what its COPY lines name and runs it as the image would
# (check, ENTRYPOINT + CMD, the HEALTHCHECK command, SIGTERM) as an unprivileged user; with a Docker
# engine it builds and runs the image too. So in the runtime stage: COPY (not ADD) under WORKDIR, and
# exec-form ENTRYPOINT, CMD and HEALTHCHECK.
#
#   docker build -t smtpmux .
#   docker run -p 2525:2525 -p 127.0.0.1:9587:9587 -v "$PWD/config/compose:/app/config:ro" smtpmux
#
# The image listens on 0.0.0.0: configure tls (cert and key, or selfsigned: true to try it out) so
# passwords never cross the network in the clear; SMTP Mux logs an error at every start while a
# non-loopback listener allows AUTH without TLS.
#
# Config: /app/config/config.yaml (mount a folder at /app/config). Selectors named in it are looked up
# beside it, then in /app/config/selectors/, then in the bundled library at /app/selectors.

ARG NODE_IMAGE=node:24-bookworm-slim

FROM ${NODE_IMAGE} AS build
# isolated-vm ships prebuilt binaries for linux x64/arm64 glibc; the toolchain is here for the
# platforms where node-gyp has to compile it instead. Nothing of it reaches the runtime stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Dependencies first, so editing src/ reuses the cached npm ci layer.
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
RUN npm run build
RUN npm prune --omit=dev --no-audit --no-fund

FROM ${NODE_IMAGE} AS runtime
# Both listeners on every interface inside the container: SMTP (2525) and the admin HTTP one (9587:
# /metrics, /livez, /readyz, the status page). Publish 9587 only where Prometheus or you can reach it,
# or set http.token.
ENV NODE_ENV=production SMTPMUX_HOST=0.0.0.0 SMTPMUX_HTTP_HOST=0.0.0.0
WORKDIR /app
# Owned by root and read-only to the app: it writes nothing under /app (temp files go to /tmp).
COPY --from=build /app/package.json ./package.json
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY selectors ./selectors
# The node user (uid 1000) of the official image; the config mount only needs to be readable by it.
USER node
EXPOSE 2525 9587
# `health` reads /app/config/config.yaml (the default path, relative to WORKDIR) for the admin port, or
# SMTPMUX_HTTP_PORT, and expects 200 from GET /readyz on 127.0.0.1 (503 while draining on SIGTERM or
# after a failed reload). With `http: false` it checks for a 220 greeting on the SMTP port instead. Set
# SMTPMUX_CONFIG if you serve another file.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["node", "--no-node-snapshot", "dist/cli.js", "health"]
# No init process (tini): node is PID 1 and that is enough here. SMTP Mux installs its own SIGTERM and
# SIGINT handlers (a PID 1 without handlers would ignore them), drains in-flight messages and exits 0;
# SIGHUP reloads the config. It starts no child processes, so there are no orphans to reap, and
# --no-node-snapshot is given here so the CLI does not re-exec itself and put a second process between
# the signal and the server. Exec form keeps a shell from swallowing the signals. Use `docker run --init`
# if you add something that forks.
ENTRYPOINT ["node", "--no-node-snapshot", "dist/cli.js"]
CMD ["serve", "--config", "/app/config/config.yaml"]
