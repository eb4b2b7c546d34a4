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
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::pair::{Pair, ALPHA, BETA};
use common::proxy::{Dir, FaultProxy, Faults};

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

/// An `ackcheck write` at alpha, killed by PID if the test fails first.
struct Writer {
    child: Option<Child>,
    stop: std::path::PathBuf,
}

impl Writer {
    fn start(pair: &Pair, log: &Path) -> Writer {
        let stop = pair.dir.path().join("stop");
        let _ = std::fs::remove_file(&stop);
        let child = Command::new(ACKCHECK)
            .args(["write", "--uri", &pair.alpha().uri(), "--log"])
            .arg(log)
            .args(["--qd", "8", "--blocks", "4096", "--flush-every", "0"])
            .args(["--duration", "60", "--stop-file"])
            .arg(&stop)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ackcheck write");
        Writer {
            child: Some(child),
            stop,
        }
    }

    fn finish(mut self) -> Value {
        std::fs::write(&self.stop, b"").expect("stop file");
        let mut child = self.child.take().expect("running");
        let until = Instant::now() + Duration::from_secs(40);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the writer did not end within 40 s of its stop file");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("output");
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "writer summary {text:?} ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(v["failed"], 0, "the client saw write errors: {v}");
        assert_eq!(v["lost_connections"], 0, "{v}");
        assert!(v["acked"].as_u64().unwrap_or(0) > 0, "{v}");
        v
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn verify(log: &Path, extra: &[&str]) -> Value {
    let out = Command::new(ACKCHECK)
        .arg("verify")
        .arg("--log")
        .arg(log)
        .args(extra)
        .output()
        .expect("ackcheck verify");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "verify printed {text:?} ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "acknowledged writes missing: {v}");
    v
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
    let writer = Writer::start(&pair, &log);
    std::thread::sleep(Duration::from_millis(500));
    proxy.refuse(true);
    proxy.set(Dir::Forward, forward);
    proxy.set(Dir::Back, back);
    let started = Instant::now();
    wait_disconnected(&pair, what);
    let dropped_after = started.elapsed();
    // The Primary goes on without its peer.
    std::thread::sleep(Duration::from_millis(500));
    let summary = writer.finish();
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
    let proxy = FaultProxy::start();
    let pair = pair_via(&proxy);
    let log = pair.dir.path().join("writes.log");
    let writer = Writer::start(&pair, &log);
    std::thread::sleep(Duration::from_millis(300));
    proxy.refuse(true);
    // 4 KiB writes: 100,003 bytes on lands inside some frame.
    proxy.set(
        Dir::Forward,
        Faults {
            reset_at: Some(proxy.forwarded(Dir::Forward) + 100_003),
            ..Faults::default()
        },
    );
    wait_disconnected(&pair, "losing the reset link");
    std::thread::sleep(Duration::from_millis(300));
    writer.finish();
    acked_writes_are_on_beta_or_marked(&pair, &log);
    heal_and_converge(&pair, &proxy, Some(&log));
}

#[test]
fn a_link_closed_cleanly_in_the_middle_of_a_frame_is_dropped_and_resynced() {
    let proxy = FaultProxy::start();
    let pair = pair_via(&proxy);
    let log = pair.dir.path().join("writes.log");
    let writer = Writer::start(&pair, &log);
    std::thread::sleep(Duration::from_millis(300));
    proxy.refuse(true);
    proxy.set(
        Dir::Back,
        Faults {
            close_at: Some(proxy.forwarded(Dir::Back) + 7),
            ..Faults::default()
        },
    );
    wait_disconnected(&pair, "losing the truncated link");
    std::thread::sleep(Duration::from_millis(300));
    writer.finish();
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
    let writer = Writer::start(&pair, &log);
    std::thread::sleep(Duration::from_millis(1500));
    writer.finish();
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
