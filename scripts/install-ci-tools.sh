#!/usr/bin/env bash
# Installs the system tools some tests need, when they are missing: Prometheus and promtool (Debian
# package "prometheus") for tests/test_prometheus_e2e.py. Idempotent: does nothing when they are there.
# Without them those tests skip; this script makes CI run them. Exits non-zero if an install fails.
set -euo pipefail

need=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need+=(prometheus)

if [ ${#need[@]} -eq 0 ]; then
    echo "install-ci-tools: prometheus and promtool already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-ci-tools: apt-get not found; install ${need[*]} by hand" >&2
    exit 1
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "install-ci-tools: need root (or passwordless sudo) to install ${need[*]}" >&2
        exit 1
    fi
fi

echo "install-ci-tools: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
prometheus --version 2>&1 | head -n 1
