//! The acknowledged-write checker (`ackcheck`) against a real pair: every
//! write the Primary acknowledged is on the Secondary that takes over
//! after the Primary is SIGKILLed mid-run, and the checker itself catches
//! a write that went missing.
//!
//! Every wait is bounded; daemons and the writer are stopped by PID on
//! drop, and the temporary directory is removed.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::pair::{Pair, ALPHA, BETA};
use common::writer::{self, Writer};

const ACKCHECK: &str = env!("CARGO_BIN_EXE_ackcheck");

/// A writer at depth 8 with a flush every 64 writes, reconnecting for up
/// to 20 s across the given nodes.
fn writer(uris: &[String], log: &Path, stop: PathBuf) -> Writer {
    let args = ["--qd", "8", "--flush-every", "64", "--reconnect", "20"];
    Writer::start(ACKCHECK, uris, log, stop, &args)
}

/// `A` lines in the log so far.
fn acks(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("A "))
        .count()
}

fn wait_acks(log: &Path, at_least: usize) {
    let until = Instant::now() + Duration::from_secs(30);
    while acks(log) < at_least {
        assert!(
            Instant::now() < until,
            "the writer logged {} acks, not {at_least}, within 30 s",
            acks(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ackcheck verify`: its summary and whether it passed.
fn verify(log: &Path, source: &[&str]) -> (Value, bool) {
    writer::verify(ACKCHECK, log, source)
}

#[test]
fn every_write_the_killed_primary_acknowledged_is_on_the_new_primary() {
    let mut pair = Pair::start_default();
    let log = pair.dir.path().join("writes.log");
    let uris = [pair.alpha().uri(), pair.beta().uri()];
    // The writer's log is flushed only when a connection ends and at the
    // end; the acks are counted from what it logged by then.
    let mut writer = writer(&uris, &log, pair.dir.path().join("stop"));
    writer.wait_acked();
    std::thread::sleep(Duration::from_millis(700));
    pair.kill(ALPHA);
    pair.wait_status(BETA, "losing alpha", |s| !s.connected());
    wait_acks(&log, 1);
    let before = acks(&log);
    pair.ok(BETA, &["promote", "r0"]);
    // The writer finds beta, now Primary, and goes on there.
    std::thread::sleep(Duration::from_millis(700));
    let summary = writer.finish();
    eprintln!("writer: {summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["lost_connections"], 1, "{summary}");
    let after = acks(&log);
    assert!(
        after > before,
        "no write was acknowledged after the failover: {summary}"
    );
    let (v, ok) = verify(&log, &["--uri", &pair.beta().uri()]);
    eprintln!("verify on beta: {v}");
    assert!(ok, "acknowledged writes missing on the new Primary: {v}");
    assert_eq!(v["lost"], 0, "{v}");
    assert!(v["required"].as_u64().unwrap_or(0) > 0, "{v}");

    // The old Primary comes back as Secondary and resyncs: both copies
    // pass, and are identical.
    pair.start(ALPHA);
    pair.wait_connected();
    for node in [ALPHA, BETA] {
        pair.ok(node, &["wait-sync", "r0", "--timeout", "30"]);
    }
    let (v, ok) = verify(
        &log,
        &["--file", pair.alpha().disk.to_str().expect("utf-8 path")],
    );
    assert!(
        ok,
        "the resynced old Primary lacks acknowledged writes: {v}"
    );
    let a = std::fs::read(&pair.alpha().disk).expect("alpha disk");
    let b = std::fs::read(&pair.beta().disk).expect("beta disk");
    assert!(a == b, "the copies differ after the resync");
    pair.assert_no_panic();
}

#[test]
fn the_checker_reports_an_acknowledged_write_that_went_missing() {
    let mut pair = Pair::start_default();
    let log = pair.dir.path().join("writes.log");
    let mut writer = writer(&[pair.alpha().uri()], &log, pair.dir.path().join("stop"));
    writer.wait_acked();
    std::thread::sleep(Duration::from_millis(500));
    let summary = writer.finish();
    assert!(summary["acked"].as_u64().unwrap_or(0) > 0, "{summary}");
    let (v, ok) = verify(&log, &["--uri", &pair.alpha().uri()]);
    assert!(ok && v["lost"] == 0, "{v}");
    // Put back zeros behind the daemon's back where one acknowledged write
    // landed: the checker must notice.
    pair.stop(BETA);
    let text = std::fs::read_to_string(&log).expect("log");
    let block: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("I ")?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .expect("a write in the log");
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(&pair.beta().disk)
        .expect("beta disk");
    disk.write_all_at(&[0u8; 4096], block * 4096)
        .expect("zero the block");
    drop(disk);
    let path = pair.beta().disk.to_str().expect("utf-8 path").to_owned();
    let (v, ok) = verify(&log, &["--file", &path]);
    assert!(!ok, "a zeroed acknowledged block passed: {v}");
    assert_eq!(v["lost"], 1, "{v}");
}
