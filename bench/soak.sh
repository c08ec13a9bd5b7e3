#!/usr/bin/env bash
# The long soak of issue 9: the soak test (crates/server/tests/soak.rs) for 30 minutes against
# a release petrel with its disk store, then a summary of what it moved and how the broker's
# memory went.
#
#   bench/soak.sh            # 1800 s
#   bench/soak.sh 600        # another duration, in seconds (at least 20)
#
# The test itself asserts (nothing acknowledged lost, every will, expiries, sockets and gauges
# back to what is connected, no memory trend after warm-up) and fails the script if it does not
# hold. The samples (elapsed_s, rss_kib, connections, sessions, queued_messages, retained,
# store_disk_kib; every 10 s from 5 minutes up) are in target/test-artifacts/soak.csv; a run of
# the full 30 minutes is also copied to bench/soak-results/soak-<UTC date>.csv, the file
# BENCHMARKS.md refers to.
set -uo pipefail
cd "$(dirname "$0")/.."

secs=${1:-1800}
target=${CARGO_TARGET_DIR:-target}
csv=$target/test-artifacts/soak.csv
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== cargo build --release -p petrel-server"
cargo build --release -p petrel-server || exit 1

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
echo "== soak: $secs s, release, commit $commit, started $started"
rm -f "$csv"
PETREL_SOAK_SECS=$secs cargo test --release -p petrel-server --test soak -- --nocapture 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

echo
echo "== soak summary: $secs s from $started (UTC), commit $commit"
if [ -s "$csv" ]; then
  # RSS at the end of warm-up (the first fifth of the samples, as the test's check), in the
  # middle and at the end of the run, and its range after warm-up.
  awk -F, 'NR > 1 { t[++n] = $1; r[n] = $2 }
    END {
      w = int(n / 5) + 1; m = int((n + w) / 2)
      lo = r[w]; hi = r[w]
      for (i = w; i <= n; i++) { if (r[i] < lo) lo = r[i]; if (r[i] > hi) hi = r[i] }
      printf "samples: %d (%.0f s to %.0f s)\n", n, t[1], t[n]
      printf "RSS MiB: start %.1f, warm-up end (t=%.0f s) %.1f, middle (t=%.0f s) %.1f, end %.1f\n",
        r[1] / 1024, t[w], r[w] / 1024, t[m], r[m] / 1024, r[n] / 1024
      printf "RSS MiB after warm-up: min %.1f, max %.1f\n", lo / 1024, hi / 1024
    }' "$csv"
else
  echo "no samples at $csv"
fi
# The test's own figures: messages published and moved, churn, wills, expiries, drops, the
# memory trend, deliveries per subscriber.
grep '^SOAK ' "$log" | sed 's/^SOAK /  /'
if [ "$status" = 0 ]; then echo "result: passed"; else echo "result: FAILED (exit $status)"; fi

if [ "$secs" -ge 1800 ] && [ -s "$csv" ]; then
  mkdir -p bench/soak-results
  kept=bench/soak-results/soak-$(date -u +%Y-%m-%d).csv
  cp "$csv" "$kept"
  echo "samples kept in $kept"
fi
exit "$status"
