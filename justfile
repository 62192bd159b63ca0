# fanjet tasks. `just demo` and `just test` are all a new user needs.

set shell := ["bash", "-euo", "pipefail", "-c"]

export PATH := justfile_directory() + "/.tools/bin:" + env_var("PATH")

# List recipes.
default:
    @just --list

# Install the pinned nats-server (v2.15.1) into .tools/bin unless one is on PATH.
nats-server:
    @scripts/install-tools.sh nats-server

# Run the seed job on the embedded default: fanjet starts its own nats-server.
demo *ARGS: nats-server
    rm -rf .fanjet/demo
    cargo run --quiet -- dev --demo --store .fanjet/demo {{ARGS}}

# Run fanjet dev (manager + workers + nats-server) until Ctrl-C.
dev *ARGS: nats-server
    cargo run --quiet -- dev {{ARGS}}

# nats-py into .tools/python, for the Python worker example.
python-deps:
    @scripts/install-tools.sh python-deps

# Debian packages the tests drive (Prometheus, headless Chromium), if missing.
test-deps: python-deps
    @scripts/install-tools.sh test-deps

# Formatting, lints and every test against real nats-servers.
test: nats-server test-deps
    cargo fmt --all -- --check
    cargo clippy --all-targets -- -D warnings
    cargo test --all-targets
    cargo test --doc

# The benchmark (release build): fanjet vs raw JetStream on the same server.
bench *ARGS: nats-server
    cargo build --release --quiet --bins
    target/release/fanjet-bench {{ARGS}}

# Format the code.
fmt:
    cargo fmt --all

# Kills and freezes managers, workers, serve and NATS nodes of a 3-node
# cluster while jobs run, then checks every job (docs/RELIABILITY.md);
# figures in target/chaos/result.json, exit 1 on any violation.
# Seeded chaos run, e.g. `just chaos --seed 7 --minutes 2` (see --help).
chaos *ARGS: nats-server
    cargo build --quiet --bins
    target/debug/fanjet-chaos {{ARGS}}
