# moat: the two commands the README documents.
#   make dev    set up this host and run moat in development mode
#   make test   set up this host and run every test (what .ci/run runs)
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
PORT ?= 5555

.PHONY: help setup dev test lint unit e2e fuzz bench bench-gateway clean

help:
	@echo "make dev   - install what is needed, build, run moat (gateway on 127.0.0.1:$(PORT), dev mode)"
	@echo "make test  - install what is needed, build, run lint + unit + end-to-end tests"

setup:
	packaging/dev/setup.sh release

dev: setup
	target/release/moat server start --dev --port $(PORT) --broker-config build/broker.toml

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --locked --workspace --exclude moat-e2e

e2e:
	MOAT_BUILD_DIR=$(CURDIR)/build MOAT_BIN_DIR=$(CURDIR)/target/release \
	  $(CARGO) test --locked --release -p moat-e2e -- --test-threads=2

# A short cargo-fuzz run of the gateway's request parsing and dispatch
# (FUZZ_SECONDS; new inputs go to a temp dir, seeds stay in fuzz/seeds).
FUZZ_SECONDS ?= 45
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	corpus=$$(mktemp -d) && cd fuzz && \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -s none rpc_dispatch $$corpus seeds/rpc_dispatch -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -print_final_stats=1; \
	  status=$$?; rm -rf $$corpus; exit $$status

test:
	packaging/dev/setup.sh release
	$(MAKE) lint unit fuzz e2e

bench: setup
	$(CARGO) build --locked --release -p moat-e2e --bin moat-bench-foundation
	MOAT_BUILD_DIR=$(CURDIR)/build MOAT_BIN_DIR=$(CURDIR)/target/release target/release/moat-bench-foundation

# Gateway throughput and latency with wrk (see tests/tests/gateway_bench.rs).
bench-gateway: setup
	MOAT_BUILD_DIR=$(CURDIR)/build MOAT_BIN_DIR=$(CURDIR)/target/release \
	  $(CARGO) test --locked --release -p moat-e2e --test gateway_bench -- --ignored --nocapture

clean:
	rm -rf build
