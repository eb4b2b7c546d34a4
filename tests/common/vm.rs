//! The small test VM (tools/vm/): Debian's stock kernel and a busybox
//! initramfs under qemu's TCG, with a guest script appended as a second
//! cpio archive. The guest reaches the host's 127.0.0.1 as 10.0.2.2 (qemu
//! user networking). Console lines are collected on a thread; the test
//! waits for lines and can type a line into the console (set
//! REPLBLK_VM_CONSOLE=1 to see every line). Dropping a `Vm`
//! SIGKILLs qemu by PID and removes its directory.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::run_ok;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds (or finds cached) the VM; returns its directory.
pub fn build() -> PathBuf {
    let out = run_ok(Command::new("bash").arg(repo().join("tools/vm/build.sh")));
    PathBuf::from(out.trim())
}

/// The guest's address for the host's 127.0.0.1:PORT.
pub fn host_addr(port: u16) -> String {
    format!("10.0.2.2:{port}")
}

pub struct Vm {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every console line seen so far.
    pub seen: Vec<String>,
    pub started: Instant,
    dir: tempfile::TempDir,
    /// Print console lines as they come (REPLBLK_VM_CONSOLE=1); a failure
    /// shows the console's tail either way.
    echo: bool,
}

impl Vm {
    /// Boots the VM running `script` (busybox sh) as /test.sh, with each
    /// `(host binary, guest path)` copied in (stripped, with its
    /// libraries).
    pub fn boot(script: &str, binaries: &[(&Path, &str)]) -> Vm {
        Vm::boot_with_files(script, binaries, &[])
    }

    /// As `boot`, with each `(guest path, contents)` of `files` written
    /// into the guest's tree too (e.g. certificates).
    pub fn boot_with_files(
        script: &str,
        binaries: &[(&Path, &str)],
        files: &[(&str, &[u8])],
    ) -> Vm {
        build();
        let dir = tempfile::Builder::new()
            .prefix("replblk-vm-")
            .tempdir_in(std::env::var_os("REPLBLK_TEST_DIR").unwrap_or_else(|| "/var/tmp".into()))
            .expect("temp dir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).expect("root dir");
        std::fs::write(root.join("test.sh"), script).expect("script");
        for (path, contents) in files {
            let at = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(at.parent().expect("a file path")).expect("guest dir");
            std::fs::write(&at, contents).expect("guest file");
        }
        for (bin, dest) in binaries {
            let stripped = dir.path().join("stripped");
            run_ok(Command::new("strip").arg("-o").arg(&stripped).arg(bin));
            run_ok(
                Command::new("bash")
                    .arg(repo().join("tools/vm/add-binary.sh"))
                    .arg(&stripped)
                    .arg(&root)
                    .arg(dest),
            );
        }
        let mut child = Command::new("bash")
            .arg(repo().join("tools/vm/run.sh"))
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-system-x86_64 (tools/test.sh installs qemu-system-x86)");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = dir.path().join("console.log");
        std::thread::spawn(move || {
            let mut file = std::fs::File::create(log).ok();
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(raw) = line else { break };
                let line = String::from_utf8_lossy(&raw)
                    .trim_end_matches('\r')
                    .to_owned();
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Vm {
            child,
            stdin,
            lines: rx,
            seen: Vec::new(),
            started: Instant::now(),
            dir,
            echo: std::env::var_os("REPLBLK_VM_CONSOLE").is_some_and(|v| v == "1"),
        }
    }

    fn console_tail(&self) -> String {
        let n = self.seen.len().saturating_sub(60);
        self.seen[n..].join("\n")
    }

    /// Waits for a console line that `check` accepts; returns it. Panics
    /// with the console's tail on timeout or when the VM has exited.
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if self.echo {
                        println!("vm| {line}");
                    }
                    self.seen.push(line.clone());
                    if check(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "VM: no {what} within {timeout:?}; console:\n{}",
                    self.console_tail()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("VM exited before {what}; console:\n{}", self.console_tail())
                }
            }
        }
    }

    /// Types `line` into the guest's console.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("console input");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .expect("writing to the VM console");
    }

    /// Waits for the guest script's end ("VM-EXIT <status>") and for qemu
    /// to exit; returns the script's exit status.
    pub fn finish(&mut self, timeout: Duration) -> i32 {
        let line = self.wait_line("VM-EXIT", timeout, |l| l.contains("VM-EXIT "));
        let at = line.find("VM-EXIT ").expect("VM-EXIT") + "VM-EXIT ".len();
        let status: i32 = line[at..].trim().parse().expect("exit status");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("qemu did not exit after the guest powered off");
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own unreaped child's PID (run.sh
            // execs qemu, so this is qemu).
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

/// The `key=value` fields of a console line, as (key, value) pairs.
pub fn fields(line: &str) -> Vec<(String, String)> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The integer field `key` of a console line.
pub fn field(line: &str, key: &str) -> i64 {
    fields(line)
        .into_iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no integer {key}= in {line:?}"))
}
