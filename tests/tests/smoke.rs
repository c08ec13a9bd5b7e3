//! The shortest path through the broker: connect, subscribe, publish, receive.

use petrel_tests::{connect_v311_hex, RawClient, TestBroker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_subscribe_publish_receive() {
    let broker = TestBroker::start().await;
    let mut sub = RawClient::connect(broker.addr).await;
    sub.send_hex(&connect_v311_hex("sub", true, 60)).await;
    sub.expect_hex("20 02 00 00").await;
    // SUBSCRIBE id 1, "a/+" QoS 0 → SUBACK granted 0
    sub.send_hex("82 08 00 01 00 03 61 2f 2b 00").await;
    sub.expect_hex("90 03 00 01 00").await;

    let mut publ = RawClient::connect(broker.addr).await;
    publ.send_hex(&connect_v311_hex("pub", true, 60)).await;
    publ.expect_hex("20 02 00 00").await;
    // PUBLISH QoS 0 "a/b" payload "hi"
    publ.send_hex("30 07 00 03 61 2f 62 68 69").await;
    sub.expect_hex("30 07 00 03 61 2f 62 68 69").await;
}
