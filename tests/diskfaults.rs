//! Faults on the local disk, injected into real `repld` processes through
//! their `REPLD_FAULTS` fault-spec file (`replblk::faults`): EIO on
//! writes, reads and flushes of the data, ENOSPC, and metadata write
//! errors, on the Primary and on the Secondary, with real NBD clients
//! (`ackcheck`, `qemu-io`). With `on_io_error = detach` (the default) a
//! failing disk is detached and the node goes on with its peer's copy:
//! the client sees no error while an UpToDate peer is connected, every
//! acknowledged write is on the peer, and after the disk is attached
//! again (`down` + `up`) a full resync makes the copies identical.
//!
//! Every wait is bounded; daemons and writers are stopped on drop and the
//! temporary directories removed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::pair::{EventWatch, Pair, PairBuilder, ALPHA, BETA};
use common::writer::{self, Writer};

const ACKCHECK: &str = env!("CARGO_BIN_EXE_ackcheck");
const MIB: u64 = 1 << 20;

/// The fault-spec file of one node.
struct Faults {
    path: PathBuf,
}

impl Faults {
    fn new(dir: &Path, node: &str) -> Faults {
        let path = dir.join(format!("{node}.faults"));
        std::fs::write(&path, "").expect("fault spec");
        Faults { path }
    }

    /// The wrapper that starts `repld` with this spec.
    fn wrapper(&self) -> Vec<String> {
        vec![
            "env".into(),
            format!("REPLD_FAULTS={}", self.path.display()),
        ]
    }

    /// Replaces the rules and waits (bounded) until the daemon loaded them.
    fn arm(&self, rules: &str) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, rules).expect("fault spec");
        std::fs::rename(&tmp, &self.path).expect("fault spec");
        let loaded = PathBuf::from(format!("{}.loaded", self.path.display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&loaded).ok().as_deref() != Some(rules) {
            assert!(
                Instant::now() < deadline,
                "the daemon did not load the fault spec {rules:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn disarm(&self) {
        self.arm("");
    }

    /// Replaces the rules without waiting (the daemon is not running).
    fn write_now(&self, rules: &str) {
        std::fs::write(&self.path, rules).expect("fault spec");
    }
}

struct Setup {
    pair: Pair,
    faults: Faults,
    _dir: tempfile::TempDir,
}

/// A connected, in-sync pair, alpha Primary, with fault injection on
/// `node`; `more` adjusts the builder.
fn setup_with(node: &str, more: impl FnOnce(PairBuilder) -> PairBuilder) -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let faults = Faults::new(dir.path(), node);
    let wrapper = faults.wrapper();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let builder = Pair::builder()
        .replication("ack_timeout_ms", "3000")
        .wrapper_on(node, &wrapper);
    let pair = more(builder).start();
    Setup {
        pair,
        faults,
        _dir: dir,
    }
}

fn setup(node: &str) -> Setup {
    setup_with(node, |b| b)
}

fn res(s: &common::pair::Status) -> &Value {
    &s.raw["resources"][0]
}

fn qemu_io(uri: &str, cmds: &[&str]) -> Result<String, String> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.output().expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() && !text.contains("failed") && !text.contains("error") {
        Ok(text)
    } else {
        Err(text)
    }
}

fn qemu_ok(uri: &str, cmds: &[&str]) {
    if let Err(text) = qemu_io(uri, cmds) {
        panic!("qemu-io {cmds:?}: {text}");
    }
}

fn writer(pair: &Pair, log: &Path) -> Writer {
    let args = ["--qd", "8", "--blocks", "4096", "--flush-every", "64"];
    let stop = pair.dir.path().join("stop");
    Writer::start(ACKCHECK, &[pair.alpha().uri()], log, stop, &args)
}

fn verify(log: &Path, extra: &[&str]) -> Value {
    writer::verify_ok(ACKCHECK, log, extra)
}

fn wait_diskless(pair: &Pair, node: &str) -> common::pair::Status {
    pair.wait_status(node, "the disk detached (Diskless)", |s| {
        res(s)["disk"] == "Diskless"
    })
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The disks are byte for byte the same.
fn assert_identical(pair: &Pair) {
    let a = std::fs::read(&pair.alpha().disk).expect("alpha disk");
    let b = std::fs::read(&pair.beta().disk).expect("beta disk");
    assert_eq!(a.len(), b.len());
    if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
        panic!("the copies differ, first at byte {i}");
    }
}

/// Gives `node` its disk back: faults off, `down` and `up` (a Secondary);
/// then waits for the full resync from the peer and checks the copies.
fn reattach_and_resync(pair: &Pair, faults: &Faults, node: &str) {
    faults.disarm();
    pair.ok(node, &["down", "r0"]);
    pair.ok(node, &["up", "r0"]);
    pair.wait_connected();
    for n in [ALPHA, BETA] {
        pair.ok(n, &["wait-sync", "r0", "--timeout", "60"]);
    }
    let s = pair.status(node);
    assert_eq!(res(&s)["disk"], "UpToDate", "{}", s.raw);
    assert!(res(&s)["disk_failure"].is_null(), "{}", s.raw);
    assert_identical(pair);
    pair.assert_no_panic();
}

#[test]
fn primary_write_errors_under_load_are_served_by_the_peer_and_resynced_after_reattach() {
    let Setup { pair, faults, _dir } = setup(ALPHA);
    let log = pair.dir.path().join("writes.log");
    let mut w = writer(&pair, &log);
    w.wait_acked();
    std::thread::sleep(Duration::from_millis(700));
    faults.arm("r0 data write 0 end EIO\n");
    let s = wait_diskless(&pair, ALPHA);
    assert_eq!(res(&s)["role"], "Primary", "{}", s.raw);
    assert!(
        res(&s)["disk_failure"]
            .as_str()
            .is_some_and(|f| f.contains("write")),
        "{}",
        s.raw
    );
    // Writes go on, to the peer only.
    std::thread::sleep(Duration::from_millis(700));
    let summary = w.finish();
    assert_eq!(summary["failed"], 0, "the client saw errors: {summary}");
    assert_eq!(summary["lost_connections"], 0, "{summary}");
    assert!(summary["acked"].as_u64().unwrap_or(0) > 100, "{summary}");
    // Every acknowledged write is on beta's disk; and alpha, reading
    // from beta now, serves them too.
    verify(&log, &["--file", path_str(&pair.beta().disk)]);
    verify(&log, &["--uri", &pair.alpha().uri()]);
    let b = pair.status(BETA);
    assert_eq!(res(&b)["peer_disk"], "Diskless", "{}", b.raw);
    assert_eq!(res(&b)["disk"], "UpToDate", "{}", b.raw);
    assert!(pair.log(ALPHA).contains("detaching the disk"));
    let human = pair.ok(ALPHA, &["status", "r0"]);
    assert!(human.contains("disk failed (detached)"), "{human}");
    // Recovery of a Primary's disk: switch over, then attach it again.
    pair.ok(ALPHA, &["demote", "r0"]);
    pair.ok(BETA, &["promote", "r0"]);
    reattach_and_resync(&pair, &faults, ALPHA);
    verify(&log, &["--file", path_str(&pair.alpha().disk)]);
}

#[test]
fn a_primary_read_error_is_served_from_the_peer() {
    let Setup { pair, faults, _dir } = setup(ALPHA);
    let uri = pair.alpha().uri();
    qemu_ok(&uri, &["write -P 0x5a 0 2M", "flush"]);
    faults.arm(&format!("r0 data read {MIB} 4096 EIO\n"));
    // The read that fails locally, and every later one, come from beta.
    qemu_ok(&uri, &["read -P 0x5a 0 2M", "read -P 0 2M 1M"]);
    let s = wait_diskless(&pair, ALPHA);
    assert!(
        res(&s)["disk_failure"]
            .as_str()
            .is_some_and(|f| f.contains("read")),
        "{}",
        s.raw
    );
    // Writes of a Diskless Primary land on beta only, and read back.
    qemu_ok(
        &uri,
        &["write -P 0xc3 4M 1M", "flush", "read -P 0xc3 4M 1M"],
    );
    let b = std::fs::read(&pair.beta().disk).expect("beta disk");
    assert!(b[(4 * MIB) as usize..(5 * MIB) as usize]
        .iter()
        .all(|&x| x == 0xc3));
    let a = std::fs::read(&pair.alpha().disk).expect("alpha disk");
    assert!(
        a[(4 * MIB) as usize..(5 * MIB) as usize]
            .iter()
            .all(|&x| x == 0),
        "a detached disk was written"
    );
    pair.assert_no_panic();
}

#[test]
fn a_primary_flush_error_detaches_and_the_flush_succeeds_on_the_peer() {
    let Setup { pair, faults, _dir } = setup_with(ALPHA, PairBuilder::metrics);
    let uri = pair.alpha().uri();
    let mut events = EventWatch::start(&pair, ALPHA);
    faults.arm("r0 data flush 0 end EIO\n");
    qemu_ok(&uri, &["write -P 0x33 0 64k", "flush"]);
    wait_diskless(&pair, ALPHA);
    // Events and metrics say so too.
    let e = events.wait_for("the disk Diskless", |v| {
        v["type"] == "change" && v["disk"] == "Diskless"
    });
    assert!(
        // qemu-io writes through (FUA): the flush rule hits that write.
        e["disk_failure"]
            .as_str()
            .is_some_and(|f| f.contains("flush") || f.contains("FUA write")),
        "{e}"
    );
    let metrics = pair.alpha().metrics_addr.expect("metrics address");
    let out = Command::new("curl")
        .args(["-sS", "-f", "--max-time", "10"])
        .arg(format!("http://{metrics}/metrics"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l == "replblk_disk_state{resource=\"r0\",state=\"Diskless\"} 1.0"),
        "{text}"
    );
    qemu_ok(
        &uri,
        &["write -P 0x34 64k 64k", "flush", "read -P 0x33 0 64k"],
    );
    let b = std::fs::read(&pair.beta().disk).expect("beta disk");
    assert!(b[..65536].iter().all(|&x| x == 0x33));
    assert!(b[65536..131072].iter().all(|&x| x == 0x34));
    pair.assert_no_panic();
}

#[test]
fn enospc_on_a_primary_write_is_handled_like_eio() {
    let Setup { pair, faults, _dir } = setup(ALPHA);
    let uri = pair.alpha().uri();
    faults.arm("r0 data write 8388608 end ENOSPC\n");
    qemu_ok(
        &uri,
        &["write -P 0x77 0 1M", "write -P 0x78 8M 1M", "flush"],
    );
    let s = wait_diskless(&pair, ALPHA);
    assert!(
        res(&s)["disk_failure"]
            .as_str()
            .is_some_and(|f| f.contains("space")),
        "{}",
        s.raw
    );
    qemu_ok(&uri, &["read -P 0x77 0 1M", "read -P 0x78 8M 1M"]);
    pair.assert_no_panic();
}

#[test]
fn a_secondary_write_error_detaches_it_the_primary_goes_on_and_reattach_resyncs() {
    let Setup { pair, faults, _dir } = setup(BETA);
    let log = pair.dir.path().join("writes.log");
    let mut w = writer(&pair, &log);
    w.wait_acked();
    std::thread::sleep(Duration::from_millis(700));
    faults.arm("r0 data write 0 end EIO\n");
    wait_diskless(&pair, BETA);
    let a = pair.wait_status(ALPHA, "seeing beta Diskless", |s| {
        res(s)["peer_disk"] == "Diskless"
    });
    assert!(a.connected(), "the session goes on: {}", a.raw);
    std::thread::sleep(Duration::from_millis(700));
    let summary = w.finish();
    assert_eq!(summary["failed"], 0, "the client saw errors: {summary}");
    assert!(summary["acked"].as_u64().unwrap_or(0) > 100, "{summary}");
    let a = pair.status(ALPHA);
    assert_eq!(res(&a)["disk"], "UpToDate", "{}", a.raw);
    assert!(
        a.out_of_sync_bytes > 0,
        "writes made without beta are accounted: {}",
        a.raw
    );
    verify(&log, &["--file", path_str(&pair.alpha().disk)]);
    reattach_and_resync(&pair, &faults, BETA);
    verify(&log, &["--file", path_str(&pair.beta().disk)]);
    let a = pair.status(ALPHA);
    assert_eq!(a.out_of_sync_bytes, 0, "{}", a.raw);
}

#[test]
fn a_secondary_whose_disk_and_metadata_failed_is_fully_resynced_after_a_restart() {
    let Setup {
        mut pair,
        faults,
        _dir,
    } = setup(BETA);
    let uri = pair.alpha().uri();
    qemu_ok(&uri, &["write -P 0x61 0 4M", "flush"]);
    // Beta can record nothing: its metadata fails as well as its data
    // (flushes included), so its superblock still says UpToDate at the
    // old generation when it comes back.
    faults.arm("r0 data write 0 end EIO\nr0 data flush 0 end EIO\nr0 meta write 0 end EIO\nr0 meta flush 0 end EIO\n");
    qemu_ok(&uri, &["write -P 0x62 0 1M", "flush"]);
    wait_diskless(&pair, BETA);
    pair.wait_status(ALPHA, "seeing beta Diskless", |s| {
        res(s)["peer_disk"] == "Diskless"
    });
    qemu_ok(&uri, &["write -P 0x63 2M 1M", "flush"]);
    let stopped = pair.stop(BETA);
    assert!(stopped.contains("writing metadata"), "{stopped}");
    faults.write_now("");
    pair.start(BETA);
    pair.wait_connected();
    for n in [ALPHA, BETA] {
        pair.ok(n, &["wait-sync", "r0", "--timeout", "60"]);
    }
    assert!(
        pair.log(ALPHA).contains("SyncSource { full: true }"),
        "alpha, which kept writing, must lead a full sync:\n{}",
        pair.log(ALPHA)
    );
    assert_identical(&pair);
    qemu_ok(
        &uri,
        &[
            "read -P 0x62 0 1M",
            "read -P 0x61 1M 1M",
            "read -P 0x63 2M 1M",
        ],
    );
    pair.assert_no_panic();
}

#[test]
fn a_metadata_write_error_is_reported_and_detaches_the_disk() {
    let Setup { pair, faults, _dir } = setup(ALPHA);
    let uri = pair.alpha().uri();
    faults.arm("r0 meta write 0 end EIO\n");
    // A write to an extent not yet in the activity log writes the log.
    qemu_ok(
        &uri,
        &["write -P 0x44 60M 64k", "flush", "read -P 0x44 60M 64k"],
    );
    let s = wait_diskless(&pair, ALPHA);
    let failure = res(&s)["disk_failure"].as_str().unwrap_or("").to_owned();
    assert!(failure.contains("metadata"), "{}", s.raw);
    assert!(
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("failed")),
        "{}",
        s.raw
    );
    assert!(
        pair.log(ALPHA).contains("writing the activity log failed"),
        "{}",
        pair.log(ALPHA)
    );
    let b = std::fs::read(&pair.beta().disk).expect("beta disk");
    let at = (60 * MIB) as usize;
    assert!(b[at..at + 65536].iter().all(|&x| x == 0x44));
    pair.assert_no_panic();
}

#[test]
fn without_a_connected_peer_a_disk_error_reaches_the_client_as_eio() {
    let Setup { pair, faults, _dir } = setup(ALPHA);
    let uri = pair.alpha().uri();
    qemu_ok(&uri, &["write -P 0x12 0 64k", "flush"]);
    pair.ok(ALPHA, &["disconnect", "r0"]);
    faults.arm("r0 data write 1048576 end EIO\n");
    let err = qemu_io(&uri, &["write -P 0x13 1M 64k"]).expect_err("the write must fail");
    assert!(err.contains("Input/output error"), "{err}");
    wait_diskless(&pair, ALPHA);
    // Nothing to serve from any more: reads fail too, never stale data.
    faults.disarm();
    let err = qemu_io(&uri, &["read 0 64k"]).expect_err("the read must fail");
    assert!(err.contains("Input/output error"), "{err}");
    let s = pair.status(ALPHA);
    assert_eq!(res(&s)["disk"], "Diskless", "{}", s.raw);
    pair.assert_no_panic();
}

#[test]
fn pass_on_returns_the_error_and_keeps_the_disk() {
    let Setup { pair, faults, _dir } =
        setup_with(ALPHA, |b| b.resource_key("on_io_error", "\"pass-on\""));
    let uri = pair.alpha().uri();
    faults.arm("r0 data write 1048576 4096 EIO\n");
    let err = qemu_io(&uri, &["write -P 0x21 1M 4k"]).expect_err("the write must fail");
    assert!(err.contains("Input/output error"), "{err}");
    faults.disarm();
    qemu_ok(&uri, &["write -P 0x22 2M 4k", "read -P 0x22 2M 4k"]);
    let s = pair.status(ALPHA);
    assert_eq!(res(&s)["disk"], "UpToDate", "{}", s.raw);
    assert!(res(&s)["disk_failure"].is_null(), "{}", s.raw);
    pair.assert_no_panic();
}

/// A small tmpfs mounted for one test; unmounted (by path) on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs { dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

#[test]
fn a_full_file_system_under_the_primary_detaches_its_disk() {
    // Declared first: dropped after the pair's daemons are gone.
    let fs = SmallFs::mount("4m");
    let pair = Pair::builder()
        .replication("ack_timeout_ms", "3000")
        .disk_dir_on(ALPHA, fs.dir.path())
        .start();
    let uri = pair.alpha().uri();
    // 64 MiB sparse backing file on a 4 MiB file system: it fills up.
    qemu_ok(&uri, &["write -P 0x5e 0 8M", "flush", "read -P 0x5e 0 8M"]);
    let s = wait_diskless(&pair, ALPHA);
    assert!(
        res(&s)["disk_failure"]
            .as_str()
            .is_some_and(|f| f.contains("No space left")),
        "{}",
        s.raw
    );
    let b = std::fs::read(&pair.beta().disk).expect("beta disk");
    assert!(b[..(8 * MIB) as usize].iter().all(|&x| x == 0x5e));
    pair.assert_no_panic();
    drop(pair);
}
