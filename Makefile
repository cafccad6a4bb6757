# rangekv — set-up, build and test. Two commands matter: `make run` and `make test`.
#
# One target directory outside the clone, shared by local runs and CI on the same
# machine, so a fresh clone does not rebuild RocksDB (~9 min cold on 2 cores).
CARGO_TARGET_DIR ?= $(HOME)/.cache/rangekv/target
CARGO_BUILD_JOBS ?= 2
export CARGO_TARGET_DIR CARGO_BUILD_JOBS

# Debian packages the build and the tests need:
#   clang, libclang-dev  bindgen for the RocksDB bindings (librocksdb-sys)
#   python3-seccomp      runs the log tests under a seccomp filter denying io_uring
#   protobuf-compiler    protoc on PATH for the etcd-client crate's build (bench only;
#                        our own protos use the vendored protoc)
#   etcd-server          etcd 3.4, the YCSB bench's yardstick (--compare etcd)
#   iproute2, iptables   the fault test's network namespaces and partitions (as root)
APT_PACKAGES := clang libclang-dev python3-seccomp protobuf-compiler etcd-server iproute2 iptables

SUDO := $(shell [ "$$(id -u)" = 0 ] && echo "" || (command -v sudo >/dev/null 2>&1 && echo sudo || echo MISSING))

.PHONY: run test deps build release fmt clippy unit-test help bench-log fuzz-smoke fuzz-tools nemesis sim

help:
	@echo "make run        build release and run a local cluster (PD + 3 nodes) until Ctrl-C"
	@echo "make test       formatting, clippy and the whole test suite"
	@echo "make bench-log  the raft log engine beside raft-engine, RocksDB and the device floor"
	@echo "make fuzz-smoke every fuzz target for FUZZ_SECONDS (fuzz/README.md)"
	@echo "make nemesis    the fault test for NEMESIS_SECS (default 1800), report in nemesis.json"
	@echo "make sim        the seeded raft simulation (SEED=n replays one seed, SIM_SEEDS=k runs k)"

deps:
	@command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (https://rustup.rs) first"; exit 1; }
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$(SUDO)" = MISSING ]; then \
	    echo "missing Debian packages:$$missing"; \
	    echo "run: sudo apt-get update && sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing; \
	fi
	@rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy 2>/dev/null || true

build: deps
	cargo build --workspace

release: deps
	cargo build --release --bin rangekv

fmt:
	cargo fmt --all

clippy: deps
	cargo clippy --workspace --all-targets -- -D warnings

unit-test: deps
	@if cargo nextest --version >/dev/null 2>&1; then \
	  cargo nextest run --workspace --no-fail-fast; \
	else \
	  cargo test --workspace --no-fail-fast; \
	fi

test: deps
	cargo fmt --all -- --check
	$(MAKE) --no-print-directory clippy
	$(MAKE) --no-print-directory unit-test
	$(MAKE) --no-print-directory fuzz-smoke FUZZ_SECONDS=$(TEST_FUZZ_SECONDS)

# Fuzzing (cargo-fuzz, nightly toolchain; its own target directory, as its builds are
# instrumented). `make test` runs each target for TEST_FUZZ_SECONDS.
TEST_FUZZ_SECONDS ?= 8
FUZZ_SECONDS ?= 25
FUZZ_TARGET_DIR ?= $(HOME)/.cache/rangekv/fuzz-target

fuzz-tools:
	@if cargo +nightly --version >/dev/null 2>&1 && ! cargo +nightly fuzz --version >/dev/null 2>&1; then \
	  echo "installing cargo-fuzz"; cargo install cargo-fuzz --locked; \
	fi

# The seeded simulation (engine/raftstore/tests/sim.rs): 200 seeds run in `make test`;
# `SEED=n make sim` replays seed n with its trace, `SIM_SEEDS=k make sim` runs k seeds.
# The test reads SIM_SEED, not SEED: a SEED meant for something else in the
# environment must not change (or break) the 200 seeds of `make test`.
sim: deps
	$(if $(SEED),SIM_SEED=$(SEED)) cargo test -p rangekv-raftstore --test sim -- --exact simulation --nocapture

# The nemesis test (tests/nemesis.rs) for longer than `make test` runs it; cargo test
# rather than nextest, whose per-test timeout would stop it.
NEMESIS_SECS ?= 1800
nemesis: deps
	NEMESIS_SECS=$(NEMESIS_SECS) NEMESIS_REPORT=$(CURDIR)/nemesis.json cargo test --test nemesis -- --nocapture

fuzz-smoke: fuzz-tools
	CARGO_TARGET_DIR=$(FUZZ_TARGET_DIR) CARGO_BUILD_JOBS=$(CARGO_BUILD_JOBS) FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/smoke.sh

# A local cluster: PD on 127.0.0.1:2379, nodes on 20160-20162, data under
# ./rangekv-local (kept between runs); loads 100,000 YCSB records, runs 15 s of
# YCSB-A with a live progress line, prints the summary, then serves until Ctrl-C.
run: release
	$(CARGO_TARGET_DIR)/release/rangekv local --dir rangekv-local --demo-records 100000 --demo-seconds 15

bench-log: release
	$(CARGO_TARGET_DIR)/release/rangekv bench log --ranges 100 --writers 64 --entry-bytes 1024 --seconds 5 --compare raft-engine,rocksdb,raft-engine-batched,rangekv-batched,device-floor
