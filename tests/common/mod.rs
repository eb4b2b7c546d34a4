//! Shared harness for the integration tests: starts the real `repld`
//! binary on a temporary backing file with an OS-chosen port, and stops it
//! by PID (SIGTERM, then SIGKILL) when dropped, even if the test failed.

#![allow(dead_code)]

pub mod certs;
pub mod client;
pub mod forward;
pub mod pair;
pub mod proxy;
pub mod vm;
pub mod writer;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Upper bound for anything the harness waits on.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct DaemonBuilder {
    disk_size: u64,
    config_extra: String,
    nbd_extra: String,
    unix_socket: bool,
    resources: Vec<(String, Vec<u8>, String)>,
}

impl DaemonBuilder {
    /// Another resource `name`, backed by a file `NAME.img` holding
    /// `content`, with extra TOML keys for its table.
    pub fn resource(mut self, name: &str, content: Vec<u8>, keys: &str) -> Self {
        self.resources.push((name.into(), content, keys.into()));
        self
    }

    /// Size of the sparse backing file created for resource `r0`.
    pub fn disk_size(mut self, size: u64) -> Self {
        self.disk_size = size;
        self
    }

    /// Extra TOML appended after the `r0` resource (e.g. more resources).
    pub fn config_extra(mut self, toml: &str) -> Self {
        self.config_extra.push_str(toml);
        self
    }

    /// Extra keys for the `[nbd]` table.
    pub fn nbd_extra(mut self, toml: &str) -> Self {
        self.nbd_extra.push_str(toml);
        self
    }

    /// Also listen on a unix socket (`Daemon::socket`).
    pub fn unix_socket(mut self) -> Self {
        self.unix_socket = true;
        self
    }

    pub fn start(self) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("replblk-test-")
            .tempdir_in(std::env::var_os("REPLBLK_TEST_DIR").unwrap_or_else(|| "/var/tmp".into()))
            .expect("temp dir");
        let disk = dir.path().join("r0.img");
        File::create(&disk)
            .and_then(|f| f.set_len(self.disk_size))
            .expect("backing file");
        let socket = dir.path().join("nbd.sock");
        let mut config = String::from("[nbd]\nlisten = \"127.0.0.1:0\"\n");
        if self.unix_socket {
            config.push_str(&format!(
                "unix_socket = {:?}\n",
                socket.display().to_string()
            ));
        }
        config.push_str(&self.nbd_extra);
        config.push_str(&format!(
            "\n[control]\nsocket = {:?}\n",
            dir.path().join("ctl.sock").display().to_string()
        ));
        config.push_str(&format!(
            "\n[[resource]]\nname = \"r0\"\ndisk = {:?}\ndescription = \"test volume\"\n",
            disk.display().to_string()
        ));
        for (name, content, keys) in &self.resources {
            let path = dir.path().join(format!("{name}.img"));
            std::fs::write(&path, content).expect("extra backing file");
            config.push_str(&format!(
                "\n[[resource]]\nname = {name:?}\ndisk = {:?}\n{keys}\n",
                path.display().to_string()
            ));
        }
        config.push_str(&self.config_extra);
        let config_path = dir.path().join("repld.toml");
        std::fs::write(&config_path, &config).expect("config");
        let log = dir.path().join("repld.log");
        let child = spawn_repld(&config_path, &log);
        let mut daemon = Daemon {
            child: Some(child),
            dir,
            port: 0,
            disk,
            socket,
            log,
            config: config_path,
        };
        daemon.port = daemon.wait_for_port();
        daemon
    }
}

/// Runs `repld --config CONFIG` with stderr captured to `log`.
pub fn spawn_repld(config: &Path, log: &Path) -> Child {
    let log_file = File::create(log).expect("log file");
    Command::new(env!("CARGO_BIN_EXE_repld"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn repld")
}

pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub disk: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub config: PathBuf,
}

impl Daemon {
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder {
            disk_size: 64 << 20,
            config_extra: String::new(),
            nbd_extra: String::new(),
            unix_socket: false,
            resources: Vec::new(),
        }
    }

    /// A daemon serving a 64 MiB `r0` on TCP.
    pub fn start() -> Daemon {
        Self::builder().start()
    }

    pub fn uri(&self) -> String {
        self.uri_for("r0")
    }

    pub fn uri_for(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn wait_for_port(&mut self) -> u16 {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let text = self.log_text();
            if let Some(rest) = text.split("listening for NBD on tcp 127.0.0.1:").nth(1) {
                let port: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                if let Ok(p) = port.parse() {
                    return p;
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("repld exited early with {status}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "repld did not start listening within {WAIT:?}:\n{}",
            self.log_text()
        );
    }

    /// True while the process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends a signal to the daemon's PID.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGTERM and wait (bounded); returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit()
            .expect("repld did not exit within the bound after SIGTERM")
    }

    fn wait_exit(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own unreaped child's PID.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

/// Runs a client command with a time bound; returns (success, stdout, stderr).
pub fn run_tool(cmd: &mut Command) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {cmd:?}: {e} (is the package installed? tools/test.sh installs it)")
        });
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() > deadline {
            // SAFETY: kill(2) on our own child's PID.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
            panic!("{cmd:?} did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = out_t.join().unwrap_or_default();
    let err = err_t.join().unwrap_or_default();
    (status.success(), out, err)
}

/// Like `run_tool`, but panics with the tool's output if it failed.
pub fn run_ok(cmd: &mut Command) -> String {
    let (ok, out, err) = run_tool(cmd);
    assert!(ok, "{cmd:?} failed\nstdout:\n{out}\nstderr:\n{err}");
    out
}
