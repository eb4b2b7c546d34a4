//! The activity log and the bitmap on disk, with real daemons: a Primary
//! killed (SIGKILL) under random 4 KiB writes comes back with only the
//! extents of its activity log out of sync, not the device; the same when
//! both nodes are killed; extents evicted from the log keep their marks
//! in the bitmap on disk; with the log disabled a crash means a full
//! resync; a clean restart needs no resync at all; a demoted Primary
//! killed later comes back with its own marks, not its log's extents.
//!
//! Every wait is bounded; daemons and fio are stopped by PID.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::pair::*;
use common::run_tool;
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const EXTENT: u64 = 4 * MIB;

fn st(pair: &Pair, node: &str) -> Value {
    pair.status(node).raw["resources"][0].clone()
}

fn oos_bytes(pair: &Pair, node: &str) -> u64 {
    st(pair, node)["out_of_sync_bytes"]
        .as_u64()
        .expect("out_of_sync_bytes")
}

fn wait_synced(pair: &Pair) {
    for node in [ALPHA, BETA] {
        pair.ok(node, &["wait-sync", "r0", "--timeout", "60"]);
    }
}

fn qemu_io_ok(uri: &str, cmd: &str) {
    let (ok, out, err) = run_tool(Command::new("qemu-io").args(["-f", "raw", "-c", cmd, uri]));
    assert!(ok, "qemu-io {cmd} failed: {out}{err}");
}

/// Runs fio random 4 KiB writes at depth 32 over the first `span` bytes
/// in the background, for at most `secs` seconds; the caller kills the
/// daemon under it. The job runs as a thread (`--thread`), so killing
/// fio's PID ends all of it: a forked job would outlive its parent.
fn fio_in_background(dir: &Path, uri: &str, span: u64, secs: u32) -> std::process::Child {
    Command::new("fio")
        .current_dir(dir)
        .args([
            "--name=al",
            "--thread",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--time_based",
            &format!("--runtime={secs}"),
            &format!("--size={span}"),
            &format!("--uri={uri}"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("fio")
}

/// Waits (bounded) until alpha's activity log holds extents, so fio's
/// writes are flowing however slowly it started, then lets them run on.
fn wait_under_load(pair: &Pair) {
    pair.wait_status(ALPHA, "writes in the activity log", |s| {
        s.raw["resources"][0]["activity_log"]["active"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });
    std::thread::sleep(Duration::from_millis(1500));
}

/// Ends fio (by PID) if it still runs.
struct Bg(std::process::Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stops both and compares the exported data (internal metadata, which
/// names each node, excluded).
fn assert_identical(pair: &mut Pair) {
    let size = st(pair, ALPHA)["size"].as_u64().expect("size") as usize;
    pair.stop(ALPHA);
    pair.stop(BETA);
    let a = read_disk(&pair.alpha().disk);
    let b = read_disk(&pair.beta().disk);
    let differ = a[..size]
        .chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .count();
    assert_eq!(differ, 0, "{differ} blocks differ after the resync");
}

/// The Primary killed under load: only its logged extents (at most the
/// hot set, inside the written span) are out of sync when it comes back;
/// the resync copies those, and the copies end identical.
#[test]
fn a_primary_killed_under_random_writes_resyncs_only_its_activity_log() {
    let mut pair = Pair::builder()
        .disk_size(256 * MIB)
        .resource_key("al_extents", "16")
        .start();
    let span = 48 * MIB;
    let fio = Bg(fio_in_background(
        pair.dir.path(),
        &pair.primary_uri(),
        span,
        120,
    ));
    wait_under_load(&pair);
    let before = st(&pair, ALPHA);
    let al = &before["activity_log"];
    assert_eq!(al["capacity"], 16, "{before}");
    assert!(al["active"].as_u64().unwrap_or(0) > 0, "{before}");
    pair.kill(ALPHA);
    drop(fio);
    pair.wait_status(BETA, "losing alpha", |s| !s.connected());
    // Keep beta away while alpha's recovered bitmap is looked at.
    pair.ok(BETA, &["disconnect", "r0"]);
    pair.start(ALPHA);
    let log = pair.log(ALPHA);
    assert!(
        log.contains("activity log are marked out of sync"),
        "alpha did not recover from its activity log:\n{log}"
    );
    let oos = oos_bytes(&pair, ALPHA);
    eprintln!("alpha after the crash: {oos} bytes out of sync");
    assert!(oos > 0, "nothing out of sync after a crash under load");
    assert!(
        oos <= 16 * EXTENT,
        "{oos} bytes out of sync: more than the hot set of 16 extents"
    );
    let runs = pair.out_of_sync_runs(ALPHA);
    assert!(
        runs.iter().all(|(o, l)| o + l <= span),
        "marks outside the written span: {runs:?}"
    );
    pair.ok(BETA, &["connect", "r0"]);
    pair.wait_connected();
    wait_synced(&pair);
    let a = st(&pair, ALPHA);
    assert_eq!(a["decision"]["rule"], "crashed-primary-local", "{a}");
    assert_eq!(
        a["decision"]["decision"]["sync-source"]["full"], false,
        "the resync was not bitmap-based: {a}"
    );
    pair.assert_no_panic();
    assert_identical(&mut pair);
}

/// Both nodes killed under load (a power cut as far as processes go: the
/// page cache survives), then restarted: the Primary's log bounds the
/// resync, and the copies end identical.
#[test]
fn both_nodes_killed_under_random_writes_resync_only_the_activity_log() {
    let mut pair = Pair::builder()
        .disk_size(256 * MIB)
        .resource_key("al_extents", "16")
        .start();
    let fio = Bg(fio_in_background(
        pair.dir.path(),
        &pair.primary_uri(),
        32 * MIB,
        120,
    ));
    wait_under_load(&pair);
    // Alpha first: it never learns that beta went.
    pair.kill(ALPHA);
    pair.kill(BETA);
    drop(fio);
    pair.start(ALPHA);
    let oos = oos_bytes(&pair, ALPHA);
    eprintln!("alpha after both crashed: {oos} bytes out of sync");
    assert!(
        oos > 0 && oos <= 16 * EXTENT,
        "{oos} bytes out of sync on alpha"
    );
    pair.start(BETA);
    pair.wait_connected();
    wait_synced(&pair);
    let a = st(&pair, ALPHA);
    assert_eq!(a["decision"]["rule"], "crashed-primary-local", "{a}");
    assert_eq!(
        a["decision"]["decision"]["sync-source"]["full"], false,
        "{a}"
    );
    pair.assert_no_panic();
    assert_identical(&mut pair);
}

/// Extents pushed out of a small hot set keep the marks of the writes
/// the peer did not get: their bitmap pages were written before they
/// left. One block in each of 40 extents, written while disconnected
/// through a log of 16: all 40 blocks are out of sync after a crash.
#[test]
fn evicted_extents_keep_their_marks_in_the_bitmap_on_disk() {
    let mut pair = Pair::builder()
        .disk_size(256 * MIB)
        .resource_key("al_extents", "16")
        .start();
    pair.ok(BETA, &["disconnect", "r0"]);
    pair.wait_status(ALPHA, "losing beta", |s| !s.connected());
    let uri = pair.primary_uri();
    let mut script = Vec::new();
    for i in 0..40u64 {
        script.push("-c".to_string());
        script.push(format!(
            "write -P 0x{:02x} {} 4k",
            0x40 + i,
            i * EXTENT + 8 * KIB
        ));
    }
    let (ok, out, err) = run_tool(
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .args(&script)
            .arg(&uri),
    );
    assert!(ok, "qemu-io: {out}{err}");
    let a = st(&pair, ALPHA);
    assert_eq!(a["out_of_sync_bytes"], 40 * 4096, "{a}");
    assert!(
        a["activity_log"]["evictions"].as_u64().unwrap_or(0) >= 24,
        "{a}"
    );
    pair.kill(ALPHA);
    pair.start(ALPHA);
    let runs = pair.out_of_sync_runs(ALPHA);
    for i in 0..40u64 {
        let at = i * EXTENT + 8 * KIB;
        assert!(
            runs.iter().any(|&(o, l)| o <= at && at + 4096 <= o + l),
            "the write to extent {i} is no longer marked: {runs:?}"
        );
    }
    let oos = oos_bytes(&pair, ALPHA);
    assert!(
        oos <= 16 * EXTENT + 40 * 4096,
        "{oos} bytes: more than the hot set and the marked blocks"
    );
    pair.ok(BETA, &["connect", "r0"]);
    pair.wait_connected();
    wait_synced(&pair);
    pair.assert_no_panic();
    assert_identical(&mut pair);
}

/// With `al_extents = 0` there is no log: a crashed Primary leads a full
/// resync (every block marked), as before the log existed.
#[test]
fn without_the_log_a_crashed_primary_marks_every_block() {
    let mut pair = Pair::builder()
        .disk_size(32 * MIB)
        .resource_key("al_extents", "0")
        .start();
    qemu_io_ok(&pair.primary_uri(), "write -P 0x33 1M 64k");
    assert!(st(&pair, ALPHA)["activity_log"].is_null());
    pair.kill(ALPHA);
    pair.wait_status(BETA, "losing alpha", |s| !s.connected());
    pair.ok(BETA, &["disconnect", "r0"]);
    pair.start(ALPHA);
    let size = st(&pair, ALPHA)["size"].as_u64().expect("size");
    assert_eq!(oos_bytes(&pair, ALPHA), size);
    pair.ok(BETA, &["connect", "r0"]);
    pair.wait_connected();
    wait_synced(&pair);
    let a = st(&pair, ALPHA);
    assert_eq!(
        a["decision"]["decision"]["sync-source"]["full"], true,
        "{a}"
    );
    assert_identical(&mut pair);
}

/// A Primary that wrote while its peer was away, then was demoted and
/// killed: the bits its writes set were written at the demote, so it
/// comes back with exactly those blocks out of sync, not the extents of
/// its activity log (a Secondary has no writes of its own in flight).
#[test]
fn a_demoted_primary_killed_later_comes_back_with_its_own_marks_only() {
    let mut pair = Pair::builder().disk_size(64 * MIB).start();
    pair.ok(ALPHA, &["disconnect", "r0"]);
    pair.wait_status(BETA, "losing alpha", |s| !s.connected());
    // 64 KiB in each of three extents.
    for at in ["0", "20M", "44M"] {
        qemu_io_ok(&pair.primary_uri(), &format!("write -P 0x4d {at} 64k"));
    }
    let marked = 3 * 64 * KIB;
    assert_eq!(oos_bytes(&pair, ALPHA), marked);
    pair.ok(ALPHA, &["demote", "r0"]);
    pair.kill(ALPHA);
    // It connects again by itself and leads the sync.
    pair.start(ALPHA);
    pair.wait_connected();
    wait_synced(&pair);
    let a = st(&pair, ALPHA);
    // What the sync covered (a zero or unwritten run would go as
    // write-zeroes and not count as moved).
    assert_eq!(
        a["resync"]["total_bytes"].as_u64(),
        Some(marked),
        "the marks written at the demote, no activity-log extents: {a}"
    );
    assert_identical(&mut pair);
}

/// A clean stop after writes through the log: nothing is out of sync on
/// restart and the pair needs no resync; the log is empty again.
#[test]
fn a_clean_restart_after_logged_writes_needs_no_resync() {
    // A link dropped by a starved daemon (the test pairs' 1.5 s ping
    // timeout, on a loaded machine) would rightly mark the writes: that
    // is not what this test is about.
    let mut pair = Pair::builder()
        .disk_size(64 * MIB)
        .resource_key("al_extents", "16")
        .internal_meta()
        .replication("ping_timeout_ms", "20000")
        .start();
    qemu_io_ok(&pair.primary_uri(), "write -P 0x21 0 12M");
    let a = st(&pair, ALPHA);
    assert!(
        a["activity_log"]["transactions"].as_u64().unwrap_or(0) >= 1,
        "{a}"
    );
    pair.ok(ALPHA, &["demote", "r0"]);
    pair.restart(ALPHA);
    assert_eq!(oos_bytes(&pair, ALPHA), 0);
    pair.wait_connected();
    wait_synced(&pair);
    let a = st(&pair, ALPHA);
    assert_eq!(a["decision"]["decision"], "no-sync", "{a}");
    assert_eq!(a["activity_log"]["active"], 0, "{a}");
    assert_identical(&mut pair);
}

/// A torn or corrupt newest transaction is ignored (its writes were never
/// issued): recovery uses the older ones. Here the newest block is
/// damaged after the fact; the extents of the intact transactions are
/// exactly what is marked, the log says one block was invalid, and the
/// copies still end identical.
#[test]
fn a_corrupt_newest_activity_log_block_is_ignored() {
    let mut pair = Pair::builder()
        .disk_size(256 * MIB)
        .resource_key("al_extents", "16")
        .start();
    let dump = pair.replctl(ALPHA, &["dump-md", "r0"]).expect("dump-md");
    let active = dump["metadata"]["active"].as_u64().expect("active") as usize;
    let sb = &dump["metadata"]["slots"][active]["Ok"];
    let al_offset = sb["al_offset"].as_u64().expect("al_offset");
    let al_len = sb["al_len"].as_u64().expect("al_len");
    let mut script = Vec::new();
    for e in [0u64, 1, 2, 3, 4, 5, 10] {
        script.push("-c".to_string());
        script.push(format!("write -P 0x{:02x} {} 4k", 0x10 + e, e * EXTENT));
    }
    let (ok, out, err) = run_tool(
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .args(&script)
            .arg(pair.primary_uri()),
    );
    assert!(ok, "qemu-io: {out}{err}");
    pair.kill(ALPHA);
    pair.wait_status(BETA, "losing alpha", |s| !s.connected());
    pair.ok(BETA, &["disconnect", "r0"]);
    // Damage the newest transaction (the one that made extent 10 hot).
    let md = pair.alpha().meta.clone();
    let ring = {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&md).expect("metadata");
        let mut buf = vec![0u8; al_len as usize];
        f.read_exact_at(&mut buf, al_offset).expect("read the log");
        buf
    };
    let found = replblk::core::actlog::recover(&ring);
    assert_eq!(found.extents, vec![0, 1, 2, 3, 4, 5, 10], "{found:?}");
    let newest = ring
        .chunks(4096)
        .position(|b| replblk::core::actlog::decode(b).is_ok_and(|d| d.seq == found.last_seq))
        .expect("newest block");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&md)
            .expect("metadata");
        f.write_all_at(&[0xAB; 100], al_offset + newest as u64 * 4096 + 1000)
            .expect("damage");
    }
    pair.start(ALPHA);
    let log = pair.log(ALPHA);
    assert!(log.contains("invalid_blocks=1"), "{log}");
    let runs = pair.out_of_sync_runs(ALPHA);
    assert_eq!(runs, vec![(0, 6 * EXTENT)], "{runs:?}");
    pair.ok(BETA, &["connect", "r0"]);
    pair.wait_connected();
    wait_synced(&pair);
    pair.assert_no_panic();
    assert_identical(&mut pair);
}

/// The end of a sync is recorded only once the bits it cleared are
/// cleared on disk too. A sync target killed the moment its sync is done
/// (before the periodic bitmap write) comes back with nothing marked: not
/// the sync's stale marks, which at the same generation would make it
/// the next sync's source (`local-dirty-bits`), and which, against a
/// peer's real marks, would win whenever the peer is the one that dials.
#[test]
fn a_sync_target_killed_as_its_sync_ends_comes_back_with_nothing_marked() {
    let mut pair = Pair::builder().disk_size(64 * MIB).start();
    for round in 0..3u64 {
        pair.kill(BETA);
        let cmd = format!("write -P 0x{:x} {}M 8M", 0x31 + round, round * 8);
        qemu_io_ok(&pair.primary_uri(), &cmd);
        pair.start(BETA);
        pair.ok(BETA, &["wait-sync", "r0", "--timeout", "60"]);
        // At once, well within the periodic write's second.
        pair.kill(BETA);
        // Beta comes back alone: what it marks is what its disk says.
        pair.stop(ALPHA);
        pair.start(BETA);
        let oos = oos_bytes(&pair, BETA);
        assert_eq!(
            oos, 0,
            "round {round}: beta came back with {oos} bytes marked after its sync had ended"
        );
        pair.start(ALPHA);
        pair.wait_connected();
        wait_synced(&pair);
        pair.ok(ALPHA, &["promote", "r0"]);
    }
    pair.assert_no_panic();
    assert_identical(&mut pair);
}
