#!/usr/bin/env python3
"""Restart with 10,000 persistent sessions and 100,000 queued QoS 1 messages.

Usage: python3 bench/durable/restart.py [--bin target/release/petrel]

Starts petrel with the disk store, creates the sessions (each subscribed to its own topic,
then offline), publishes 10 QoS 1 messages to each, stops petrel with SIGTERM, starts it again
and reports how long the start took (until it accepts connections) and its resident memory,
then checks one session's queue. Prints one line per figure.
"""
import argparse
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

SESSIONS = 10_000
PER_SESSION = 10


def frame(first, body):
    out = bytearray([first])
    n = len(body)
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            break
    return bytes(out) + body


def s16(b):
    return struct.pack(">H", len(b)) + b


def connect(client_id, clean):
    return frame(0x10, s16(b"MQTT") + bytes([4, 0x02 if clean else 0x00]) + struct.pack(">H", 600) + s16(client_id.encode()))


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise RuntimeError("closed")
        buf += chunk
    return buf


def wait_port(port, deadline):
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.005)
    return False


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(os.path.dirname(__file__), "../../target/release/petrel"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="petrel-restart-bench-")
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    config = os.path.join(work, "petrel.toml")
    with open(config, "w") as f:
        f.write(f'[[listeners]]\nbind = "127.0.0.1:{port}"\nmax_connections = 20000\n\n[storage]\ndir = "{work}/data"\nfsync = "every_ms"\n')

    def start():
        p = subprocess.Popen([args.bin, "--config", config], stderr=open(os.path.join(work, "log"), "a"))
        return p

    broker = start()
    assert wait_port(port, time.monotonic() + 10), "petrel did not start"
    t = time.monotonic()
    for i in range(SESSIONS):
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(connect(f"s{i}", False))
        assert recv_exact(c, 4) == b"\x20\x02\x00\x00"
        c.sendall(frame(0x82, struct.pack(">H", 1) + s16(f"rs/{i}".encode()) + b"\x01"))
        recv_exact(c, 5)
        c.close()
    print(f"created {SESSIONS} persistent sessions in {time.monotonic() - t:.1f} s")
    pub = socket.create_connection(("127.0.0.1", port))
    pub.sendall(connect("publisher", True))
    recv_exact(pub, 4)
    t = time.monotonic()
    pid = 1
    for round_ in range(PER_SESSION):
        batch = bytearray()
        for i in range(SESSIONS):
            batch += frame(0x32, s16(f"rs/{i}".encode()) + struct.pack(">H", pid) + b"queued message %d" % round_)
            pid = pid % 65535 + 1
        pub.sendall(batch)
        recv_exact(pub, 4 * SESSIONS)
    print(f"queued {SESSIONS * PER_SESSION} QoS 1 messages (acknowledged, so stored) in {time.monotonic() - t:.1f} s")
    pub.close()
    before = rss_kib(broker.pid)
    broker.send_signal(signal.SIGTERM)
    broker.wait(timeout=30)
    du = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(work, "data")) for f in fs)

    t = time.monotonic()
    broker = start()
    assert wait_port(port, time.monotonic() + 120), "petrel did not restart"
    took = time.monotonic() - t
    time.sleep(0.5)
    after = rss_kib(broker.pid)
    print(f"restart: accepting connections after {took:.2f} s; VmRSS {after / 1024:.1f} MiB (before the stop {before / 1024:.1f} MiB); store {du / 1048576:.1f} MiB on disk (apparent size)")
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(connect("s4242", False))
    assert recv_exact(c, 4) == b"\x20\x02\x01\x00", "session present"
    got = 0
    c.settimeout(5)
    while got < PER_SESSION:
        hdr = recv_exact(c, 2)
        body = recv_exact(c, hdr[1])
        assert hdr[0] & 0xf0 == 0x30
        pid_ = body[2 + struct.unpack(">H", body[:2])[0]:][:2]
        c.sendall(b"\x40\x02" + pid_)
        got += 1
    print(f"session s4242 got its {got} queued messages after the restart")
    broker.send_signal(signal.SIGTERM)
    broker.wait(timeout=30)
    subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    sys.exit(main())
