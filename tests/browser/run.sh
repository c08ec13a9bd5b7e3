#!/usr/bin/env bash
# Browser tests in headless Chromium: MQTT.js (npm `mqtt`) against petrel over ws:// and wss://,
# MQTT 3.1.1 and 5.0, plus a refused wrong path (run.mjs); then the operator dashboard on the
# admin listener, driven by MQTT clients from Node (dashboard.mjs). See each file for its cases.
#
# Usage: tests/browser/run.sh
#   Installs what is missing (Debian's chromium, the npm packages in tests/browser), builds the
#   petrel binary (debug), then runs `node tests/browser/run.mjs` and `node
#   tests/browser/dashboard.mjs`, each printing one PASS/FAIL line per case and "N passed, M
#   failed"; the second runs even if the first failed, and the script exits non-zero if either
#   did. PETREL_BIN=/path/to/petrel skips the build; CHROMIUM=/path/to/chromium picks the browser;
#   ARTIFACTS_DIR (default target/test-artifacts) receives the dashboard's screenshots.
# Every step is bounded with `timeout`; each test takes well under 90 s.
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

# run.mjs bounds itself at 85 s and dashboard.mjs at 60 s; these are the backstops. `timeout`
# signals the whole process group, so the broker and Chromium go too.
status=0
timeout -k 5 120 node "$DIR/run.mjs" || status=$?
timeout -k 5 90 node "$DIR/dashboard.mjs" || { rc=$?; ((status)) || status=$rc; }
exit "$status"
