//! An authenticator that takes its time (a slow password hash, a remote service): the
//! connection reads nothing after CONNECT until the decision, answers with it, and gives up at
//! the connect deadline if it never comes.

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use petrel_codec::{Packet, QoS, ReasonCode};
use petrel_engine::auth::{AuthDecision, AuthOutcome, Authenticator, Credentials};
use petrel_engine::stats::Stats;
use petrel_engine::store::Volatile;
use petrel_engine::{Broker, CloseReason, Limits};
use support::*;

/// The decision, set by the test whenever it likes.
#[derive(Clone, Default)]
struct Later(Arc<Mutex<(Option<AuthDecision>, Option<Waker>)>>);

impl Later {
    fn decide(&self, d: AuthDecision) {
        let mut g = self.0.lock().unwrap();
        g.0 = Some(d);
        if let Some(w) = g.1.take() {
            w.wake();
        }
    }
}

impl Future for Later {
    type Output = AuthDecision;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<AuthDecision> {
        let mut g = self.0.lock().unwrap();
        match g.0 {
            Some(d) => Poll::Ready(d),
            None => {
                g.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

struct Slow(Later);

impl Authenticator for Slow {
    fn authenticate(&self, _: &Credentials<'_>) -> AuthDecision {
        unreachable!("the connection asks `check`")
    }
    fn check(&self, _: &Credentials<'_>) -> AuthOutcome {
        AuthOutcome::Pending(Box::pin(self.0.clone()))
    }
}

fn slow_broker() -> (Arc<Broker>, Later) {
    let later = Later::default();
    let broker = Arc::new(Broker::with_parts(
        Limits::default(),
        Box::new(Slow(later.clone())),
        Box::new(Volatile),
    ));
    (broker, later)
}

fn resume(peer: &mut Peer, now: Instant) -> Poll<Result<(), CloseReason>> {
    let waker = Waker::from(Arc::new(NoWake));
    let mut cx = Context::from_waker(&waker);
    peer.conn.poll_resume(&mut cx, now)
}

struct NoWake;
impl std::task::Wake for NoWake {
    fn wake(self: Arc<Self>) {}
}

#[test]
fn nothing_is_read_until_the_decision_then_connack_goes_out() {
    let t0 = Instant::now();
    let (broker, later) = slow_broker();
    let mut c = Peer::new(&broker, t0);
    c.send_connect(t0, connect("c", true, 0)).unwrap();
    assert_eq!(c.written(), [], "no CONNACK yet");
    assert!(
        c.conn.is_paused(),
        "the driver reads nothing more meanwhile"
    );
    assert!(resume(&mut c, t0).is_pending());
    later.decide(AuthDecision::Allow);
    assert!(matches!(resume(&mut c, t0), Poll::Ready(Ok(()))));
    assert_eq!(c.written(), [connack(false)]);
    assert!(!c.conn.is_paused());
    // And the connection works.
    c.subscribe(t0, 1, "t", QoS::AtMostOnce);
}

#[test]
fn a_refusal_that_comes_later_is_still_a_connack_with_its_code() {
    let t0 = Instant::now();
    let (broker, later) = slow_broker();
    let mut c = Peer::new(&broker, t0);
    c.send_connect(t0, connect_v5("c", true, 0)).unwrap();
    later.decide(AuthDecision::BadCredentials);
    assert!(matches!(resume(&mut c, t0), Poll::Ready(Err(_))));
    match c.written().as_slice() {
        [Packet::ConnAck(ack)] => assert_eq!(ack.reason, ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_decision_that_never_comes_ends_at_the_connect_deadline() {
    let t0 = Instant::now();
    let (broker, _later) = slow_broker();
    let mut c = Peer::new(&broker, t0);
    c.send_connect(t0 + ms(100), connect("c", true, 0)).unwrap();
    let deadline = c.conn.deadline().expect("the connect deadline still runs");
    assert_eq!(
        deadline,
        t0 + CONNECT_TIMEOUT,
        "counted from accept, not from CONNECT"
    );
    assert_eq!(c.conn.handle_timeout(deadline - ms(1)), Ok(()));
    assert_eq!(
        c.conn.handle_timeout(deadline),
        Err(CloseReason::ConnectTimeout)
    );
    assert_eq!(Stats::get(&broker.stats.connect_timeouts), 1);
    assert_eq!(c.written(), [], "no CONNACK");
}
