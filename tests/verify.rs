//! Online verify and invalidate, end to end with two real `repld`
//! processes on loopback, real NBD clients (qemu-io) and the backing
//! files changed behind the daemons' backs with `pwrite`.
//!
//! Every wait is bounded; daemons and client processes are stopped by
//! PID and the temporary directory is removed.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::pair::{EventWatch, Pair, ALPHA, BETA};
use common::run_tool;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn st(pair: &Pair, node: &str) -> Value {
    pair.status(node).raw["resources"][0].clone()
}

fn qemu_io_ok(uri: &str, cmd: &str) {
    let (ok, out, err) = run_tool(Command::new("qemu-io").args(["-f", "raw", uri, "-c", cmd]));
    assert!(
        ok && !out.contains("fail"),
        "qemu-io {cmd:?} on {uri}: {out}{err}"
    );
}

fn wait_synced(pair: &Pair) {
    for node in [ALPHA, BETA] {
        pair.ok(node, &["wait-sync", "r0", "--timeout", "20"]);
    }
}

fn pwrite(path: &std::path::Path, offset: u64, data: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.write_all_at(data, offset))
        .expect("writing the backing file");
}

fn disks_identical(pair: &Pair) -> bool {
    std::fs::read(&pair.alpha().disk).expect("alpha")
        == std::fs::read(&pair.beta().disk).expect("beta")
}

/// Runs `verify` on `node` and waits (bounded) until it ends; returns
/// its status object.
fn verify(pair: &Pair, node: &str) -> Value {
    let out = pair.ok(node, &["verify", "r0"]);
    assert!(out.contains("online verify"), "{out}");
    let s = pair.wait_status(node, "verify to end", |s| {
        let v = &s.raw["resources"][0]["verify"];
        v["state"] != "running" && !v.is_null()
    });
    let v = s.raw["resources"][0]["verify"].clone();
    eprintln!("{node}: verify {v}");
    v
}

#[test]
fn verify_of_identical_copies_reports_no_difference() {
    let pair = Pair::start_default();
    qemu_io_ok(&pair.primary_uri(), "write -P 0x37 1M 3M");
    wait_synced(&pair);
    let mut watch = EventWatch::start(&pair, ALPHA);
    let v = verify(&pair, ALPHA);
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["out_of_sync_blocks"], 0, "{v}");
    assert_eq!(v["done_bytes"], v["total_bytes"], "{v}");
    assert_eq!(v["total_bytes"], 64 * MIB, "{v}");
    let e = watch.wait_for("the verify's end event", |e| {
        e["type"] == "verify" && e["verify"]["state"] == "done"
    });
    assert_eq!(e["verify"]["out_of_sync_bytes"], 0, "{e}");
    assert_eq!(st(&pair, ALPHA)["out_of_sync_bytes"], 0);
    assert!(pair.log(ALPHA).contains("no differences"), "no log line");
    // The Secondary may verify too.
    let v = verify(&pair, BETA);
    assert_eq!(
        (v["state"].clone(), v["out_of_sync_blocks"].clone()),
        ("done".into(), 0.into()),
        "{v}"
    );
}

#[test]
fn verify_finds_a_block_changed_behind_the_daemons_back_and_reconnect_repairs_it() {
    let pair = Pair::start_default();
    qemu_io_ok(&pair.primary_uri(), "write -P 0x37 0 8M");
    wait_synced(&pair);
    // Two blocks of the Secondary's copy changed under it, one of them
    // in a range the Primary never wrote.
    pwrite(&pair.beta().disk, 5 * MIB + 4 * KIB, &[0xee; 4096]);
    pwrite(&pair.beta().disk, 40 * MIB, &[0x01; 1]);
    // Run from the Secondary: its digests are taken in the link's order.
    let v = verify(&pair, BETA);
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["out_of_sync_blocks"], 2, "{v}");
    assert_eq!(v["out_of_sync_bytes"], 8 * KIB, "{v}");
    // Marked on both nodes, not repaired yet.
    for node in [ALPHA, BETA] {
        let runs = pair.out_of_sync_runs(node);
        assert_eq!(
            runs,
            [(5 * MIB + 4 * KIB, 4 * KIB), (40 * MIB, 4 * KIB)],
            "{node}"
        );
    }
    assert!(!disks_identical(&pair));
    let text = pair.ok(BETA, &["status", "r0"]);
    assert!(
        text.contains("verify: done 100.0%") && text.contains("out-of-sync:2 blocks"),
        "{text}"
    );
    assert!(
        pair.log(BETA)
            .contains("found 2 blocks (8192 bytes) out of sync"),
        "no log line"
    );
    // Disconnect and connect: the Primary's copy wins.
    pair.ok(BETA, &["disconnect", "r0"]);
    pair.ok(BETA, &["connect", "r0"]);
    pair.wait_status(BETA, "reconnected", |s| s.connected());
    wait_synced(&pair);
    assert!(disks_identical(&pair), "copies differ after the resync");
    let v = verify(&pair, ALPHA);
    assert_eq!(v["out_of_sync_blocks"], 0, "{v}");
    pair.assert_no_panic();
}

/// A verify by `verifier` finds a block the Primary never wrote changed
/// on the Secondary; both nodes are then killed. Each must come back with
/// the block marked (no activity log covers it: only the bitmap on disk
/// can), and the resync after they connect repairs it.
fn verify_marks_survive_a_crash(verifier: &str, al_extents: Option<&str>) {
    let mut builder = Pair::builder();
    if let Some(n) = al_extents {
        builder = builder.resource_key("al_extents", n);
    }
    let mut pair = builder.start();
    qemu_io_ok(&pair.primary_uri(), "write -P 0x37 0 8M");
    wait_synced(&pair);
    let at = 40 * MIB;
    pwrite(&pair.beta().disk, at, &[0x01; 1]);
    let v = verify(&pair, verifier);
    assert_eq!(v["out_of_sync_blocks"], 1, "{v}");
    // The verifying node wrote its bitmap before reporting the end; the
    // peer's bitmap writer writes it as the marks arrive.
    let peer = if verifier == ALPHA { BETA } else { ALPHA };
    pair.wait_log_line(peer, "the marks of an online verify are on disk");
    pair.kill(ALPHA);
    pair.kill(BETA);
    // Each node comes back with the mark, looked at before they connect.
    pair.start(ALPHA);
    pair.ok(ALPHA, &["disconnect", "r0"]);
    pair.start(BETA);
    for node in [ALPHA, BETA] {
        let runs = pair.out_of_sync_runs(node);
        assert!(
            runs.iter().any(|&(o, l)| o <= at && at + 4 * KIB <= o + l),
            "{node} forgot the verify's mark at {at}: {runs:?}"
        );
    }
    pair.ok(ALPHA, &["connect", "r0"]);
    pair.wait_connected();
    wait_synced(&pair);
    assert!(disks_identical(&pair), "copies differ after the resync");
    pair.assert_no_panic();
}

#[test]
fn the_marks_of_a_verify_survive_both_nodes_killed_after_it() {
    verify_marks_survive_a_crash(BETA, None);
}

/// Without an activity log a killed Primary marks every block; the
/// Secondary trusts its bitmap, which gets the verify's marks from its
/// bitmap writer (running without a log too).
#[test]
fn the_marks_of_a_verify_survive_a_crash_without_an_activity_log() {
    verify_marks_survive_a_crash(ALPHA, Some("0"));
}

/// Runs batches of qemu-io writes all over the first `span` bytes until
/// `stop` (bounded at 2 minutes), counting finished batches in `done`.
fn writer(
    uri: String,
    span: u64,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU32>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut batch = 0u64;
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            let mut cmd = Command::new("qemu-io");
            cmd.args(["-f", "raw", &uri]);
            // Many writes in flight at once (aio), so every chunk of
            // `span` nearly always has one in flight.
            for i in 0..200u64 {
                let off = ((batch * 200 + i) * 7919 * 4096) % span;
                cmd.arg("-c")
                    .arg(format!("aio_write -P {} {off} 16k", (i + batch) % 250 + 1));
            }
            cmd.arg("-c").arg("aio_flush");
            let (ok, out, err) = run_tool(&mut cmd);
            assert!(ok, "qemu-io: {out}{err}");
            batch += 1;
            done.fetch_add(1, Ordering::SeqCst);
        }
    })
}

#[test]
fn writes_during_a_verify_are_not_reported_as_differences() {
    let pair = Pair::builder().disk_size(16 * MIB).start();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU32::new(0));
    let w = writer(pair.primary_uri(), MIB, stop.clone(), done.clone());
    // Verify from both nodes, over and over, until the writer finished
    // several batches meanwhile (bounded).
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut results = Vec::new();
    let started_at = done.load(Ordering::SeqCst);
    while (results.len() < 20 || done.load(Ordering::SeqCst) < started_at + 3)
        && Instant::now() < deadline
    {
        for node in [ALPHA, BETA] {
            results.push((node, verify(&pair, node)));
        }
    }
    let overlapped = done.load(Ordering::SeqCst) - started_at;
    stop.store(true, Ordering::SeqCst);
    w.join().expect("writer");
    for (node, v) in &results {
        assert_eq!(v["state"], "done", "{node}: {v}");
        assert_eq!(v["out_of_sync_blocks"], 0, "{node}: {v}");
    }
    assert!(
        overlapped >= 3,
        "only {overlapped} write batches ran during {} verifies",
        results.len()
    );
    wait_synced(&pair);
    assert!(disks_identical(&pair));
}

#[test]
fn a_verify_can_be_stopped_and_is_refused_when_not_in_sync() {
    let pair = Pair::builder().disk_size(512 * MIB).start();
    pair.ok(ALPHA, &["verify", "r0"]);
    let e = pair
        .ctl(ALPHA, &["verify", "r0"])
        .expect_err("second verify");
    assert!(e.contains("already running"), "{e}");
    let out = pair.ok(ALPHA, &["verify", "r0", "--stop"]);
    assert!(out.contains("verify stopped"), "{out}");
    let v = st(&pair, ALPHA)["verify"].clone();
    assert_eq!(v["state"], "stopped", "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains("operator"),
        "{v}"
    );
    let e = pair
        .ctl(ALPHA, &["verify", "r0", "--stop"])
        .expect_err("nothing to stop");
    assert!(e.contains("no verify"), "{e}");
    pair.ok(BETA, &["disconnect", "r0"]);
    pair.wait_status(ALPHA, "losing beta", |s| !s.connected());
    let e = pair
        .ctl(ALPHA, &["verify", "r0"])
        .expect_err("verify while apart");
    assert!(e.contains("verify refused"), "{e}");
}

#[test]
fn invalidate_makes_the_secondary_a_full_sync_target() {
    let pair = Pair::start_default();
    qemu_io_ok(&pair.primary_uri(), "write -P 0x21 0 4M");
    wait_synced(&pair);
    // Damage beta's copy where no bitmap knows about it.
    pwrite(&pair.beta().disk, 30 * MIB, &[0x99; 8192]);
    let e = pair
        .ctl(ALPHA, &["invalidate", "r0"])
        .expect_err("on the Primary");
    assert!(
        e.contains("invalidate refused") && e.contains("Primary"),
        "{e}"
    );
    let out = pair.ok(BETA, &["invalidate", "r0"]);
    assert!(out.contains("invalidated"), "{out}");
    pair.wait_status(BETA, "reconnected", |s| s.connected());
    wait_synced(&pair);
    let b = st(&pair, BETA);
    assert_eq!(
        b["decision"]["decision"]["sync-target"]["full"], true,
        "{b}"
    );
    assert!(disks_identical(&pair), "copies differ after the full sync");
    // And the other way round, asked from the Primary.
    pwrite(&pair.beta().disk, 31 * MIB, &[0x98; 4096]);
    let out = pair.ok(ALPHA, &["invalidate-remote", "r0"]);
    assert!(out.contains("asked the peer"), "{out}");
    pair.wait_log_line(BETA, "the peer asks this node to invalidate");
    pair.wait_status(BETA, "reconnected", |s| s.connected());
    wait_synced(&pair);
    assert!(
        disks_identical(&pair),
        "copies differ after invalidate-remote"
    );
    pair.assert_no_panic();
}
