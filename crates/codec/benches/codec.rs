//! Codec throughput: how fast one connection's bytes become packets and back.
//!
//! PUBLISH dominates a broker's traffic, so it is measured at QoS 0 and 1, with a small (64 B)
//! and a larger (1 KiB) payload, in 3.1.1 and 5.0. SUBSCRIBE is the costliest packet to parse
//! per byte (filter validation). The batch case decodes 1000 packets from one buffer, which is
//! what a connection's read loop does after a large read.
//!
//! Run with `cargo bench -p petrel-codec`; filter with e.g. `cargo bench -p petrel-codec --
//! decode/publish`.

use std::hint::black_box;
use std::num::NonZeroU16;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use petrel_codec::{
    decode, encode, Packet, Properties, ProtocolVersion, Publish, QoS, RetainHandling, Subscribe,
    SubscriptionOptions, TopicFilter, TopicName,
};

/// What a broker would configure; large enough for every packet here.
const MAX_PACKET: u32 = 1 << 20;

fn publish(qos: QoS, payload: usize) -> Packet {
    let topic = TopicName::new("sensors/building-7/floor-3/temperature").expect("valid topic");
    let mut p = Publish::new(topic, Bytes::from(vec![0xA5; payload]));
    p.qos = qos;
    if qos != QoS::AtMostOnce {
        p.packet_id = NonZeroU16::new(4242);
    }
    Packet::Publish(p)
}

fn subscribe(version: ProtocolVersion) -> Packet {
    let filters = [
        "sensors/+/floor-3/#",
        "alerts/#",
        "$share/workers/jobs/+/new",
    ]
    .iter()
    .map(|f| {
        let options = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            retain_handling: RetainHandling::OnNewSubscription,
            ..SubscriptionOptions::default()
        };
        (TopicFilter::new(f).expect("valid filter"), options)
    })
    .collect();
    let mut properties = Properties::default();
    if version.is_v5() {
        properties.subscription_identifiers.push(17);
    }
    Packet::Subscribe(Subscribe {
        packet_id: NonZeroU16::MIN,
        properties,
        filters,
    })
}

fn wire(packet: &Packet, version: ProtocolVersion) -> Bytes {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf).expect("benchmark packets encode");
    buf.freeze()
}

/// The packets measured one at a time, with a name for the report.
fn cases() -> Vec<(String, ProtocolVersion, Packet)> {
    let mut out = Vec::new();
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            for (payload, label) in [(64, "64B"), (1024, "1KiB")] {
                let name = format!("publish/v{version}/qos{}/{label}", qos as u8);
                out.push((name, version, publish(qos, payload)));
            }
        }
        out.push((format!("subscribe/v{version}"), version, subscribe(version)));
    }
    out
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, version, packet) in cases() {
        let bytes = wire(&packet, version);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(name, |b| {
            // The copy into a fresh read buffer is setup, not measured: a connection decodes
            // from the buffer its socket reads fill.
            b.iter_batched(
                || BytesMut::from(&bytes[..]),
                |mut buf| decode(&mut buf, version, MAX_PACKET),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for (name, version, packet) in cases() {
        let len = wire(&packet, version).len();
        group.throughput(Throughput::Bytes(len as u64));
        // One output buffer reused, as a connection's write buffer is.
        let mut buf = BytesMut::with_capacity(len);
        group.bench_function(name, |b| {
            b.iter(|| {
                buf.clear();
                encode(black_box(&packet), version, &mut buf).expect("encodes");
                black_box(buf.len())
            })
        });
    }
    group.finish();
}

/// 1000 PUBLISH packets (QoS 0 and 1 alternating, 64 B payloads) in one buffer, decoded to
/// the end.
fn bench_batch(c: &mut Criterion) {
    const COUNT: usize = 1000;
    let mut group = c.benchmark_group("decode_batch");
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        let mut stream = BytesMut::new();
        for i in 0..COUNT {
            let qos = if i % 2 == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            encode(&publish(qos, 64), version, &mut stream).expect("encodes");
        }
        let stream = stream.freeze();
        group.throughput(Throughput::Elements(COUNT as u64));
        group.bench_function(format!("publish_x{COUNT}/v{version}"), |b| {
            b.iter_batched(
                || BytesMut::from(&stream[..]),
                |mut buf| {
                    let mut n = 0;
                    while let Ok(Some(p)) = decode(&mut buf, version, MAX_PACKET) {
                        black_box(&p);
                        n += 1;
                    }
                    assert_eq!(n, COUNT);
                    buf
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decode, bench_encode, bench_batch);
criterion_main!(benches);
