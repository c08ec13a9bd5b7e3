import json, sys
r = json.load(sys.stdin)
print("%-24s delivered/s %10.0f  lost %s  ok %s" % (r["label"], r["delivered_per_s"], r["lost"], r["ok"]))
