#!/usr/bin/env bash
# Installs what Bazaar's tests need on a fresh machine, and skips what is
# already there. Idempotent: safe to run before every test run.
#
# Today the tests need cargo-nextest (the test runner) and curl (the
# README walk-through test runs the README's curl commands). Later issues add
# real tools here (grpcurl, promtool, etcd, Chromium...), each from a
# package registry as ../shared/TOOLS.md describes.
set -euo pipefail

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
