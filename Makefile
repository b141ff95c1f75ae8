# The two commands a newcomer needs: `make run` and `make test`.
# Builds share one target dir outside the clone, so CI and fresh clones reuse compiled
# dependencies (fhirbolt takes minutes to build from scratch).
CARGO_TARGET_DIR ?= $(HOME)/.cache/roster/target
export CARGO_TARGET_DIR
SERVICES := scripts/services.sh
# `make test` keeps the suite's output here and repeats its failures last (CI shows the tail).
TEST_LOG := .local/test-output.log
SHELL := /bin/bash

.PHONY: run test bench fuzz services-up services-down fmt lint

## run: start the local services, apply migrations, serve on 127.0.0.1:8080
## (PROFILE=release: an optimized server, ~12 min to build cold, several times faster to serve)
PROFILE ?= debug
run: services-up
	cargo build --bin roster $(if $(filter release,$(PROFILE)),--release,)
	eval "$$($(SERVICES) env dev)" && $(CARGO_TARGET_DIR)/$(PROFILE)/roster serve

## test: start the test services (own ports and data), run the whole suite, then the
## MongoDB command counts alone (their batching depends on time: not beside 8 test threads), stop them
test:
	cargo build --workspace --tests --bin roster
	$(SERVICES) stop test
	rm -rf .local/test
	$(SERVICES) start test
	eval "$$($(SERVICES) env test)" && cargo test --workspace --no-fail-fast -- --test-threads=$${TEST_THREADS:-8} --show-output \
	  2>&1 | tee $(TEST_LOG); status=$${PIPESTATUS[0]}; \
	  eval "$$($(SERVICES) env test)" && cargo test --test api -- --ignored --exact costs::mongodb_commands_per_write --show-output \
	  || status=1; [ -n "$$KEEP_SERVICES" ] || $(SERVICES) stop test; \
	  if [ $$status != 0 ]; then echo "== failures of the suite (from $(TEST_LOG)) =="; \
	    awk '/^failures:$$/{f=1} f{print} /^test result:/{f=0}' $(TEST_LOG) | tail -n 300; fi; exit $$status

## bench: release build, fresh services (the test profile's ports and data), results in docs/benchmarks.md
## (BENCH_ARGS=--quick for a smoke run at a tenth of the sizes)
BENCH_TARGET_DIR ?= $(HOME)/.cache/roster/target-bench
bench:
	CARGO_TARGET_DIR=$(BENCH_TARGET_DIR) cargo build --release --bin roster --example bench --example bench_events --example bench_writes --example bench_search
	$(SERVICES) stop test
	rm -rf .local/test
	$(SERVICES) start test
	eval "$$($(SERVICES) env test)" && $(BENCH_TARGET_DIR)/release/examples/bench $(BENCH_ARGS) \
	  && $(BENCH_TARGET_DIR)/release/examples/bench_events $(BENCH_ARGS) \
	  && $(BENCH_TARGET_DIR)/release/examples/bench_writes $(BENCH_ARGS) \
	  && $(BENCH_TARGET_DIR)/release/examples/bench_search $(BENCH_ARGS); \
	  status=$$?; $(SERVICES) stop test; exit $$status

## fuzz: the property tests (no parser input panics; a failed patch changes nothing) with
## FUZZ_CASES cases each (default a million), optimized; `make test` runs 256 of each
FUZZ_CASES ?= 1000000
fuzz:
	CARGO_TARGET_DIR=$(BENCH_TARGET_DIR) PROPTEST_CASES=$(FUZZ_CASES) cargo test --release --lib properties -- --test-threads=2

services-up:
	$(SERVICES) start dev

services-down:
	$(SERVICES) stop dev

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
