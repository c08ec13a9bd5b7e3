#!/usr/bin/env bash
# Browser test: MQTT.js (npm `mqtt`) in headless Chromium against petrel over ws:// and wss://,
# MQTT 3.1.1 and 5.0, plus a refused wrong path. See run.mjs for what each case checks.
#
# Usage: tests/browser/run.sh
#   Installs what is missing (Debian's chromium, the npm packages in tests/browser), builds the
#   petrel binary (debug), then runs `node tests/browser/run.mjs`, which prints one PASS/FAIL
#   line per case and "N passed, M failed", and exits non-zero if anything failed.
#   PETREL_BIN=/path/to/petrel skips the build; CHROMIUM=/path/to/chromium picks the browser.
# Every step is bounded with `timeout`; the test itself takes well under 90 s.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="$ROOT/tests/browser"

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo -n "$@"; fi; }

# Debian's Chromium, unless CHROMIUM names another one.
if [[ -z ${CHROMIUM:-} && ! -x /usr/bin/chromium ]]; then
    echo "installing chromium"
    as_root timeout 300 apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium >/dev/null
    [[ -x /usr/bin/chromium ]] || { echo "run.sh: still no /usr/bin/chromium after apt-get install" >&2; exit 1; }
fi
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
export CHROMIUM

for tool in node npm openssl; do
    command -v "$tool" >/dev/null || { echo "run.sh: '$tool' is needed and not installed" >&2; exit 1; }
done

# npm ci when the packages are missing or older than the lock file.
if [[ ! -f $DIR/node_modules/mqtt/dist/mqtt.min.js || ! -d $DIR/node_modules/playwright-core ||
    $DIR/package-lock.json -nt $DIR/node_modules/.package-lock.json ]]; then
    echo "installing npm packages in tests/browser"
    # playwright-core downloads no browser; the variable keeps any tool from trying.
    if [[ -f $DIR/package-lock.json ]]; then
        (cd "$DIR" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 timeout 300 npm ci --no-audit --no-fund --loglevel=error)
    else
        (cd "$DIR" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 timeout 300 npm install --no-audit --no-fund --loglevel=error)
    fi
fi

if [[ -z ${PETREL_BIN:-} ]]; then
    (cd "$ROOT" && timeout 1800 cargo build --quiet -p petrel-server --bin petrel)
    target_dir="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
        node -e 'let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => console.log(JSON.parse(s).target_directory))')"
    export PETREL_BIN="$target_dir/debug/petrel"
fi

# run.mjs bounds itself at 85 s; this is the backstop. `timeout` signals the whole process group,
# so the broker and Chromium go too.
timeout -k 5 120 node "$DIR/run.mjs"
