# The two commands a new user needs (see README):
#   make run    build the example functions and serve them on http://127.0.0.1:8095
#   make test   lint and run the whole test suite (what CI runs)

CARGO ?= cargo

.PHONY: run test test-wasmedge lint functions build bench bench-quick image image-test

run: functions build
	./target/release/wasmbox

# Release builds throughout: one optimized build of every dependency serves the suite and
# the image (make image-test builds the binaries it ships from the same build). The suite's
# binaries also have the fault-injection hooks (feature test-hooks, which the end-to-end
# tests build them with); the image's never do.
test: lint
	./scripts/build-functions target/test-functions
	$(CARGO) test --release --workspace
	./scripts/image-test

# The last step type-checks the WasmEdge engine against wasmedge-sys's bundled bindings (no
# libwasmedge needed), in its own target directory so the normal build is untouched.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	DOCS_RS=1 CARGO_TARGET_DIR=target/docs-rs $(CARGO) clippy --workspace --all-targets --features wasmedge -- -D warnings

# Where libwasmedge 0.17 is installed (WASMEDGE_DIR, /usr/local or ~/.wasmedge): the worker
# with both engines and the conformance suite against each, then every end-to-end test
# (hostile corpus, hardening, faults...) again with WasmEdge as the engine.
test-wasmedge:
	./scripts/build-functions target/test-functions
	$(CARGO) test --workspace --features wasmedge
	WASMBOX_TEST_ENGINE=wasmedge $(CARGO) test --features wasmedge -p wasmbox-integration --test all

functions:
	./scripts/build-functions

# The container image from binaries and example functions built here, on a Debian base made
# here (scripts/base-image): no registry or downloads needed. RUNTIME_BASE=debian:bookworm-slim
# builds on the registry's base instead. podman or docker (CONTAINER_ENGINE).
image:
	./scripts/image

# The image run for real (integration/tests/container): skipped, with one line, where no
# container engine can run.
image-test:
	./scripts/image-test

build:
	$(CARGO) build --release --workspace --bins

# The benchmark report (benchmarks/results/full.md, .svg, .json): release binaries, every
# mode side by side, about 6 minutes. bench-quick: the same in under a minute, for smoke runs.
bench: functions
	$(CARGO) build --release --bins
	./target/release/wasmbox-bench run

bench-quick: functions
	$(CARGO) build --release --bins
	./target/release/wasmbox-bench run --quick
