# keepwarm: the two commands of the README are `make run` and `make test`.
CARGO ?= cargo
LIB := target/debug/libexample_plugin.so

.PHONY: build run test lint watch bench header

## build: the host and the example plugin
build:
	$(CARGO) build -p keepwarm-cli -p example-plugin

## run: build, then start the host on the example plugin with its prompt
run: build
	./target/debug/keepwarm run $(LIB)

## test: lint, then every test (unit, doc, end-to-end with real cargo builds)
test: lint
	$(CARGO) test --workspace

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

## bench: criterion benchmarks (cache cost, memoized fib, reload latency); see BENCHMARKS.md
bench:
	$(CARGO) bench -p keepwarm-tests

## header: regenerate plugin-api/include/keepwarm.h from plugin-api/abi/src/lib.rs
header:
	KEEPWARM_BLESS=1 $(CARGO) test -p keepwarm-abi --test header
