//! The HTTP authentication hook over real sockets: a small HTTP service on loopback, started
//! by the test, decides on user names petrel does not know. It admits, refuses, fails, answers
//! too slowly or is not there at all; petrel lets in only what it admitted, refuses the rest
//! promptly, remembers answers, and never holds a CONNECT past the connect deadline.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_tests::{frame, hex, RawClient, TestBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The service: the user name in the JSON body picks the answer. Counts the requests.
async fn service() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let count = asked.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                // Headers, then the body by Content-Length.
                let body = loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).into_owned();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if req.len() >= end + 4 + len {
                            break text[end + 4..].to_owned();
                        }
                    }
                };
                count.fetch_add(1, Ordering::SeqCst);
                let json: serde_json::Value = serde_json::from_str(&body).unwrap();
                let status = match json["username"].as_str().unwrap_or("") {
                    "good" if json["password"] == "right" => "200 OK",
                    "good" | "bad" => "401 Unauthorized",
                    "banned" => "403 Forbidden",
                    "slow" => {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        "200 OK"
                    }
                    _ => "500 Internal Server Error",
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    (addr, asked)
}

fn connect_login(client_id: &str, user: &str, password: &str, v5: bool) -> Vec<u8> {
    let mut body = hex(if v5 {
        "00 04 4d 51 54 54 05"
    } else {
        "00 04 4d 51 54 54 04"
    });
    body.extend([0xc2, 0x00, 0x3c]);
    if v5 {
        body.push(0); // no properties
    }
    for s in [client_id, user, password] {
        body.extend((s.len() as u16).to_be_bytes());
        body.extend(s.as_bytes());
    }
    hex(&frame(0x10, &body))
}

/// The CONNACK's code for one login, or `None` if the connection closed without one.
async fn login(addr: SocketAddr, user: &str, password: &str, v5: bool) -> Option<u8> {
    let mut c = RawClient::connect(addr).await;
    c.send_bytes(&connect_login("c", user, password, v5)).await;
    let head = c.read_exact(2, Duration::from_secs(5)).await.ok()?;
    assert_eq!(head[0], 0x20, "CONNACK");
    let rest = c
        .read_exact(usize::from(head[1]), Duration::from_secs(5))
        .await
        .ok()?;
    Some(rest[1])
}

async fn broker(url: &str, connect_timeout: &str) -> TestBroker {
    TestBroker::start_toml(&format!(
        r#"
[[listeners]]
bind = "127.0.0.1:1883"
connect_timeout = "{connect_timeout}"

[auth]
allow_anonymous = false
max_failed_logins = 100

[[auth.users]]
name = "local"
password = "pw"

[auth.http]
url = "{url}"
timeout = "500ms"
cache_ttl = "60s"
"#
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hook_admits_refuses_and_fails_closed() {
    let (service, asked) = service().await;
    let broker = broker(&format!("http://{service}/auth"), "5s").await;
    let addr = broker.addr;

    assert_eq!(login(addr, "good", "right", false).await, Some(0));
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    assert_eq!(login(addr, "good", "right", false).await, Some(0), "cached");
    assert_eq!(asked.load(Ordering::SeqCst), 1, "the cache answered");
    assert_eq!(login(addr, "good", "wrong", false).await, Some(4));
    assert_eq!(
        login(addr, "bad", "x", true).await,
        Some(0x86),
        "v5: bad user name or password"
    );
    assert_eq!(login(addr, "banned", "x", false).await, Some(5));
    assert_eq!(login(addr, "banned", "x", true).await, Some(0x87));
    assert_eq!(
        login(addr, "error", "x", false).await,
        Some(5),
        "a 500 refuses"
    );
    // A local user is not sent to the hook.
    let before = asked.load(Ordering::SeqCst);
    assert_eq!(login(addr, "local", "pw", false).await, Some(0));
    assert_eq!(asked.load(Ordering::SeqCst), before);

    // Too slow: refused once the hook's timeout passes, not after the service answers.
    let started = Instant::now();
    assert_eq!(login(addr, "slow", "x", false).await, Some(5));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "refused after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_that_is_not_there_refuses_and_the_connect_deadline_still_holds() {
    // Nothing listens on this port.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let first = broker(&format!("http://{gone}/auth"), "5s").await;
    assert_eq!(login(first.addr, "anyone", "x", false).await, Some(5));

    // A connect deadline shorter than the hook's timeout ends the wait: the connection closes
    // at the deadline without a CONNACK.
    let (service, _) = service().await;
    let second = broker(&format!("http://{service}/auth"), "200ms").await;
    let started = Instant::now();
    assert_eq!(login(second.addr, "slow", "x", false).await, None);
    let took = started.elapsed();
    assert!(took < Duration::from_millis(450), "closed after {took:?}");
}
