//! Resource-level fencing end to end: two real `repld` processes on
//! loopback with `fencing = "resource-only"` and a fence-peer handler
//! script whose exit status the test controls; real qemu-io clients.
//!
//! Every wait is bounded; daemons and clients are stopped by PID, and the
//! temporary directories are removed, even when an assertion fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::pair::{Pair, ALPHA, BETA};
use common::run_tool;

/// A qemu-io client running in the background, killed by PID on drop.
struct Background(Child);

impl Background {
    fn qemu_io(uri: &str, cmd: &str) -> Background {
        Background(
            Command::new("qemu-io")
                .args(["-f", "raw", uri, "-c", cmd])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("qemu-io (package qemu-utils)"),
        )
    }

    fn running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// Waits (bounded) for the exit; returns success and the output.
    fn finish(mut self, within: Duration) -> (bool, String) {
        let deadline = Instant::now() + within;
        while self.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!self.running(), "qemu-io still running after {within:?}");
        let out = std::mem::replace(&mut self.0, Command::new("true").spawn().expect("true"))
            .wait_with_output()
            .expect("output");
        let _ = self.0.wait();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success() && !text.contains("fail"), text)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.running() {
            // SAFETY: kill(2) on our own child's PID.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGKILL) };
        }
        let _ = self.0.wait();
    }
}

/// The handler's files: `rc` holds the exit status the fence handler
/// returns; `log` collects one line per handler run.
struct Handlers {
    dir: tempfile::TempDir,
}

impl Handlers {
    fn new() -> Handlers {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("fence.sh");
        std::fs::write(
            &script,
            format!(
                "echo \"fence $REPLBLK_NODE $REPLBLK_PEER $REPLBLK_RESOURCE\" >> {log}\n\
                 exit $(cat {rc})\n",
                log = dir.path().join("log").display(),
                rc = dir.path().join("rc").display()
            ),
        )
        .expect("script");
        let h = Handlers { dir };
        h.set_rc(1);
        h
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn set_rc(&self, rc: i32) {
        std::fs::write(self.path("rc"), rc.to_string()).expect("rc");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("log")).unwrap_or_default()
    }

    fn keys(&self) -> String {
        format!(
            "fencing = \"resource-only\"\n\
             fence_peer_handler = \"sh {script}\"\n\
             unfence_peer_handler = \"echo unfence $REPLBLK_NODE $REPLBLK_PEER >> {log}\"\n\
             fence_retry_ms = 300\nfence_timeout_ms = 5000\n",
            script = self.path("fence.sh").display(),
            log = self.path("log").display()
        )
    }
}

fn pair_with(h: &Handlers) -> Pair {
    Pair::builder()
        .replication("ping_interval_ms", "200")
        .replication("ping_timeout_ms", "1000")
        .replication("reconnect_max_ms", "300")
        .resource_keys(&h.keys())
        .start()
}

fn st(pair: &Pair, node: &str) -> Value {
    pair.status(node).raw["resources"][0].clone()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn qemu_io_ok(uri: &str, cmd: &str) {
    let (ok, out, err) = run_tool(Command::new("qemu-io").args(["-f", "raw", uri, "-c", cmd]));
    assert!(
        ok && !out.contains("fail"),
        "qemu-io {cmd:?} on {uri}: {out}{err}"
    );
}

fn same_files(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("a") == std::fs::read(b).expect("b")
}

#[test]
fn a_primary_that_loses_its_peer_holds_writes_until_the_handler_fences_it() {
    let h = Handlers::new();
    let pair = pair_with(&h);
    let uri = pair.primary_uri();
    qemu_io_ok(&uri, "write -P 0x11 0 64k");

    // The link goes: alpha (Primary) freezes and runs the handler, which
    // fails (exit 1) and is retried.
    pair.ok(BETA, &["disconnect", "r0"]);
    wait_for("alpha frozen", || st(&pair, ALPHA)["io_frozen"] == true);
    wait_for("a handler retry", || {
        h.log().matches("fence alpha beta r0").count() >= 2
    });
    // A write waits: neither completed nor failed.
    let mut client = Background::qemu_io(&uri, "write -P 0x22 1M 64k");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(client.running(), "a write completed while frozen");
    assert_eq!(st(&pair, ALPHA)["io_frozen"], true);

    // The handler now fences the peer: the write completes.
    h.set_rc(4);
    let (ok, out) = client.finish(Duration::from_secs(20));
    assert!(ok, "the held write failed: {out}");
    let s = st(&pair, ALPHA);
    assert_eq!(s["io_frozen"], false);
    assert_eq!(s["peer_fenced"], true);
    assert!(pair.log(ALPHA).contains("writes resume"));
    // Further writes without the peer flow.
    qemu_io_ok(&uri, "write -P 0x33 2M 64k");

    // The peer's side of a fence-peer handler that outdates it.
    let out = pair.ok(BETA, &["outdate", "r0"]);
    assert!(out.contains("r0 is Outdated"), "{out}");
    let e = pair.ctl(BETA, &["promote", "r0"]).expect_err("refused");
    assert!(e.contains("Outdated, not UpToDate (use --force)"), "{e}");
    let e = pair.ctl(ALPHA, &["outdate", "r0"]).expect_err("refused");
    assert!(e.contains("outdate refused: this node is Primary"), "{e}");

    // Heal: beta resyncs, then alpha lifts the fence.
    pair.ok(BETA, &["connect", "r0"]);
    for node in [ALPHA, BETA] {
        pair.ok(node, &["wait-sync", "r0", "--timeout", "20"]);
    }
    wait_for("the unfence handler", || {
        h.log().contains("unfence alpha beta")
    });
    assert_eq!(st(&pair, ALPHA)["peer_fenced"], false);
    assert_eq!(st(&pair, BETA)["disk"], "UpToDate");
    qemu_io_ok(&uri, "read -P 0x22 1M 64k");
    qemu_io_ok(&uri, "read -P 0x33 2M 64k");
    assert!(same_files(&pair.alpha().disk, &pair.beta().disk));
}

#[test]
fn promoting_without_the_peer_fences_it_first_and_is_refused_if_that_fails() {
    let h = Handlers::new();
    let mut pair = pair_with(&h);
    qemu_io_ok(&pair.primary_uri(), "write -P 0x44 0 128k");
    pair.kill(ALPHA);
    wait_for("beta to lose alpha", || {
        st(&pair, BETA)["connection"] != "Connected"
    });

    h.set_rc(5);
    let e = pair.ctl(BETA, &["promote", "r0"]).expect_err("refused");
    assert!(
        e.contains("could not be fenced: the peer is unreachable and was not fenced"),
        "{e}"
    );
    assert_eq!(st(&pair, BETA)["role"], "Secondary");
    // Exit 6: the peer says it is Primary.
    h.set_rc(6);
    let e = pair.ctl(BETA, &["promote", "r0"]).expect_err("refused");
    assert!(e.contains("the peer is Primary"), "{e}");

    h.set_rc(4);
    pair.ok(BETA, &["promote", "r0"]);
    let s = st(&pair, BETA);
    assert_eq!(s["role"], "Primary");
    assert_eq!(s["peer_fenced"], true);
    // Writes without the peer do not freeze: it is fenced already.
    let uri = pair.beta().uri();
    qemu_io_ok(&uri, "read -P 0x44 0 128k");
    qemu_io_ok(&uri, "write -P 0x55 0 64k");
    assert_eq!(st(&pair, BETA)["io_frozen"], false);

    // Alpha comes back, resyncs from beta, and beta lifts the fence.
    pair.start(ALPHA);
    for node in [ALPHA, BETA] {
        pair.ok(node, &["wait-sync", "r0", "--timeout", "30"]);
    }
    wait_for("the unfence handler", || {
        h.log().contains("unfence beta alpha")
    });
    assert!(same_files(&pair.alpha().disk, &pair.beta().disk));
}

#[test]
fn the_outdate_peer_handler_marks_the_peer_outdated_through_another_path() {
    let h = Handlers::new();
    let handler = format!(
        "sh {script} {replctl} --socket \\\"$(cat {ctl})\\\"",
        script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tools/handlers/outdate-peer")
            .display(),
        replctl = env!("CARGO_BIN_EXE_replctl"),
        ctl = h.path("peer_ctl").display()
    );
    let pair = Pair::builder()
        .replication("ping_interval_ms", "200")
        .replication("ping_timeout_ms", "1000")
        .resource_keys(&format!(
            "fencing = \"resource-only\"\nfence_peer_handler = \"{handler}\"\nfence_retry_ms = 300\n"
        ))
        .start();
    std::fs::write(h.path("peer_ctl"), pair.beta().ctl.display().to_string()).expect("ctl");
    let uri = pair.primary_uri();
    qemu_io_ok(&uri, "write -P 0x61 0 64k");

    pair.ok(BETA, &["disconnect", "r0"]);
    wait_for("beta Outdated by alpha's handler", || {
        st(&pair, BETA)["disk"] == "Outdated"
    });
    wait_for("alpha's writes resumed", || {
        let s = st(&pair, ALPHA);
        s["io_frozen"] == false && s["peer_fenced"] == true
    });
    assert!(pair
        .log(ALPHA)
        .contains("the peer is fenced; writes resume"));
    qemu_io_ok(&uri, "write -P 0x62 64k 64k");
    let e = pair.ctl(BETA, &["promote", "r0"]).expect_err("refused");
    assert!(e.contains("Outdated, not UpToDate"), "{e}");

    pair.ok(BETA, &["connect", "r0"]);
    for node in [ALPHA, BETA] {
        pair.ok(node, &["wait-sync", "r0", "--timeout", "20"]);
    }
    assert_eq!(st(&pair, BETA)["disk"], "UpToDate");
    assert!(same_files(&pair.alpha().disk, &pair.beta().disk));
}
