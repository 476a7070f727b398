# hotswap — build, test, lint and demo. Needs only a Rust toolchain.
CARGO ?= cargo

.PHONY: all build test lint fmt demo clean

all: build

## build: compile every binary (debug)
build:
	$(CARGO) build --workspace --bins

## test: unit, property and integration tests (integration tests spawn the built binaries)
test: build
	$(CARGO) test --workspace

## lint: formatting and clippy with warnings as errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## demo: a local fleet on loopback: control plane, three agents in two environments
demo: build
	./scripts/demo.sh

clean:
	$(CARGO) clean
