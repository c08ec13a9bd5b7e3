#!/usr/bin/env python3
"""Interop: MQTT 5 features of petrel against paho-mqtt 2.x.

Usage: python3 tests/interop/test_paho_v5.py --port N [--host 127.0.0.1]

Session expiry and resumption, will delay, message expiry, subscription identifiers, shared
subscriptions, No Local and Retain Handling, reason codes on acknowledgements, the CONNACK
properties (assigned client identifier, response information) and the payload format check.
Prints one PASS/FAIL line per check and exits 1 if any failed. Every wait is bounded.
"""

import argparse
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from test_paho import CheckFailed, Peer, Suite


class V5Peer(Peer):
    """A paho MQTT 5 client: CONNECT properties, clean start, and what came back."""

    def __init__(self, args, client_id, clean_start=True, properties=None, will=None, will_props=None):
        super().__init__(args, mqtt.MQTTv5, client_id)
        self.clean_start = clean_start
        self.connect_properties = properties
        self.connack_properties = None
        self.session_present = None
        self.publish_results = {}
        self.published = threading.Condition()
        if will is not None:
            topic, payload = will
            self.client.will_set(topic, payload, qos=1, properties=will_props)
        self.client.on_connect = self._on_connect_v5
        self.client.on_publish = self._on_publish

    def _on_connect_v5(self, _client, _userdata, flags, reason_code, properties):
        self.connect_rc = reason_code
        self.session_present = flags.session_present
        self.connack_properties = properties
        self.connected.set()

    def _on_publish(self, _client, _userdata, mid, reason_code, _properties):
        with self.published:
            self.publish_results[mid] = reason_code
            self.published.notify_all()

    def _connect_call(self):
        self.client.connect(
            self.args.host,
            self.args.port,
            keepalive=30,
            clean_start=self.clean_start,
            properties=self.connect_properties,
        )

    def publish_reason(self, topic, payload, qos, properties=None):
        """Publishes at QoS 1 or 2 and returns the reason code of the PUBACK / PUBREC."""
        info = self.client.publish(topic, payload, qos=qos, properties=properties)
        deadline = time.monotonic() + self.args.timeout
        with self.published:
            while info.mid not in self.publish_results:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CheckFailed(f"PUBLISH {topic}: no acknowledgement")
                self.published.wait(left)
            return self.publish_results.pop(info.mid)

    def subscribe_options(self, topic, options, properties=None):
        result, mid = self.client.subscribe(topic, options=options, properties=properties)
        codes = self._wait_ack(result, mid, f"SUBSCRIBE {topic}")
        if codes[0].is_failure:
            raise CheckFailed(f"SUBSCRIBE {topic}: refused: {codes}")

    def expect_nothing_before(self, marker_topic, publisher):
        """Publishes a marker; the first message seen must be it."""
        publisher.publish(marker_topic, b"marker", 1)
        msg = self.receive("waiting for the marker")
        if msg.topic != marker_topic:
            raise CheckFailed(f"{self.client_id}: got {msg.topic!r} {bytes(msg.payload)!r} before the marker")


def props(packet_type, **values):
    p = Properties(packet_type)
    for key, value in values.items():
        setattr(p, key, value)
    return p


class V5Suite(Suite):
    def v5(self, role, **kwargs):
        client_id = f"v5{role}{self.run_id}"
        peer = V5Peer(self.args, client_id, **kwargs)
        self.peers.append(peer)
        return peer

    def check_session_expiry(self):
        topic = self.topic("v5", "expiry")
        cid = f"v5exp{self.run_id}"
        expiry = props(PacketTypes.CONNECT, SessionExpiryInterval=2)
        first = V5Peer(self.args, cid, clean_start=True, properties=expiry).connect()
        self.peers.append(first)
        first.subscribe(topic, 1)
        first.close()
        pub = self.v5("p").connect()
        pub.publish(topic, b"queued", 1)
        back = V5Peer(self.args, cid, clean_start=False, properties=expiry).connect()
        self.peers.append(back)
        if not back.session_present:
            raise CheckFailed("reconnect within the interval: session present 0")
        back.expect(topic, b"queued", 1)
        back.close()
        time.sleep(3)
        gone = V5Peer(self.args, cid, clean_start=False, properties=expiry).connect()
        self.peers.append(gone)
        if gone.session_present:
            raise CheckFailed("reconnect 3 s after a 2 s expiry: session still present")

    def check_will_delay(self):
        topic = self.topic("v5", "will")
        watcher = self.v5("w").connect()
        watcher.subscribe(topic, 1)
        connect_props = props(PacketTypes.CONNECT, SessionExpiryInterval=30)
        will_props = props(PacketTypes.WILLMESSAGE, WillDelayInterval=1)
        dying = self.v5("d", properties=connect_props, will=(topic, b"late"), will_props=will_props)
        dying.connect_without_thread()
        lost = time.monotonic()
        dying.client.socket().close()
        msg = watcher.receive("waiting for the delayed will")
        took = time.monotonic() - lost
        if bytes(msg.payload) != b"late" or not 0.9 <= took < 3:
            raise CheckFailed(f"will {bytes(msg.payload)!r} after {took:.2f}s, delay was 1 s")

    def check_message_expiry(self):
        topic = self.topic("v5", "msgexp")
        cid = f"v5mex{self.run_id}"
        expiry = props(PacketTypes.CONNECT, SessionExpiryInterval=60)
        sub = V5Peer(self.args, cid, clean_start=True, properties=expiry).connect()
        self.peers.append(sub)
        sub.subscribe(topic, 1)
        sub.close()
        pub = self.v5("p").connect()
        pub.publish(topic, b"short", 1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
        pub.publish(topic, b"long", 1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=60))
        time.sleep(2)
        back = V5Peer(self.args, cid, clean_start=False, properties=expiry).connect()
        self.peers.append(back)
        msg = back.expect(topic, b"long", 1)
        left = getattr(msg.properties, "MessageExpiryInterval", None)
        if left is None or not 55 <= left <= 59:
            raise CheckFailed(f"expiry interval forwarded: {left}, expected what was left of 60 s")

    def check_subscription_identifiers(self):
        base = self.topic("v5", "sid")
        sub = self.v5("s").connect()
        sub.subscribe_options(base + "/+", SubscribeOptions(qos=1), props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=3))
        sub.subscribe_options(base + "/a", SubscribeOptions(qos=1), props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=4))
        pub = self.v5("p").connect()
        pub.publish(base + "/a", b"x", 1)
        msg = sub.expect(base + "/a", b"x", 1)
        ids = sorted(getattr(msg.properties, "SubscriptionIdentifier", []))
        if ids != [3, 4]:
            raise CheckFailed(f"subscription identifiers {ids}, want [3, 4] in one message")

    def check_shared(self):
        topic = self.topic("v5", "shared")
        members = [self.v5(f"m{i}").connect() for i in range(2)]
        for m in members:
            m.subscribe(f"$share/grp/{topic}", 1)
        pub = self.v5("p").connect()
        for i in range(10):
            pub.publish(topic, f"{i}".encode(), 1)
        got = []
        for m in members:
            for _ in range(5):
                got.append(bytes(m.receive("a share of the messages").payload).decode())
        if sorted(got, key=int) != [str(i) for i in range(10)]:
            raise CheckFailed(f"members got {got}")

    def check_no_local_and_retain_handling(self):
        topic = self.topic("v5", "nl")
        marker = self.topic("v5", "nlmarker")
        other = self.v5("o").connect()
        other.publish(topic, b"retained", 1, retain=True)
        me = self.v5("m").connect()
        # No Local: my own publishes are not sent back; Retain Handling 2: no retained replay.
        me.subscribe_options(topic, SubscribeOptions(qos=1, noLocal=True, retainHandling=2))
        me.subscribe(marker, 1)
        me.publish(topic, b"mine", 1)
        me.expect_nothing_before(marker, other)
        other.publish(topic, b"", 1, retain=True)

    def check_ack_reason_codes(self):
        pub = self.v5("p").connect()
        rc = pub.publish_reason(self.topic("v5", "nobody"), b"x", 1)
        if rc.value != 0x10:
            raise CheckFailed(f"PUBACK for no subscribers: {rc}, want 0x10")
        bad = props(PacketTypes.PUBLISH, PayloadFormatIndicator=1)
        rc = pub.publish_reason(self.topic("v5", "bad"), b"\xff\xfe", 1, properties=bad)
        if rc.value != 0x99:
            raise CheckFailed(f"PUBACK for a non-UTF-8 payload marked UTF-8: {rc}, want 0x99")

    def check_connack_properties(self):
        anon = V5Peer(self.args, "", properties=props(PacketTypes.CONNECT, RequestResponseInformation=1))
        self.peers.append(anon)
        anon.connect()
        p = anon.connack_properties
        assigned = getattr(p, "AssignedClientIdentifier", None)
        info = getattr(p, "ResponseInformation", None)
        if not assigned:
            raise CheckFailed("no Assigned Client Identifier for an empty client id")
        if info != f"response/{assigned}":
            raise CheckFailed(f"Response Information {info!r}")
        if getattr(p, "ReceiveMaximum", None) != 1024 or getattr(p, "TopicAliasMaximum", None) != 64:
            raise CheckFailed(f"CONNACK properties {p}")

    def main(self):
        self.run("mqttv5 session expiry and resume", self.check_session_expiry)
        self.run("mqttv5 will delay interval", self.check_will_delay)
        self.run("mqttv5 message expiry interval", self.check_message_expiry)
        self.run("mqttv5 subscription identifiers", self.check_subscription_identifiers)
        self.run("mqttv5 shared subscription", self.check_shared)
        self.run("mqttv5 no local + retain handling 2", self.check_no_local_and_retain_handling)
        self.run("mqttv5 PUBACK reason codes 0x10 / 0x99", self.check_ack_reason_codes)
        self.run("mqttv5 CONNACK properties", self.check_connack_properties)
        print(f"paho v5: {self.passed} passed, {self.failed} failed", flush=True)
        return 1 if self.failed else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds any one wait may take")
    args = parser.parse_args()
    return V5Suite(args).main()


if __name__ == "__main__":
    sys.exit(main())
