"""Medians of bench/cluster/run.sh's runs: a table on stdout and one JSON document.

  summary.py RUNS.jsonl OUT.json KEY=VALUE...

RUNS.jsonl holds petrel-bench reports (--json), labelled `cluster` or `single`; the KEY=VALUE
pairs describe the setup and are copied into OUT.json under "setup". For each scenario the
table gives the median over its runs of delivered msg/s and of each latency percentile, for the
three-node cluster and for the single node, and the ratio cluster / single.
"""

import json
import statistics
import sys

SETUPS = ("cluster", "single")


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs):
    rows = []
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        row = {"scenario": scenario}
        for setup in SETUPS:
            rs = [r for r in runs if r["scenario"] == scenario and r["label"] == setup]
            if not rs:
                continue
            lat = [r["latency_us"] or {} for r in rs]
            row["qos"] = rs[0]["params"].get("qos")
            row[setup] = {
                "runs": len(rs),
                "ok_runs": sum(1 for r in rs if r["ok"]),
                "delivered_per_s": [r["delivered_per_s"] for r in rs],
                "median_delivered_per_s": median(r["delivered_per_s"] for r in rs),
                "median_sent_per_s": median(r["sent_per_s"] for r in rs),
                "median_latency_us": {
                    k: median(l.get(k) for l in lat) for k in ("p50", "p99", "p999", "max")
                },
                "lost": sum(r["lost"] for r in rs),
                "duplicates": sum(r["duplicates"] for r in rs),
                "errors": [r["error"] for r in rs if r["error"]],
            }
        c, s = row.get("cluster"), row.get("single")
        if c and s and s["median_delivered_per_s"]:
            row["ratio"] = round(c["median_delivered_per_s"] / s["median_delivered_per_s"], 3)
        rows.append(row)
    return rows


def fmt(v, digits=0):
    return "—" if v is None else f"{v:,.{digits}f}"


def table(rows):
    out = [
        f"{'scenario':<9} {'qos':>3} {'setup':<8} {'msg/s':>11} {'p50 µs':>9} {'p99 µs':>9} "
        f"{'p99.9 µs':>9} {'lost':>8} {'dup':>5} {'ok':>5}  ratio"
    ]
    for row in rows:
        for setup in SETUPS:
            m = row.get(setup)
            if not m:
                continue
            lat = m["median_latency_us"]
            ratio = f"{row['ratio']:.2f}×" if setup == "cluster" and "ratio" in row else ""
            out.append(
                f"{row['scenario']:<9} {row['qos']:>3} {setup:<8} "
                f"{fmt(m['median_delivered_per_s']):>11} {fmt(lat['p50'], 1):>9} "
                f"{fmt(lat['p99'], 1):>9} {fmt(lat['p999'], 1):>9} {m['lost']:>8} "
                f"{m['duplicates']:>5} {m['ok_runs']}/{m['runs']:<3}  {ratio}"
            )
    return "\n".join(out)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        runs = [json.loads(line) for line in f if line.startswith("{")]
    setup = dict(kv.split("=", 1) for kv in sys.argv[3:])
    rows = summarize(runs)
    with open(sys.argv[2], "w") as f:
        json.dump({"setup": setup, "summary": rows, "runs": runs}, f, indent=1)
        f.write("\n")
    print(table(rows))


if __name__ == "__main__":
    main()
