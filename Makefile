# telvirt: the two commands.
#   make demo   installs what is missing and runs telvirt's main job end to end
#   make test   installs what is missing and runs fmt, clippy and every test

CARGO ?= cargo

.PHONY: all deps build release guest-static qemu-next test lint fmt demo clean

all: build

deps:
	@scripts/deps.sh

build: deps
	$(CARGO) build --workspace
	$(MAKE) guest-static PROFILE_DIR=debug

release: deps
	$(CARGO) build --release --workspace --bins
	$(MAKE) guest-static PROFILE_DIR=release

# The vm guest agent runs in a busybox initramfs without a C library: link it statically (ADR
# 041) in its own target dir and put it next to telvirt, where `telvirt serve` looks for it.
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
guest-static:
	CARGO_TARGET_DIR=$(TARGET_DIR)/guest-static $(CARGO) rustc -p telvirt-guest --release --bin telvirt-guest -- -C target-feature=+crt-static
	cp $(TARGET_DIR)/guest-static/release/telvirt-guest $(TARGET_DIR)/$(PROFILE_DIR)/telvirt-guest

# A second, newer QEMU unpacked beside the system's (nothing installed system-wide), for the
# test that moves a vm live between two QEMU versions.
qemu-next: deps
	@scripts/qemu-next.sh $(TARGET_DIR)/qemu-next

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: lint qemu-next
	$(CARGO) test --workspace

demo: release
	target/release/telvirt wasm examples --out examples/vnfs
	scripts/demo.sh target/release/telvirt

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
