//! Durability on the Secondary, observed rather than assumed: `strace`
//! records the Secondary's `fdatasync` calls with their times while
//! clients of the Primary write, and each test checks that a call began
//! after the request was sent and ended before its reply arrived.
//!
//! - One client's FLUSH must make another client's acknowledged writes
//!   durable on the Secondary (NBD_FLAG_CAN_MULTI_CONN: a flush covers
//!   every write completed before it, on every connection): the barrier
//!   the FLUSH becomes covers them.
//! - A FUA write is durable on the Secondary before it is acknowledged.
//!
//! Every wait is bounded; strace and the daemons are stopped by PID on
//! drop, and the temporary directory is removed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use replblk_proto::nbd::{cmd_flags, tflags, Command as NbdCommand};

use common::client::Client;
use common::pair::Pair;

/// `strace -f -ttt -T -e trace=fdatasync,fsync -p PID`, stopped by PID.
struct Trace {
    child: Option<Child>,
    out: PathBuf,
}

impl Trace {
    fn attach(pid: u32, out: PathBuf) -> Trace {
        let mut child = Command::new("strace")
            .args(["-f", "-ttt", "-T", "-e", "trace=fdatasync,fsync", "-o"])
            .arg(&out)
            .arg("-p")
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("strace (Debian package strace)");
        // strace says "attached" once per thread on stderr.
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("attached") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("strace did not attach within 20 s");
        // Let it attach to the remaining threads.
        std::thread::sleep(Duration::from_millis(300));
        Trace {
            child: Some(child),
            out,
        }
    }

    /// Stops strace (SIGINT detaches cleanly) and returns the calls:
    /// (start, end) in seconds since the epoch.
    fn calls(mut self) -> Vec<(f64, f64)> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by its PID.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGINT);
            }
            let until = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        parse(&self.out)
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Lines like `1234 1700000000.123456 fdatasync(7) = 0 <0.000321>`.
fn parse(path: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("fdatasync(") || l.contains("fsync("))
        .filter(|l| l.contains("= 0"))
        .filter_map(|l| {
            let start: f64 = l.split_whitespace().nth(1)?.parse().ok()?;
            let dur: f64 = l
                .rsplit_once('<')?
                .1
                .trim_end_matches('>')
                .trim()
                .parse()
                .ok()?;
            Some((start, start + dur))
        })
        .collect()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

fn synced_between(calls: &[(f64, f64)], sent: f64, replied: f64) -> bool {
    calls.iter().any(|&(s, e)| s >= sent && e <= replied)
}

#[test]
fn a_flush_on_one_connection_makes_another_connections_writes_durable_on_the_secondary() {
    let pair = Pair::start_default();
    let addr = pair.alpha().nbd_addr();
    let mut a = Client::connect(&addr, "r0");
    let mut b = Client::connect(&addr, "r0");
    assert_ne!(
        a.flags & tflags::CAN_MULTI_CONN,
        0,
        "CAN_MULTI_CONN not offered"
    );
    let trace = Trace::attach(
        pair.beta().pid().expect("beta runs"),
        pair.dir.path().join("beta.strace"),
    );
    let writes = now();
    for i in 0..16u64 {
        assert_eq!(a.write(i * 65536, &[0x5a; 65536]), 0);
    }
    // Nothing asked for durability yet.
    std::thread::sleep(Duration::from_millis(100));
    let sent = now();
    assert_eq!(b.flush(), 0);
    let replied = now();
    let calls = trace.calls();
    // The writes alone made nothing durable: the FLUSH did.
    assert!(
        !calls.iter().any(|&(s, _)| s >= writes && s < sent),
        "the Secondary synced before the FLUSH: {calls:?}"
    );
    assert!(
        synced_between(&calls, sent, replied),
        "no fdatasync on the Secondary between B's FLUSH ({sent:.6}) and its reply ({replied:.6}): {calls:?}"
    );
    a.disconnect();
    b.disconnect();
    pair.assert_no_panic();
}

#[test]
fn a_fua_write_is_durable_on_the_secondary_before_it_is_acknowledged() {
    let pair = Pair::start_default();
    let mut a = Client::connect(&pair.alpha().nbd_addr(), "r0");
    assert_ne!(a.flags & tflags::SEND_FUA, 0, "FUA not offered");
    let trace = Trace::attach(
        pair.beta().pid().expect("beta runs"),
        pair.dir.path().join("beta.strace"),
    );
    assert_eq!(a.write(0, &[0x33; 65536]), 0);
    std::thread::sleep(Duration::from_millis(100));
    let sent = now();
    let data = [0x44u8; 4096];
    let err = a.call(
        NbdCommand::Write,
        cmd_flags::FUA,
        1 << 20,
        data.len() as u32,
        &data,
    );
    let replied = now();
    assert_eq!(err, 0);
    let calls = trace.calls();
    assert!(
        synced_between(&calls, sent, replied),
        "no fdatasync on the Secondary between the FUA write ({sent:.6}) and its reply ({replied:.6}): {calls:?}"
    );
    a.disconnect();
    pair.assert_no_panic();
}

/// `ackcheck write` of `count` 4 KiB writes at depth 16 without flushes
/// over `blocks` blocks; returns how many distinct blocks it wrote.
fn unflushed_writes(pair: &Pair, log: &Path, count: u64, blocks: u64) -> usize {
    let out = Command::new(env!("CARGO_BIN_EXE_ackcheck"))
        .args(["write", "--uri", &pair.alpha().uri(), "--log"])
        .arg(log)
        .args(["--qd", "16", "--flush-every", "0"])
        .args([
            "--count",
            &count.to_string(),
            "--blocks",
            &blocks.to_string(),
        ])
        .output()
        .expect("ackcheck write");
    assert!(
        out.status.success(),
        "ackcheck write: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(log).expect("log");
    let distinct: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("I ")?.split_whitespace().nth(1))
        .collect();
    distinct.len()
}

#[test]
fn the_transfer_log_marks_unflushed_writes_of_a_lost_secondary_and_a_forced_barrier_bounds_it() {
    let mut pair = Pair::builder()
        .disk_size(256 << 20)
        .replication("ping_interval_ms", "200")
        .replication("transfer_log_max", "8192")
        .start();
    // Writes the Secondary acknowledged but never made durable (no flush):
    // when it is lost, every one is marked out of sync (its page cache may
    // have gone with it).
    let few = unflushed_writes(&pair, &pair.dir.path().join("few.log"), 2000, 1 << 16);
    pair.kill(common::pair::BETA);
    let s = pair.wait_status(common::pair::ALPHA, "losing beta", |s| !s.connected());
    assert!(
        s.out_of_sync_blocks >= few as u64,
        "{few} blocks written unflushed, only {} marked: {}",
        s.out_of_sync_blocks,
        s.raw
    );
    pair.start(common::pair::BETA);
    pair.wait_connected();
    for node in [common::pair::ALPHA, common::pair::BETA] {
        pair.ok(node, &["wait-sync", "r0", "--timeout", "60"]);
    }
    // Past `transfer_log_max` kept writes the Primary sends a barrier of
    // its own at the next ping: what it made durable is no longer kept,
    // so losing the Secondary afterwards marks far less than was written.
    let many = unflushed_writes(&pair, &pair.dir.path().join("many.log"), 40_000, 1 << 16);
    assert!(many > 3 * 8192, "only {many} distinct blocks written");
    // The forced barrier has been acknowledged once fewer are kept.
    pair.wait_status(common::pair::ALPHA, "the forced barrier", |s| {
        s.raw["resources"][0]["unstable_writes"]
            .as_u64()
            .is_some_and(|n| n <= 8192)
    });
    pair.kill(common::pair::BETA);
    let s = pair.wait_status(common::pair::ALPHA, "losing beta", |s| !s.connected());
    eprintln!(
        "{many} distinct blocks written unflushed; {} marked after the forced barrier",
        s.out_of_sync_blocks
    );
    assert!(
        s.out_of_sync_blocks <= 8192,
        "{} blocks marked: the forced barrier did not bound the transfer log",
        s.out_of_sync_blocks
    );
    pair.assert_no_panic();
}

#[test]
fn the_transfer_log_is_emptied_by_a_barrier_once_its_writes_are_old_enough() {
    let pair = Pair::builder()
        .disk_size(64 << 20)
        .replication("ping_interval_ms", "200")
        .replication("transfer_log_max_age_ms", "1000")
        .start();
    let kept = |s: &common::pair::Status| s.raw["resources"][0]["unstable_writes"].as_u64();
    let written = unflushed_writes(&pair, &pair.dir.path().join("old.log"), 500, 1 << 12);
    // Far below `transfer_log_max`: only their age brings the barrier.
    let s = pair.status(common::pair::ALPHA);
    assert!(
        kept(&s).is_some_and(|n| n > 0),
        "{written} writes made, none kept: {}",
        s.raw
    );
    pair.wait_status(common::pair::ALPHA, "the barrier for old writes", |s| {
        kept(s) == Some(0)
    });
    pair.assert_no_panic();
}
