# `make test` and `make demo` set up everything they need on a fresh Debian machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test test-fast demo demo-down deps venv lint bench clean chaos

deps:
	@scripts/install-deps.sh

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The fakes the agent's tests use are held to the agent's ports (neti/agent/ports.py) too.
MYPY_FAKES := tests/support tests/agent/fakeagent.py

test: deps venv
	$(BIN)/ruff check neti tests bench
	$(BIN)/mypy neti $(MYPY_FAKES)
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/pytest -q

# The fast tier: no root, no ZooKeeper, no servers or child processes that take seconds
# (pytest markers root, zk, chaos and slow leave tests out; README.md, "Testing"), on two
# pytest-xdist workers (the tier shares nothing between tests). Under a minute; `make test`
# runs everything, one test at a time (namespaces, ports and servers are shared there).
FAST := not zk and not root and not chaos and not slow
FAST_WORKERS ?= 2
test-fast: venv
	$(BIN)/pytest -q -n $(FAST_WORKERS) -m "$(FAST)" $(FAST_ARGS)

# Needs root. The chaos suite (tests/chaos/): a 3-server ZooKeeper ensemble, four agents and
# faults, a few minutes; `make test` skips it (its tests run only under -m chaos).
chaos: deps venv
	$(BIN)/pytest -q -m chaos tests/chaos $(CHAOS_ARGS)

# lint-imports: the layers and cycles contracts in setup.cfg (docs/architecture.md, "Layers").
lint: venv
	$(BIN)/ruff check neti tests bench
	$(BIN)/ruff format --check neti tests bench
	$(BIN)/mypy neti $(MYPY_FAKES)
	$(BIN)/lint-imports --no-cache --no-logo

# Needs root (network namespaces). Stays up until Ctrl-C; runs once and exits when stdin is
# not a terminal (CI). `python -m neti.lab.demo --once` always runs once.
demo: deps venv
	$(BIN)/python -m neti.lab.demo $(DEMO_ARGS)

demo-down: venv
	$(BIN)/python -m neti.lab.demo --down

# Needs root. Kernel cost against fleet size (docs/performance.md): connection rates and apply
# times for both backends at 1 to 16,000 members in the default overlay_subnet 192.168.0.0/18,
# about 8 minutes. 64,000 members need a bigger overlay, about 15 minutes:
# BENCH_ARGS="--sizes 1,1000,16000,64000 --subnet 172.16.0.0/16"; `python -m bench.run --help`.
bench: deps venv
	mkdir -p bench/bin
	gcc -O2 -Wall -pthread -o bench/bin/connrate bench/connrate.c
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Needs root. The control plane's cost of one member's change (docs/performance.md): ZooKeeper
# and one real agent in network namespaces, 1,000 and 16,000 members, about 15 minutes.
# BENCH_CONTROL_ARGS="--backend nftables --agent-tree /path/to/other/checkout" and so on.
.PHONY: bench-control
bench-control: deps venv
	$(BIN)/python -m bench.control $(BENCH_CONTROL_ARGS)

# Needs root. What encryption costs (docs/performance.md, "Encryption"): Neti's WireGuard
# interface with 16,000 peers, and connections and throughput through the tunnel against
# cleartext DNAT between two namespaces, a few minutes. BENCH_ENCRYPTION_ARGS="--peers 1000".
.PHONY: bench-encryption
bench-encryption: deps venv
	mkdir -p bench/bin
	gcc -O2 -Wall -pthread -o bench/bin/connrate bench/connrate.c
	$(BIN)/python -m bench.encryption --markdown $(BENCH_ENCRYPTION_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
