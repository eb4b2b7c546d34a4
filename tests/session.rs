//! `repl::link::Session` on a loopback TCP pair, without daemons: what
//! becomes of a request for the peer's `State` (`expect_state`) that no
//! answer completes.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use replblk::repl::link::{Remote, Session};

/// Our end and the peer's end of a loopback connection.
fn connected() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let ours = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (theirs, _) = listener.accept().expect("accept");
    (ours, theirs)
}

fn session(stream: &TcpStream) -> Session {
    let stream = replblk::net::Stream::Tcp(stream.try_clone().expect("clone"));
    Session::new(
        &stream,
        "peer".into(),
        Duration::from_secs(5),
        Box::new(|_| Ok(())),
    )
    .expect("session")
}

#[test]
fn a_state_request_the_peer_never_answers_is_dropped_when_the_wait_ends() {
    let (ours, _theirs) = connected();
    // The peer sends nothing: reading the link times out.
    ours.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let s = session(&ours);
    let (_token, slot) = s.expect_state();
    let outcome = s.wait_for(&slot, Duration::from_millis(500), "no answer");
    assert_eq!(outcome, Remote::Lost);
    assert_eq!(
        Arc::strong_count(&slot),
        1,
        "the session still holds the unanswered request"
    );
}

#[test]
fn state_requests_still_waiting_end_with_the_session() {
    let (ours, _theirs) = connected();
    let s = session(&ours);
    let requests: Vec<_> = (0..3).map(|_| s.expect_state().1).collect();
    s.fail("peer gone");
    for slot in &requests {
        assert_eq!(Arc::strong_count(slot), 1, "a request outlived the session");
        // Completed: a waiter returns at once.
        assert_eq!(s.wait_for(slot, Duration::from_secs(10), "x"), Remote::Lost);
    }
    // A request made after the session ended is not kept either.
    let (_token, late) = s.expect_state();
    assert_eq!(Arc::strong_count(&late), 1);
}

#[test]
fn a_forgotten_state_request_is_dropped() {
    let (ours, _theirs) = connected();
    let s = session(&ours);
    let (token, slot) = s.expect_state();
    let (_other, kept) = s.expect_state();
    s.forget_state(token);
    assert_eq!(Arc::strong_count(&slot), 1);
    assert_eq!(Arc::strong_count(&kept), 2, "only the forgotten one goes");
    assert!(s.is_alive());
}
