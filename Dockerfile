# syntax=docker/dockerfile:1
#
# WasmBox container image. Multi-stage: the build stages need internet (crates, the Rust
# wasm32-wasip1 target, WasmEdge's installer); the runtime image is Debian slim with the
# two binaries, libwasmedge and the example functions.
#
#   docker build -t wasmbox .                            # WasmEdge engine (default target)
#   docker build --target wasmtime -t wasmbox:wasmtime . # Wasmtime only, no libwasmedge
#   docker run --rm -p 8095:8095 wasmbox
#
# Without internet (no registry, no crates): `make image` builds the binaries and example
# functions on the host, makes a Debian base image from Debian's packages
# (scripts/base-image) and builds the `prebuilt` target on it (`prebuilt-wasmedge` where a
# libwasmedge is installed). RUNTIME_BASE picks the runtime stage's base image. The
# runtime stage is the same for every target, so what `make image-test` tests is what ships.
#
# Runs as an unprivileged user (uid 10001) by default: no per-worker cgroups then (the
# supervisor logs that once) but every other sandbox layer applies. For per-invocation
# CPU and memory limits run it as root with a writable cgroup file system (privileged, or
# cgroup v2 delegation): see deployment/README.md.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
ARG WASMEDGE_VERSION=0.17.1
# The runtime stage's base. scripts/base-image makes localhost/wasmbox-base:bookworm, the same
# Debian release from Debian's packages, for machines that reach no registry.
ARG RUNTIME_BASE=debian:bookworm-slim

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS source
RUN rustup target add wasm32-wasip1
WORKDIR /src
COPY . .
# The example functions, built once for both images.
RUN ./scripts/build-functions /out/functions

FROM source AS build-wasmtime
RUN cargo build --release --locked --bin wasmbox --bin wasmbox-worker \
 && install -D -m 755 target/release/wasmbox target/release/wasmbox-worker -t /out/bin \
 && objcopy --strip-debug /out/bin/wasmbox \
 && objcopy --strip-debug /out/bin/wasmbox-worker

FROM source AS build-wasmedge
ARG WASMEDGE_VERSION
# libwasmedge (with its LLVM ahead-of-time compiler) from WasmEdge's own installer, and
# libclang for wasmedge-sys's bindgen. The pipe into bash must fail the build if curl does.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# libclang-dev is not pinned: the build image's Debian release decides its version, and a
# pinned point release disappears from the archive when the next one comes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev \
 && rm -rf /var/lib/apt/lists/* \
 && curl -sSf https://raw.githubusercontent.com/WasmEdge/WasmEdge/master/utils/install_v2.sh \
    | bash -s -- -v "${WASMEDGE_VERSION}" -p /usr/local
RUN WASMEDGE_DIR=/usr/local cargo build --release --locked --features wasmedge --bin wasmbox --bin wasmbox-worker \
 && install -D -m 755 target/release/wasmbox target/release/wasmbox-worker -t /out/bin \
 && objcopy --strip-debug /out/bin/wasmbox \
 && objcopy --strip-debug /out/bin/wasmbox-worker \
 && mkdir -p /out/lib && cp -a /usr/local/lib/libwasmedge.so* /out/lib/

FROM ${RUNTIME_BASE} AS runtime
RUN useradd --system --uid 10001 --user-group --home-dir /var/cache/wasmbox --no-create-home wasmbox \
 && mkdir -p /functions /var/cache/wasmbox /var/lib/wasmbox \
 && chown wasmbox:wasmbox /var/cache/wasmbox /var/lib/wasmbox \
 && chmod 700 /var/cache/wasmbox /var/lib/wasmbox
ENV WASMBOX_LISTEN=0.0.0.0:8095 \
    WASMBOX_FUNCTIONS_DIR=/functions \
    WASMBOX_CACHE_DIR=/var/cache/wasmbox \
    WASMBOX_STATE_DIR=/var/lib/wasmbox \
    LOG_FORMAT=json
EXPOSE 8095
VOLUME ["/functions"]
# Session snapshots: mount a persistent volume here for sessions to outlive the container.
VOLUME ["/var/lib/wasmbox"]
# /healthz over bash's /dev/tcp: no HTTP client needed in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8095 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
USER 10001:10001
ENTRYPOINT ["wasmbox"]
CMD ["serve"]

# Wasmtime only: docker build --target wasmtime.
FROM runtime AS wasmtime
COPY --from=source /out/functions /functions
COPY --from=build-wasmtime /out/bin/ /usr/local/bin/
ENV WASMBOX_ENGINE=wasmtime

# Binaries and example functions built on the host (`make image`, which stages them in
# target/image): no compiler, crates or downloads inside the build.
FROM runtime AS prebuilt
COPY target/image/functions/ /functions/
COPY target/image/bin/ /usr/local/bin/
ENV WASMBOX_ENGINE=wasmtime

# The same with WasmEdge, from a libwasmedge installed on the host (`make image` stages it).
FROM runtime AS prebuilt-wasmedge
USER 0:0
COPY target/image/lib/ /usr/local/lib/
RUN ldconfig
USER 10001:10001
COPY target/image/functions/ /functions/
COPY target/image/bin/ /usr/local/bin/
ENV WASMBOX_ENGINE=wasmedge

# The default image: WasmEdge, as the original deployment ran it.
FROM runtime AS wasmedge
COPY --from=source /out/functions /functions
USER 0:0
COPY --from=build-wasmedge /out/lib/ /usr/local/lib/
RUN ldconfig
USER 10001:10001
COPY --from=build-wasmedge /out/bin/ /usr/local/bin/
ENV WASMBOX_ENGINE=wasmedge
