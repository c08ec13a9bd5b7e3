"""Waits for a state of a petrel cluster, read from each node's GET /api/v1/cluster.

  wait.py members   ADMIN_PORTS                     every node sees every node alive
  wait.py quiet     ADMIN_PORTS                     every node knows of no remote filter
  wait.py interest  ADMIN_PORTS SCENARIO CLIENTS    every node knows of the filters a
                                                    petrel-bench run has on the other nodes

ADMIN_PORTS is comma-separated, in the order of petrel-bench's --ports (node k serves the k-th
MQTT port). `interest` is petrel-bench's --before-publish command: the run's subscribers are
subscribed, and publishing starts when this exits 0. `remote_filters` counts the (filter, node)
pairs of the other nodes in the node's copy of the cluster's interest bucket, so when every
node counts every pair of the run that is not its own, every announcement has reached every
node. The pairs come from placing subscribers as bench/src/placement.rs does: subscriber i on
node i mod n.
Exits 1 when the cluster does not get there within TIMEOUT seconds (env, default 30).
"""

import json
import os
import sys
import time
import urllib.request

TOKEN = os.environ.get("PETREL_ADMIN_TOKEN", "t")
TIMEOUT = float(os.environ.get("TIMEOUT", "30"))


def cluster(port):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/cluster",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def remote_filters(port):
    return cluster(port)["remote_filters"]


def alive_members(port):
    return sum(1 for m in cluster(port)["members"] if m["alive"])


def subscriptions(scenario, clients, nodes):
    """The (node, filter) pairs of a run's subscribers."""
    if scenario in ("fan-in", "latency"):
        return {(0, "one")}
    if scenario == "fan-out":
        return {(i % nodes, "one") for i in range(clients)}
    if scenario == "pairs":
        return {(i % nodes, i) for i in range(clients)}
    sys.exit(f"wait.py: no placement for scenario {scenario!r}")


def wait(ports, expected, what, measure=remote_filters):
    deadline = time.monotonic() + TIMEOUT
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = [measure(p) for p in ports]
        except OSError as e:
            seen = str(e)
        if isinstance(seen, list) and all(s == e for s, e in zip(seen, expected)):
            return
        time.sleep(0.05)
    sys.exit(f"wait.py: {what}: nodes report {seen}, expected {expected}")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    ports = [int(p) for p in sys.argv[2].split(",")]
    if sys.argv[1] == "members":
        n = len(ports)
        wait(ports, [n] * n, "not every node sees every node alive", alive_members)
    elif sys.argv[1] == "quiet":
        wait(ports, [0] * len(ports), "interest of earlier runs still present")
    elif sys.argv[1] == "interest" and len(sys.argv) == 5:
        subs = subscriptions(sys.argv[3], int(sys.argv[4]), len(ports))
        expected = [sum(1 for node, _ in subs if node != k) for k in range(len(ports))]
        wait(ports, expected, f"{sys.argv[3]} interest did not reach every node")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
