# The proxy in a container, on Debian 12. Not built in CI (`docker build .`).
#
# Stable Rust only: without the eBPF object (`cargo xtask build` makes it with
# the nightly toolchain and bpf-linker) the binary has the splice and copy
# planes, the default; --mode fastpath and --steering sk_lookup refuse to
# start, saying so. They also need CAP_BPF and CAP_NET_ADMIN, which a
# container rarely has.
FROM rust:1-bookworm AS build
# etcd-client compiles etcd's .proto files at build time (prost-build), and
# they import protobuf's own, which Debian ships in libprotobuf-dev.
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p proxy-user

FROM debian:bookworm-slim
COPY --from=build /src/target/release/proxy /usr/bin/proxy
COPY deploy/config.json /etc/l4-proxy/config.json
# Fails the image build if the shipped config does not validate.
RUN ["/usr/bin/proxy", "--check", "/etc/l4-proxy/config.json"]
USER 65534:65534
# 8080: the example app; 9100: admin (/metrics, /healthz, /readyz, /config, /targets).
EXPOSE 8080 9100
# SIGTERM drains live connections for --drain-timeout (30s): give the
# container at least that long to stop (docker stop -t 45, terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/proxy"]
CMD ["--config", "/etc/l4-proxy/config.json", "--admin-address", "0.0.0.0:9100", "--log-format", "json"]
