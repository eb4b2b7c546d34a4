//! A running `ackcheck write` for tests: ended through its stop file,
//! killed by PID if the test fails first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Writer {
    child: Option<Child>,
    stop: PathBuf,
    ready: PathBuf,
}

impl Writer {
    /// `ackcheck write --uri U... --log LOG ARGS --duration 60 --stop-file
    /// STOP --ready-file STOP.ready`.
    pub fn start(
        ackcheck: &str,
        uris: &[String],
        log: &Path,
        stop: PathBuf,
        args: &[&str],
    ) -> Writer {
        let _ = std::fs::remove_file(&stop);
        let ready = stop.with_extension("ready");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(ackcheck);
        cmd.arg("write");
        for u in uris {
            cmd.arg("--uri").arg(u);
        }
        let child = cmd
            .arg("--log")
            .arg(log)
            .args(args)
            .args(["--duration", "60", "--stop-file"])
            .arg(&stop)
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting ackcheck write");
        Writer {
            child: Some(child),
            stop,
            ready,
        }
    }

    /// Waits (bounded) until the server has acknowledged a first write:
    /// on a loaded machine the writer may take seconds to get going, and
    /// a fault injected before then would test nothing.
    pub fn wait_acked(&mut self) {
        let until = Instant::now() + Duration::from_secs(30);
        while !self.ready.exists() {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("wait") {
                panic!("ackcheck write ended ({status}) before its first acknowledged write");
            }
            assert!(
                Instant::now() < until,
                "no write acknowledged within 30 s of starting ackcheck write"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks the writer to end, waits (bounded) and returns its summary.
    pub fn finish(mut self) -> Value {
        std::fs::write(&self.stop, b"").expect("stop file");
        let mut child = self.child.take().expect("running");
        let until = Instant::now() + Duration::from_secs(40);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ackcheck write did not end within 40 s of its stop file");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "ackcheck summary {stdout:?} ({e}); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
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

/// `ackcheck verify --log LOG ARGS`: its JSON summary and whether it
/// passed.
pub fn verify(ackcheck: &str, log: &Path, args: &[&str]) -> (Value, bool) {
    let out = Command::new(ackcheck)
        .arg("verify")
        .arg("--log")
        .arg(log)
        .args(args)
        .output()
        .expect("ackcheck verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "verify printed {stdout:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out.status.success())
}

/// [`verify`], asserting that every acknowledged write was found.
pub fn verify_ok(ackcheck: &str, log: &Path, args: &[&str]) -> Value {
    let (v, ok) = verify(ackcheck, log, args);
    assert!(ok, "acknowledged writes missing: {v}");
    v
}
