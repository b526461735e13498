# syntax=docker/dockerfile:1
# The two images the chart runs, from one build (BuildKit: cache mounts):
#
#   docker build --target operator -t payload-manager/operator:0.1.0 .
#   docker build --target agent    -t payload-manager/agent:0.1.0 .
#
# (`make images` builds both with the chart's appVersion as the tag.)
# Everything compiles from this tree alone: the contract is compiled by
# protox, TLS is rustls, so the build needs no protoc or OpenSSL.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target/ between builds on one
# machine; the binaries are copied out of the cached target/ to be kept.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p payload-operator --bin payload-operator \
        -p payload-agent --bin payload-agent \
        -p payload-client --bin payloadctl \
    && mkdir /out \
    && cp target/release/payload-operator target/release/payload-agent target/release/payloadctl /out/ \
    && strip /out/*

# The operator: `run` (the controllers) and `catalog` (the cluster
# catalog), as the chart's Deployment starts them. No shell; non-root, as
# the chart's pod security context requires.
FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /out/payload-operator /usr/local/bin/payload-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/payload-operator"]

# The agent, with payloadctl beside it (`kubectl exec … payloadctl --agent
# /run/payload-manager/agent.sock ls`). It
# runs as root: it owns the pool's host directories (socket, RAM root,
# disk) and hands each caller its payloads by SO_PEERCRED.
FROM debian:bookworm-slim AS agent
# The object store's TLS is verified against the system's roots.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/payload-agent /out/payloadctl /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/payload-agent"]
