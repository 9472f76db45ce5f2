# telvirt: the two commands.
#   make demo   installs what is missing and runs telvirt's main job end to end
#   make test   installs what is missing and runs fmt, clippy and every test

CARGO ?= cargo

.PHONY: all deps build release test lint fmt demo clean

all: build

deps:
	@scripts/deps.sh

build: deps
	$(CARGO) build --workspace

release: deps
	$(CARGO) build --release --workspace --bins

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: lint
	$(CARGO) test --workspace

demo: release
	target/release/telvirt wasm examples --out examples/vnfs
	scripts/demo.sh target/release/telvirt

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
