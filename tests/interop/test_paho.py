#!/usr/bin/env python3
"""Interop: petrel against paho-mqtt 2.x, for MQTT 3.1, 3.1.1 and 5.0.

Usage: python3 tests/interop/test_paho.py --port N [--host 127.0.0.1]

For each protocol version: connect, subscribe, publish at QoS 0/1/2 and receive, a retained
message and its deletion, a will published when a client's socket closes without DISCONNECT,
and unsubscribe. MQTT 5 also checks that publish properties arrive. Prints one PASS/FAIL line per
check and exits 1 if any failed. Every wait is bounded by --timeout.

"Nothing arrives" is never checked by sleeping: a marker message is published after the one that
must not arrive, and the check waits for the marker instead.
"""

import argparse
import os
import queue
import sys
import threading
import time
import traceback

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PROTOCOLS = [
    ("mqttv31", mqtt.MQTTv31),
    ("mqttv311", mqtt.MQTTv311),
    ("mqttv5", mqtt.MQTTv5),
]


class CheckFailed(Exception):
    pass


class Peer:
    """One paho client driven synchronously: every call waits for the broker's answer."""

    def __init__(self, args, protocol, client_id, will=None):
        self.args = args
        self.protocol = protocol
        self.client_id = client_id
        self.messages = queue.Queue()
        self.connected = threading.Event()
        self.connect_rc = None
        self.acks = {}  # mid -> reason codes, from SUBACK and UNSUBACK
        self.acked = threading.Condition()
        kwargs = {}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = True
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            reconnect_on_failure=False,
            **kwargs,
        )
        if will is not None:
            topic, payload, qos = will
            self.client.will_set(topic, payload, qos=qos)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_subscribe = self._on_ack
        self.client.on_unsubscribe = self._on_ack

    def _on_connect(self, _client, _userdata, _flags, reason_code, _properties):
        self.connect_rc = reason_code
        self.connected.set()

    def _on_ack(self, _client, _userdata, mid, reason_codes, _properties):
        with self.acked:
            self.acks[mid] = reason_codes
            self.acked.notify_all()

    def _connect_call(self):
        kwargs = {"keepalive": 30}
        if self.protocol == mqtt.MQTTv5:
            kwargs["clean_start"] = True
        self.client.connect(self.args.host, self.args.port, **kwargs)

    def _check_connack(self):
        if not self.connected.is_set():
            raise CheckFailed(f"{self.client_id}: no CONNACK within {self.args.timeout}s")
        if self.connect_rc.is_failure:
            raise CheckFailed(f"{self.client_id}: CONNACK refused: {self.connect_rc}")

    def connect(self):
        """Connects with a network thread (loop_start)."""
        self._connect_call()
        self.client.loop_start()
        self.connected.wait(self.args.timeout)
        self._check_connack()
        return self

    def connect_without_thread(self):
        """Connects driving the network loop by hand, so that the socket can be closed under
        paho without its thread noticing first."""
        self._connect_call()
        deadline = time.monotonic() + self.args.timeout
        while not self.connected.is_set() and time.monotonic() < deadline:
            self.client.loop(timeout=0.05)
        self._check_connack()
        return self

    def _wait_ack(self, result, mid, what):
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise CheckFailed(f"{what}: paho refused to send it: {mqtt.error_string(result)}")
        deadline = time.monotonic() + self.args.timeout
        with self.acked:
            while mid not in self.acks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CheckFailed(f"{what}: no acknowledgement within {self.args.timeout}s")
                self.acked.wait(left)
            return self.acks.pop(mid)

    def subscribe(self, topic, qos):
        """Subscribes and returns the granted QoS."""
        result, mid = self.client.subscribe(topic, qos)
        codes = self._wait_ack(result, mid, f"SUBSCRIBE {topic}")
        if len(codes) != 1 or codes[0].is_failure:
            raise CheckFailed(f"SUBSCRIBE {topic} q{qos}: refused: {codes}")
        return codes[0].value

    def unsubscribe(self, topic):
        result, mid = self.client.unsubscribe(topic)
        codes = self._wait_ack(result, mid, f"UNSUBSCRIBE {topic}")
        # v3 UNSUBACK carries no codes; paho reports success for it.
        if any(code.is_failure for code in codes):
            raise CheckFailed(f"UNSUBSCRIBE {topic}: refused: {codes}")

    def publish(self, topic, payload, qos, retain=False, properties=None):
        """Publishes and, for QoS 1 and 2, waits until the flow is complete."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise CheckFailed(f"PUBLISH {topic}: {mqtt.error_string(info.rc)}")
        info.wait_for_publish(self.args.timeout)
        if not info.is_published():
            raise CheckFailed(f"PUBLISH {topic} q{qos}: not acknowledged within {self.args.timeout}s")

    def receive(self, what):
        try:
            return self.messages.get(timeout=self.args.timeout)
        except queue.Empty:
            raise CheckFailed(f"{self.client_id}: no message within {self.args.timeout}s ({what})")

    def expect(self, topic, payload, qos, retain=False):
        msg = self.receive(f"waiting for {topic!r}")
        got = (msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain))
        want = (topic, payload, qos, retain)
        if got != want:
            raise CheckFailed(f"{self.client_id}: got (topic, payload, qos, retain) {got}, want {want}")
        return msg

    def close(self):
        try:
            if self.client.is_connected():
                self.client.disconnect()
        finally:
            self.client.loop_stop()


class Suite:
    def __init__(self, args):
        self.args = args
        self.run_id = f"{os.getpid()}-{int(time.time() * 1000) % 100000}"
        self.passed = 0
        self.failed = 0
        self.peers = []

    def peer(self, name, protocol, role, will=None):
        # MQTT 3.1 allows client ids of at most 23 characters.
        client_id = f"p{role}{self.run_id}-{name[-2:]}"[:23]
        peer = Peer(self.args, protocol, client_id, will)
        self.peers.append(peer)
        return peer

    def topic(self, name, leaf):
        return f"interop-paho/{self.run_id}/{name}/{leaf}"

    def run(self, label, check, *args):
        started = time.monotonic()
        try:
            check(*args)
        except CheckFailed as e:
            self.failed += 1
            print(f"FAIL  {label}: {e}", flush=True)
        except Exception:  # a paho error or a bug in this file: report, go on
            self.failed += 1
            print(f"FAIL  {label}: unexpected error", flush=True)
            traceback.print_exc(file=sys.stdout)
        else:
            self.passed += 1
            print(f"PASS  {label} ({time.monotonic() - started:.2f}s)", flush=True)
        finally:
            for peer in self.peers:
                try:
                    peer.close()
                except Exception:
                    pass
            self.peers.clear()

    # --- checks, each for one protocol version ---------------------------------------------

    def check_connect_subscribe(self, name, protocol):
        sub = self.peer(name, protocol, "s").connect()
        for qos in (0, 1, 2):
            granted = sub.subscribe(self.topic(name, f"granted{qos}"), qos)
            if granted != qos:
                raise CheckFailed(f"SUBSCRIBE at QoS {qos} granted {granted}")

    def check_qos(self, name, protocol, qos):
        topic = self.topic(name, f"qos{qos}")
        sub = self.peer(name, protocol, "s").connect()
        sub.subscribe(topic, 2)
        pub = self.peer(name, protocol, "p").connect()
        payload = f"qos {qos} from paho".encode()
        pub.publish(topic, payload, qos)
        sub.expect(topic, payload, qos)

    def check_retained(self, name, protocol):
        topic = self.topic(name, "retained")
        marker = self.topic(name, "marker")
        pub = self.peer(name, protocol, "p").connect()
        pub.publish(topic, b"kept", 1, retain=True)
        # A later subscriber, through a wildcard, gets it with the retain flag.
        late = self.peer(name, protocol, "l").connect()
        late.subscribe(self.topic(name, "+"), 1)
        late.expect(topic, b"kept", 1, retain=True)
        # A live subscriber gets later retained publishes with retain 0 [MQTT-3.3.1-9].
        pub.publish(topic, b"kept-2", 1, retain=True)
        late.expect(topic, b"kept-2", 1, retain=False)
        # An empty retained payload deletes it [MQTT-3.3.1-10].
        pub.publish(topic, b"", 1, retain=True)
        late.expect(topic, b"", 1, retain=False)
        after = self.peer(name, protocol, "a").connect()
        after.subscribe(topic, 1)
        after.subscribe(marker, 1)
        pub.publish(marker, b"marker", 1)
        after.expect(marker, b"marker", 1)

    def check_will(self, name, protocol):
        topic = self.topic(name, "will")
        watcher = self.peer(name, protocol, "w").connect()
        watcher.subscribe(topic, 1)
        # A normal DISCONNECT discards the will [MQTT-3.1.2-10].
        polite = self.peer(name, protocol, "o", will=(topic, b"polite", 1)).connect()
        polite.close()
        # Closing the socket without DISCONNECT publishes it [MQTT-3.1.2-8].
        dying = self.peer(name, protocol, "d", will=(topic, b"gone", 1)).connect_without_thread()
        dying.client.socket().close()
        watcher.expect(topic, b"gone", 1)

    def check_unsubscribe(self, name, protocol):
        dropped = self.topic(name, "dropped")
        kept = self.topic(name, "kept")
        sub = self.peer(name, protocol, "s").connect()
        sub.subscribe(dropped, 1)
        sub.subscribe(kept, 1)
        pub = self.peer(name, protocol, "p").connect()
        pub.publish(dropped, b"before", 1)
        sub.expect(dropped, b"before", 1)
        sub.unsubscribe(dropped)
        pub.publish(dropped, b"after", 1)
        pub.publish(kept, b"marker", 1)
        sub.expect(kept, b"marker", 1)

    def check_v5_properties(self, name, protocol):
        topic = self.topic(name, "props")
        sub = self.peer(name, protocol, "s").connect()
        sub.subscribe(topic, 1)
        pub = self.peer(name, protocol, "p").connect()
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "text/plain"
        props.ResponseTopic = self.topic(name, "reply")
        props.CorrelationData = b"\x01\x02"
        props.UserProperty = [("k", "v"), ("k", "v2")]
        pub.publish(topic, b"with properties", 1, properties=props)
        msg = sub.expect(topic, b"with properties", 1)
        got = msg.properties
        checks = [
            ("ContentType", getattr(got, "ContentType", None), "text/plain"),
            ("ResponseTopic", getattr(got, "ResponseTopic", None), props.ResponseTopic),
            ("CorrelationData", getattr(got, "CorrelationData", None), b"\x01\x02"),
            ("UserProperty", getattr(got, "UserProperty", None), [("k", "v"), ("k", "v2")]),
        ]
        wrong = [f"{key}: got {g!r}, want {w!r}" for key, g, w in checks if g != w]
        if wrong:
            raise CheckFailed("; ".join(wrong))

    def main(self):
        for name, protocol in PROTOCOLS:
            self.run(f"{name} connect + subscribe (granted QoS)", self.check_connect_subscribe, name, protocol)
            for qos in (0, 1, 2):
                self.run(f"{name} publish/receive qos{qos}", self.check_qos, name, protocol, qos)
            self.run(f"{name} retained + delete", self.check_retained, name, protocol)
            self.run(f"{name} will on socket close", self.check_will, name, protocol)
            self.run(f"{name} unsubscribe", self.check_unsubscribe, name, protocol)
            if protocol == mqtt.MQTTv5:
                self.run(f"{name} publish properties", self.check_v5_properties, name, protocol)
        print(f"paho: {self.passed} passed, {self.failed} failed", flush=True)
        return 1 if self.failed else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds any one wait may take")
    args = parser.parse_args()
    return Suite(args).main()


if __name__ == "__main__":
    sys.exit(main())
