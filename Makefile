# moat: the two commands the README documents.
#   make dev    set up this host and run moat in development mode
#   make test   set up this host and run every test (what .ci/run runs)
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
PORT ?= 5555

.PHONY: help setup dev test lint unit e2e clean

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

test:
	packaging/dev/setup.sh release
	$(MAKE) lint unit e2e

clean:
	rm -rf build
