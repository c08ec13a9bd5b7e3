#!/usr/bin/env bash
# LeakSanitizer over the test suite (not part of CI: it needs a nightly toolchain and a full
# second build). Everything — the test binaries and the `petrel` binary the black-box tests
# start — is built with -Zsanitizer=leak in its own target directory. A test process that
# leaks fails its test run; the brokers the tests start write their reports (only at a normal
# exit, e.g. after SIGTERM; a SIGKILLed broker reports nothing) under $LSAN_DIR, which this
# script lists at the end and counts as failures.
#
#   bash tests/sanitizers/lsan.sh [cargo test arguments, e.g. -p petrel-engine]
set -uo pipefail
cd "$(dirname "$0")/../.."

target="$(rustc -vV | sed -n 's/^host: //p')"
LSAN_DIR="${LSAN_DIR:-$PWD/target/lsan-reports}"
rm -rf "$LSAN_DIR"
mkdir -p "$LSAN_DIR"

# log_path: one file per leaking process (the broker's stderr is a test's log file, which
# the test deletes). Reports from the test processes themselves go there too.
export LSAN_OPTIONS="log_path=$LSAN_DIR/leak:exitcode=23:report_objects=1"
export RUSTFLAGS="-Zsanitizer=leak"
export RUSTDOCFLAGS="-Zsanitizer=leak"

args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--workspace)
cargo +nightly test --target "$target" --target-dir target/lsan --no-fail-fast "${args[@]}" \
  2>&1 | tee "$LSAN_DIR/../lsan-test.log"
status=${PIPESTATUS[0]}

reports=("$LSAN_DIR"/leak*)
if [ -e "${reports[0]}" ]; then
  echo "== LeakSanitizer reports (${#reports[@]}):"
  for r in "${reports[@]}"; do
    echo "--- $r"
    sed -n '1,60p' "$r"
  done
  exit 1
fi
echo "== no leak reports; cargo test exited $status"
exit "$status"
