#!/usr/bin/env python3
"""Interop: petrel's TLS and WebSocket listeners against paho-mqtt 2.x.

Usage: python3 tests/interop/test_paho_transports.py --tls-port N --ws-port M --cafile CA.pem

For MQTT 3.1.1 and 5.0, over TLS (server certificate checked against --cafile) and over
WebSocket (path /mqtt): connect, subscribe, publish at QoS 1 and receive the message back.
Prints one PASS/FAIL line per check and exits 1 if any failed. Every wait is bounded.
"""

import argparse
import os
import queue
import ssl
import sys
import threading
import time

import paho.mqtt.client as mqtt


class CheckFailed(Exception):
    pass


def round_trip(args, transport, port, protocol, label):
    client_id = f"pt{os.getpid()}-{label}"[:23]
    kwargs = {"protocol": protocol}
    if protocol != mqtt.MQTTv5:
        kwargs["clean_session"] = True
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        transport=transport,
        reconnect_on_failure=False,
        **kwargs,
    )
    if transport == "websockets":
        client.ws_set_options(path="/mqtt")
    else:
        client.tls_set(ca_certs=args.cafile, cert_reqs=ssl.CERT_REQUIRED)
    connected = threading.Event()
    subscribed = threading.Event()
    messages = queue.Queue()
    outcome = {}

    def on_connect(_c, _u, _flags, reason_code, _props):
        outcome["connack"] = reason_code
        connected.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = lambda _c, _u, msg: messages.put(msg)
    try:
        client.connect(args.host, port, keepalive=30)
    except Exception as e:  # TLS or upgrade failure
        raise CheckFailed(f"connect failed: {e!r}")
    client.loop_start()
    try:
        if not connected.wait(args.timeout):
            raise CheckFailed("no CONNACK")
        if outcome["connack"].is_failure:
            raise CheckFailed(f"CONNACK {outcome['connack']}")
        topic = f"interop-paho-transport/{os.getpid()}/{label}"
        client.subscribe(topic, 1)
        if not subscribed.wait(args.timeout):
            raise CheckFailed("no SUBACK")
        payload = f"over {transport} {label}".encode()
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(args.timeout)
        try:
            msg = messages.get(timeout=args.timeout)
        except queue.Empty:
            raise CheckFailed("own message not received")
        if bytes(msg.payload) != payload:
            raise CheckFailed(f"got {bytes(msg.payload)!r}")
    finally:
        client.disconnect()
        client.loop_stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="unused; accepted like the other scripts")
    parser.add_argument("--tls-port", type=int, required=True)
    parser.add_argument("--ws-port", type=int, required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    passed = failed = 0
    for transport, port in (("tcp", args.tls_port), ("websockets", args.ws_port)):
        for name, protocol in (("mqttv311", mqtt.MQTTv311), ("mqttv5", mqtt.MQTTv5)):
            what = "TLS" if transport == "tcp" else "WebSocket"
            label = f"{name} over {what}"
            started = time.monotonic()
            try:
                round_trip(args, transport, port, protocol, f"{name}-{what}")
            except CheckFailed as e:
                failed += 1
                print(f"FAIL  {label}: {e}", flush=True)
            else:
                passed += 1
                print(f"PASS  {label} ({time.monotonic() - started:.2f}s)", flush=True)
    print(f"paho transports: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
