#!/usr/bin/env bash
# Installs what Bazaar's tests need on a fresh machine, and skips what is
# already there. Idempotent: safe to run before every test run.
#
# Today the tests need only cargo-nextest (the test runner). Later issues
# add real tools here (grpcurl, promtool, etcd, Chromium...), each from a
# package registry as ../shared/TOOLS.md describes.
set -euo pipefail

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "install-test-tools: installing cargo-nextest" >&2
    cargo install cargo-nextest --locked
fi
