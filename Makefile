# keepwarm: the two commands of the README are `make run` and `make test`.
CARGO ?= cargo
PYTHON ?= python3
LIB := target/debug/libexample_plugin.so
TARGET := $(or $(CARGO_TARGET_DIR),target)
PY_VENV := $(TARGET)/py-venv
BENCH_VENV := $(TARGET)/bench-venv

.PHONY: build run test py-test lint watch bench py-bench header

## build: the host and the example plugin
build:
	$(CARGO) build -p keepwarm-cli -p example-plugin

## run: build, then start the host on the example plugin with its prompt
run: build
	./target/debug/keepwarm run $(LIB)

## test: lint, then every test (unit, doc, end-to-end with real cargo builds, the Python client's)
test: lint
	$(CARGO) test --workspace
	$(MAKE) py-test

## py-test: the Python client's tests (pytest, in its own venv) against the built `keepwarm serve`
py-test:
	$(CARGO) build -p keepwarm-cli
	test -x $(PY_VENV)/bin/python || $(PYTHON) -m venv $(PY_VENV)
	$(PY_VENV)/bin/pip install -q pytest
	$(PY_VENV)/bin/pip install -q --force-reinstall --no-deps ./clients/python
	KEEPWARM_BIN=$(abspath $(TARGET))/debug/keepwarm $(PY_VENV)/bin/pytest -q -p no:cacheprovider clients/python/tests

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## watch: rebuild the example plugin on every source change, beside `make run`
## (cargo-watch if installed; else `keepwarm dev --build-only`, which serves nothing)
watch:
	@if $(CARGO) watch --version >/dev/null 2>&1; then \
		$(CARGO) watch -w example-plugin -w plugin-api -x 'build -p example-plugin'; \
	else \
		echo "cargo-watch is not installed (cargo install cargo-watch); rebuilding with keepwarm dev --build-only (the host of make run reloads each build)"; \
		$(CARGO) build -p keepwarm-cli && ./target/debug/keepwarm dev -p example-plugin --build-only; \
	fi

## bench: criterion benchmarks (cache cost, memoized fib, reload latency), then the Python client's; see BENCHMARKS.md
bench:
	$(CARGO) bench -p keepwarm-tests
	$(MAKE) py-bench

## py-bench: @keepwarm.memo against functools.lru_cache, diskcache and joblib.Memory (from PyPI, in their own venv)
py-bench:
	$(CARGO) build --release -p keepwarm-cli
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q diskcache joblib
	$(BENCH_VENV)/bin/pip install -q --force-reinstall --no-deps ./clients/python
	KEEPWARM_BIN=$(abspath $(TARGET))/release/keepwarm $(BENCH_VENV)/bin/python clients/python/bench.py

## header: regenerate plugin-api/include/keepwarm.h from plugin-api/abi/src/lib.rs
header:
	KEEPWARM_BLESS=1 $(CARGO) test -p keepwarm-abi --test header
