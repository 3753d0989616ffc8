# moat: the two commands the README documents.
#   make dev    set up this host and run moat in development mode
#   make test   set up this host and run every test (what .ci/run runs)
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
PORT ?= 5555

.PHONY: help setup dev test lint unit e2e fuzz bench bench-gateway bench-images bench-network bench-reliability clean

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

# A short cargo-fuzz run of each target: the gateway's request parsing and
# dispatch, the OCI layer unpacker and the sandbox DNS responder
# (FUZZ_SECONDS in all, split between them; new inputs go to a temp dir,
# seeds stay in fuzz/seeds).
FUZZ_SECONDS ?= 75
FUZZ_TARGETS = rpc_dispatch layer_unpack dns_query
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	for target in $(FUZZ_TARGETS); do \
	  corpus=$$(mktemp -d) && ( cd fuzz && \
	    RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -s none $$target $$corpus seeds/$$target -- \
	      -max_total_time=$$(( $(FUZZ_SECONDS) / $(words $(FUZZ_TARGETS)) )) -rss_limit_mb=2048 -print_final_stats=1 ); \
	  status=$$?; rm -rf $$corpus; [ $$status -eq 0 ] || exit $$status; \
	done

test:
	packaging/dev/setup.sh release
	$(MAKE) lint unit fuzz e2e

bench: setup
	$(CARGO) build --locked --release -p moat-e2e --bin moat-bench-foundation
	MOAT_BUILD_DIR=$(CURDIR)/build MOAT_BIN_DIR=$(CURDIR)/target/release target/release/moat-bench-foundation

# Image import (unpack + boot disk) throughput and loopback-registry pull
# time, next to tar/mkfs.erofs and skopeo baselines (see tests/src/bin/bench_images.rs).
bench-images: setup
	$(CARGO) build --locked --release -p moat-e2e --bin moat-bench-images
	MOAT_BUILD_DIR=$(CURDIR)/build MOAT_BIN_DIR=$(CURDIR)/target/release target/release/moat-bench-images

# Guest networking: throughput and connect latency to a test host in its own
# network namespace, and the start-time cost of a NIC (tests/src/bin/bench_network.rs).
bench-network: setup
	$(CARGO) build --locked --release -p moat-e2e --bin moat-bench-network
	MOAT_BUILD_DIR=$(CURDIR)/build MOAT_BIN_DIR=$(CURDIR)/target/release target/release/moat-bench-network

# Broker crash -> every running sandbox answering again (re-adoption), next
# to starting them cold; churn cycles per minute (tests/src/bin/bench_reliability.rs).
bench-reliability: setup
	$(CARGO) build --locked --release -p moat-e2e --bin moat-bench-reliability
	MOAT_BUILD_DIR=$(CURDIR)/build MOAT_BIN_DIR=$(CURDIR)/target/release target/release/moat-bench-reliability

# Gateway throughput and latency with wrk (see tests/tests/gateway_bench.rs).
bench-gateway: setup
	MOAT_BUILD_DIR=$(CURDIR)/build MOAT_BIN_DIR=$(CURDIR)/target/release \
	  $(CARGO) test --locked --release -p moat-e2e --test gateway_bench -- --ignored --nocapture

clean:
	rm -rf build
