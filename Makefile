# hotswap — build, test, lint and demo. Needs only a Rust toolchain.
CARGO ?= cargo

.PHONY: all build test lint fmt demo clean fuzz

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

## fuzz: run each fuzz target for FUZZ_SECONDS (default 600) with nightly and cargo-fuzz (docs/fuzzing.md)
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= manifest artifact unpack messages
FUZZ_CARGO ?= cargo +nightly
fuzz:
	for target in $(FUZZ_TARGETS); do \
		$(FUZZ_CARGO) fuzz run $$target -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

## demo: a local fleet on loopback: control plane, three agents in two environments
demo: build
	./scripts/demo.sh

clean:
	$(CARGO) clean
