//! Faults on the replication link, injected by a proxy between the nodes
//! (`common::proxy`): a flipped byte, a stalled or half-open link, a reset
//! or a clean close in the middle of a frame, a slow link. In every case:
//! a corrupted payload is caught and never written, a stalled peer is
//! dropped after the timeouts while the Primary goes on, no write is
//! acknowledged that the peer did not confirm or that the Primary did not
//! mark out of sync (checked with `ackcheck` against the Secondary's disk,
//! excusing exactly what the Primary marked), and after the link heals the
//! copies converge.
//!
//! Every wait is bounded; daemons, writers and the proxy are stopped on
//! drop, and the temporary directory is removed.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::pair::{Pair, ALPHA, BETA};
use common::proxy::{Dir, FaultProxy, Faults};
use common::writer::{self, Writer};

const ACKCHECK: &str = env!("CARGO_BIN_EXE_ackcheck");
const MIB: u64 = 1 << 20;

/// A pair whose replication link runs through `proxy`, with short
/// timeouts, connected and in sync, alpha Primary.
fn pair_via(proxy: &FaultProxy) -> Pair {
    let pair = Pair::builder()
        .dial_via(proxy.addr())
        .replication("ping_interval_ms", "200")
        .replication("ping_timeout_ms", "1000")
        .replication("ack_timeout_ms", "2000")
        .replication("reconnect_max_ms", "300")
        .start_unconnected();
    proxy.set_target(pair.beta().repl_addr);
    pair.wait_connected();
    synced(&pair);
    pair
}

fn synced(pair: &Pair) {
    for node in [ALPHA, BETA] {
        pair.ok(node, &["wait-sync", "r0", "--timeout", "30"]);
    }
}

fn qemu_io(uri: &str, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", uri, "-c", cmd])
        .output()
        .expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmd}: {text}"
    );
}

fn wait_disconnected(pair: &Pair, what: &str) {
    pair.wait_status(ALPHA, what, |s| !s.connected());
}

/// An `ackcheck write` at alpha, at depth 8 without flushes.
fn writer(pair: &Pair, log: &Path) -> Writer {
    let args = ["--qd", "8", "--blocks", "4096", "--flush-every", "0"];
    let stop = pair.dir.path().join("stop");
    Writer::start(ACKCHECK, &[pair.alpha().uri()], log, stop, &args)
}

/// Ends the writer: it saw no error and no lost connection, and wrote.
fn finish(w: Writer) -> Value {
    let v = w.finish();
    assert_eq!(v["failed"], 0, "the client saw write errors: {v}");
    assert_eq!(v["lost_connections"], 0, "{v}");
    assert!(v["acked"].as_u64().unwrap_or(0) > 0, "{v}");
    v
}

fn verify(log: &Path, extra: &[&str]) -> Value {
    writer::verify_ok(ACKCHECK, log, extra)
}

/// Every write alpha acknowledged is on beta's disk unless alpha marked
/// its block out of sync: checked while the link is still down.
fn acked_writes_are_on_beta_or_marked(pair: &Pair, log: &Path) -> Value {
    let marks = pair.dir.path().join("alpha-oos.txt");
    let runs = pair.out_of_sync_runs(ALPHA);
    let text: String = runs.iter().map(|(o, l)| format!("{o} {l}\n")).collect();
    std::fs::write(&marks, text).expect("marks");
    let disk = pair.beta().disk.to_str().expect("utf-8").to_owned();
    verify(
        log,
        &["--file", &disk, "--excuse", marks.to_str().expect("utf-8")],
    )
}

/// Heals the link, waits for the resync; then both copies are identical
/// and every acknowledged write is on the Primary.
fn heal_and_converge(pair: &Pair, proxy: &FaultProxy, log: Option<&Path>) {
    proxy.clear();
    proxy.refuse(false);
    pair.wait_connected();
    synced(pair);
    let a = std::fs::read(&pair.alpha().disk).expect("alpha disk");
    let b = std::fs::read(&pair.beta().disk).expect("beta disk");
    assert!(
        a == b,
        "the copies differ after the link healed and resynced"
    );
    if let Some(log) = log {
        verify(log, &["--uri", &pair.alpha().uri()]);
    }
    pair.assert_no_panic();
}

#[test]
fn a_flipped_payload_byte_is_caught_by_the_crc_and_never_written() {
    let proxy = FaultProxy::start();
    let pair = pair_via(&proxy);
    let uri = pair.alpha().uri();
    qemu_io(&uri, "write -P 0x11 0 1M");
    // The next 1 MiB write's payload passes this point of the stream.
    let at = proxy.forwarded(Dir::Forward) + 40_000;
    proxy.set(
        Dir::Forward,
        Faults {
            flip_at: Some(at),
            ..Faults::default()
        },
    );
    // The link stays down once dropped, so beta's disk can be inspected.
    proxy.refuse(true);
    qemu_io(&uri, "write -P 0x22 0 1M");
    wait_disconnected(&pair, "dropping the corrupted link");
    assert!(
        pair.log(BETA).contains("crc32c mismatch"),
        "beta did not report the corruption:\n{}",
        pair.log(BETA)
    );
    let b = std::fs::read(&pair.beta().disk).expect("beta disk");
    let region = &b[..MIB as usize];
    assert!(
        region.iter().all(|&x| x == 0x11 || x == 0x22),
        "a corrupted byte reached beta's disk"
    );
    // Whatever beta lacks, alpha marked.
    let runs = pair.out_of_sync_runs(ALPHA);
    for (i, block) in region.chunks(4096).enumerate() {
        let off = i as u64 * 4096;
        if block.iter().any(|&x| x != 0x22) {
            assert!(
                runs.iter().any(|&(o, l)| o <= off && off < o + l),
                "block at {off} is old on beta and not marked on alpha: {runs:?}"
            );
        }
    }
    heal_and_converge(&pair, &proxy, None);
    qemu_io(&pair.alpha().uri(), "read -P 0x22 0 1M");
}

/// Under a writer, `faults` hit the link until the Primary drops it; the
/// writer sees no error; the marks cover what beta lacks; then it heals.
fn dropped_under_load(forward: Faults, back: Faults, what: &str) {
    let proxy = FaultProxy::start();
    let pair = pair_via(&proxy);
    let log = pair.dir.path().join("writes.log");
    let mut writer = writer(&pair, &log);
    writer.wait_acked();
    std::thread::sleep(Duration::from_millis(500));
    proxy.refuse(true);
    proxy.set(Dir::Forward, forward);
    proxy.set(Dir::Back, back);
    let started = Instant::now();
    wait_disconnected(&pair, what);
    let dropped_after = started.elapsed();
    // The Primary goes on without its peer.
    std::thread::sleep(Duration::from_millis(500));
    let summary = finish(writer);
    eprintln!("{what}: link dropped after {dropped_after:?}; writer {summary}");
    proxy.cut();
    let v = acked_writes_are_on_beta_or_marked(&pair, &log);
    eprintln!("{what}: beta against alpha's marks: {v}");
    heal_and_converge(&pair, &proxy, Some(&log));
}

#[test]
fn a_stalled_link_is_dropped_after_the_ping_timeout_and_the_primary_goes_on() {
    let stall = Faults {
        stall: true,
        ..Faults::default()
    };
    dropped_under_load(stall.clone(), stall, "a stalled link");
}

#[test]
fn a_half_open_link_that_loses_the_acks_is_dropped() {
    let stall = Faults {
        stall: true,
        ..Faults::default()
    };
    dropped_under_load(Faults::default(), stall, "acks never coming back");
}

#[test]
fn a_half_open_link_that_loses_the_writes_is_dropped() {
    let stall = Faults {
        stall: true,
        ..Faults::default()
    };
    dropped_under_load(stall, Faults::default(), "writes never arriving");
}

#[test]
fn a_reset_in_the_middle_of_a_frame_is_dropped_and_resynced() {
    // 4 KiB writes: 100,003 bytes on lands inside some frame.
    dropped_mid_frame(Dir::Forward, 100_003, "losing the reset link", |at| {
        Faults {
            reset_at: Some(at),
            ..Faults::default()
        }
    });
}

#[test]
fn a_link_closed_cleanly_in_the_middle_of_a_frame_is_dropped_and_resynced() {
    dropped_mid_frame(Dir::Back, 7, "losing the truncated link", |at| Faults {
        close_at: Some(at),
        ..Faults::default()
    });
}

/// Under a writer, the link in `dir` ends `ahead` bytes on (the fault
/// `at` builds); the marks cover what beta lacks, then it heals.
fn dropped_mid_frame(dir: Dir, ahead: u64, what: &str, at: impl Fn(u64) -> Faults) {
    let proxy = FaultProxy::start();
    let pair = pair_via(&proxy);
    let log = pair.dir.path().join("writes.log");
    let mut writer = writer(&pair, &log);
    writer.wait_acked();
    std::thread::sleep(Duration::from_millis(300));
    proxy.refuse(true);
    proxy.set(dir, at(proxy.forwarded(dir) + ahead));
    wait_disconnected(&pair, what);
    std::thread::sleep(Duration::from_millis(300));
    finish(writer);
    acked_writes_are_on_beta_or_marked(&pair, &log);
    heal_and_converge(&pair, &proxy, Some(&log));
}

#[test]
fn a_slow_link_stays_up_and_loses_nothing() {
    let proxy = FaultProxy::start();
    let pair = pair_via(&proxy);
    let slow = Faults {
        delay: Duration::from_millis(2),
        throttle: Some(8 * MIB),
        ..Faults::default()
    };
    proxy.set(Dir::Forward, slow.clone());
    proxy.set(Dir::Back, slow);
    let connections = proxy.accepted();
    let log = pair.dir.path().join("writes.log");
    let mut writer = writer(&pair, &log);
    writer.wait_acked();
    std::thread::sleep(Duration::from_millis(1500));
    finish(writer);
    assert!(
        pair.status(ALPHA).connected() && proxy.accepted() == connections,
        "the slow link was dropped:\n{}",
        pair.log(ALPHA)
    );
    assert_eq!(
        proxy.accepted(),
        connections,
        "the slow link was re-established"
    );
    // Protocol C: every acknowledged write is on beta, nothing excused.
    let disk = pair.beta().disk.to_str().expect("utf-8").to_owned();
    let v = verify(&log, &["--file", &disk]);
    assert_eq!(v["excused"], 0, "{v}");
    heal_and_converge(&pair, &proxy, Some(&log));
}

#[test]
fn a_peer_that_stalls_the_handshake_is_given_up_after_the_connect_timeout() {
    let proxy = FaultProxy::start();
    let stall = Faults {
        stall: true,
        ..Faults::default()
    };
    proxy.set(Dir::Forward, stall.clone());
    proxy.set(Dir::Back, stall);
    let pair = Pair::builder()
        .dial_via(proxy.addr())
        .replication("connect_timeout_ms", "1000")
        .replication("reconnect_max_ms", "300")
        .start_unconnected();
    proxy.set_target(pair.beta().repl_addr);
    // Each attempt hangs in the handshake until the timeout, then the
    // dialer closes it and tries again.
    let started = Instant::now();
    while proxy.accepted() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the dialer did not give up on a stalled handshake: {} attempts in 15 s",
            proxy.accepted()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let per_attempt = started.elapsed() / 2;
    eprintln!("stalled handshakes: about {per_attempt:?} per attempt");
    assert!(
        per_attempt >= Duration::from_millis(900),
        "attempts ended before the connect timeout: {per_attempt:?}"
    );
    assert!(!pair.status(ALPHA).connected());
    proxy.clear();
    pair.wait_connected();
    synced(&pair);
}

#[test]
fn a_flush_whose_barrier_ack_is_lost_completes_and_the_unflushed_writes_are_marked() {
    let proxy = FaultProxy::start();
    let pair = pair_via(&proxy);
    let mut client = common::client::Client::connect(&pair.alpha().nbd_addr(), "r0");
    for i in 0..16u64 {
        assert_eq!(client.write(i * 65536, &[0x77; 65536]), 0);
    }
    // The barrier reaches beta; its Ack never comes back.
    proxy.refuse(true);
    proxy.set(
        Dir::Back,
        Faults {
            stall: true,
            ..Faults::default()
        },
    );
    let started = Instant::now();
    assert_eq!(
        client.flush(),
        0,
        "the local flush succeeded: so does FLUSH"
    );
    let took = started.elapsed();
    eprintln!("FLUSH with its barrier ack lost returned after {took:?}");
    assert!(took < Duration::from_secs(10), "FLUSH took {took:?}");
    wait_disconnected(&pair, "dropping the link whose acks stopped");
    // Not known durable on beta: the written MiB is marked.
    let runs = pair.out_of_sync_runs(ALPHA);
    for off in (0..MIB).step_by(4096) {
        assert!(
            runs.iter().any(|&(o, l)| o <= off && off < o + l),
            "block at {off} written before the FLUSH is not marked: {runs:?}"
        );
    }
    client.disconnect();
    heal_and_converge(&pair, &proxy, None);
}

#[test]
fn reconnects_back_off_from_100_ms_doubling_to_the_cap_and_start_over_after_a_session() {
    let proxy = FaultProxy::start();
    // Every connection is closed at once: a failure, not a refusal.
    proxy.refuse(true);
    let pair = Pair::builder()
        .fresh()
        .dial_via(proxy.addr())
        .replication("reconnect_max_ms", "1000")
        .start_unconnected();
    proxy.set_target(pair.beta().repl_addr);
    for node in [ALPHA, BETA] {
        pair.ok(node, &["create-md", "r0"]);
    }
    // Nothing else happens on alpha from here (a promote, say, would wake
    // its link loop early): the attempts follow the backoff alone.
    pair.ok(BETA, &["up", "r0"]);
    pair.ok(ALPHA, &["up", "r0"]);
    let until = Instant::now() + Duration::from_secs(20);
    while proxy.attempts().len() < 7 {
        assert!(
            Instant::now() < until,
            "only {} attempts",
            proxy.attempts().len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = proxy.attempts();
    let gaps: Vec<u64> = t
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis() as u64)
        .collect();
    eprintln!("gaps between attempts (ms): {gaps:?}");
    // 100, 200, 400, 800, then the 1000 ms cap, each ±20 % (plus the
    // time an attempt takes on a loaded machine).
    for (gap, want) in gaps.iter().zip([100u64, 200, 400, 800, 1000, 1000]) {
        assert!(
            *gap >= want * 8 / 10 && *gap <= want * 12 / 10 + 300,
            "gap {gap} ms where {want} ms ±20 % was due: {gaps:?}"
        );
    }
    // A session resets the backoff: once connected, a dropped link is
    // retried after the first delay, not the cap.
    proxy.refuse(false);
    pair.wait_connected();
    let before = proxy.attempts().len();
    let cut = Instant::now();
    proxy.cut();
    let until = Instant::now() + Duration::from_secs(10);
    while proxy.attempts().len() == before {
        assert!(Instant::now() < until, "no reconnect after the cut");
        std::thread::sleep(Duration::from_millis(5));
    }
    let again = proxy.attempts()[before] - cut;
    eprintln!("reconnect after a session: {again:?}");
    assert!(
        again < Duration::from_millis(500),
        "the first retry after a session took {again:?}: the backoff did not start over"
    );
    pair.wait_connected();
}
