# moat: the two commands the README documents.
#   make dev    set up this host and run moat in development mode
#   make test   set up this host and run every test (what .ci/run runs)
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
PORT ?= 5555

.PHONY: help setup dev test lint unit e2e fuzz bench bench-images bench-network bench-reliability install clean

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

# moat next to its baselines, measured in the same run; a table on stdout
# and target/moat-bench.json (see tests/src/bin/bench.rs).
bench: setup
	$(CARGO) build --locked --release -p moat-e2e --bin moat-bench
	MOAT_BUILD_DIR=$(CURDIR)/build MOAT_BIN_DIR=$(CURDIR)/target/release target/release/moat-bench

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


# Installs moat under $(DESTDIR)$(PREFIX) (binaries, guest kernel, agent and
# base image, systemd units, sysusers.d/tmpfiles.d entries, docs) and the
# default configs under $(DESTDIR)$(SYSCONFDIR)/moat, never replacing a
# config that is already there. Run `make setup` (or `make test`) first.
PREFIX ?= /usr
SYSCONFDIR ?= /etc
DESTDIR ?=
install:
	@for f in target/release/moat target/release/moat-broker target/release/moat-gateway \
	  target/release/moat-jailer target/release/moat-vmm build/vmlinux build/moat-agent build/base.erofs; do \
	  [ -f $$f ] || { echo "install: $$f is missing: run make setup first" >&2; exit 1; }; done
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/moat/images \
	  $(DESTDIR)$(PREFIX)/lib/systemd/system $(DESTDIR)$(PREFIX)/lib/sysusers.d \
	  $(DESTDIR)$(PREFIX)/lib/tmpfiles.d $(DESTDIR)$(PREFIX)/share/doc/moat/examples \
	  $(DESTDIR)$(SYSCONFDIR)/moat
	install -m 0755 target/release/moat target/release/moat-broker \
	  target/release/moat-gateway target/release/moat-jailer target/release/moat-vmm $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 build/vmlinux $(DESTDIR)$(PREFIX)/lib/moat/vmlinux
	install -m 0755 build/moat-agent $(DESTDIR)$(PREFIX)/lib/moat/moat-agent
	install -m 0644 build/base.erofs $(DESTDIR)$(PREFIX)/lib/moat/images/base.erofs
	for u in packaging/systemd/*.service; do \
	  sed -e 's|/usr/bin/|$(PREFIX)/bin/|g' -e 's|/etc/moat/|$(SYSCONFDIR)/moat/|g' $$u \
	    > $(DESTDIR)$(PREFIX)/lib/systemd/system/$$(basename $$u); done
	install -m 0644 packaging/sysusers.d/moat.conf $(DESTDIR)$(PREFIX)/lib/sysusers.d/moat.conf
	install -m 0644 packaging/tmpfiles.d/moat.conf $(DESTDIR)$(PREFIX)/lib/tmpfiles.d/moat.conf
	install -m 0644 README.md SECURITY.md docs/*.md $(DESTDIR)$(PREFIX)/share/doc/moat/
	install -m 0644 packaging/nginx/moat.conf $(DESTDIR)$(PREFIX)/share/doc/moat/examples/nginx-moat.conf
	for c in broker gateway; do \
	  if [ -e $(DESTDIR)$(SYSCONFDIR)/moat/$$c.toml ]; then \
	    echo "install: keeping $(DESTDIR)$(SYSCONFDIR)/moat/$$c.toml"; \
	  else \
	    sed 's|/usr/lib/moat/|$(PREFIX)/lib/moat/|g' packaging/config/$$c.toml \
	      > $(DESTDIR)$(SYSCONFDIR)/moat/$$c.toml && chmod 0644 $(DESTDIR)$(SYSCONFDIR)/moat/$$c.toml; \
	  fi; done

clean:
	rm -rf build
