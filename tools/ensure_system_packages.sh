#!/usr/bin/env bash
# Installs the Debian packages the tests drive as real programs, only when they are missing:
#   chromium  headless browser for tests/e2e/test_monitor_dashboard.py (the dashboard page)
#   prometheus  ships promtool, which checks deploy/prometheus/alerts.yml
# Called by `make test` (and `make system-packages`). The tests that need them fail, never skip,
# when they are absent, so a machine without them fails loudly instead of passing quietly.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing ${missing[*]} and no apt-get here: install them with your package manager" >&2
    exit 1
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "missing ${missing[*]}: run as root or install sudo" >&2
        exit 1
    fi
fi

echo "installing ${missing[*]} (apt-get)" >&2
"${sudo[@]}" apt-get update -qq
# The prometheus package would also start a server through systemd where one runs; only promtool is used.
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
