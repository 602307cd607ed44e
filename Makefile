# The two commands a new user needs (see README):
#   make run    build the example functions and serve them on http://127.0.0.1:8095
#   make test   lint and run the whole test suite (what CI runs)

CARGO ?= cargo

.PHONY: run test lint functions build

run: functions build
	./target/debug/wasmbox

test: lint
	./scripts/build-functions target/test-functions
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

functions:
	./scripts/build-functions

build:
	$(CARGO) build --workspace --bins
