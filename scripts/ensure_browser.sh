#!/usr/bin/env bash
# Make sure a headless browser is available for the report tests (tests/test_reports_browser.py,
# `python tests/browser.py reports`): Debian's chromium, its driver and a basic font.
#
# Usage:  scripts/ensure_browser.sh        (idempotent; installs with apt-get when run as root)
#
# Does nothing when chromium is already installed. Without apt-get (or without root) it
# prints what to install and exits 0: the browser tests then skip with a reason.
set -euo pipefail

have_chromium() {
    [ -n "${VLMFIT_CHROMIUM:-}" ] && [ -x "${VLMFIT_CHROMIUM}" ] && return 0
    command -v chromium >/dev/null 2>&1 || [ -x /usr/lib/chromium/chromium ]
}

if have_chromium; then
    echo "ensure_browser: chromium present ($(command -v chromium || echo /usr/lib/chromium/chromium))"
    exit 0
fi

PKGS=(chromium chromium-driver fonts-dejavu-core)
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_browser: no apt-get here; install ${PKGS[*]} (or set VLMFIT_CHROMIUM);" \
        "browser tests will skip" >&2
    exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "ensure_browser: not root and no passwordless sudo; install ${PKGS[*]};" \
            "browser tests will skip" >&2
        exit 0
    fi
fi

echo "ensure_browser: installing ${PKGS[*]} with apt-get"
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${PKGS[@]}" >/dev/null
have_chromium || { echo "ensure_browser: chromium still missing after apt-get" >&2; exit 1; }
echo "ensure_browser: $(/usr/lib/chromium/chromium --version 2>/dev/null || chromium --version)"
