# hotswap — build, test, lint and demo. Needs only a Rust toolchain; the few test
# tools from outside Rust are installed by `make deps` (run by test and chaos) as root.
CARGO ?= cargo

.PHONY: all build deps test lint fmt demo clean fuzz chaos bench

all: build

## build: compile every binary (debug)
build:
	$(CARGO) build --workspace --bins

## deps: what the tests need beyond Rust (Python grpcio, Prometheus, libfaketime):
## installed by scripts/ci-deps.sh when run as root (idempotent), otherwise only
## checked, naming whatever is missing and the command that installs it
deps:
	@if [ "$$(id -u)" -eq 0 ]; then bash scripts/ci-deps.sh; else bash scripts/ci-deps.sh --check; fi

## test: unit, property and integration tests (integration tests spawn the built binaries)
test: deps build
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

## chaos: the chaos suites (tests/tests/chaos.rs, and chaos_ha.rs on etcd) with
## CHAOS_TRIALS trials per scenario; make test runs the same scenarios with 2 trials
## each (1 for those of chaos_ha). Results: docs/reliability.md
CHAOS_TRIALS ?= 25
chaos: deps build
	bash -o pipefail -c 'for suite in chaos chaos_ha; do HOTSWAP_CHAOS_TRIALS=$(CHAOS_TRIALS) $(CARGO) test -p hotswap-tests --test $$suite -- --nocapture --test-threads 1 2>&1 || exit 1; done | tee target/chaos.log | grep -E "CHAOS|\.\.\. |^ok$$|FAILED|panicked|test result"'

## bench: every benchmark of BENCHMARKS.md (release build; BENCH=name for one); results in target/bench/
bench:
	./scripts/bench.sh

## demo: a local fleet on loopback: control plane, three agents in two environments
demo: build
	./scripts/demo.sh

clean:
	$(CARGO) clean
