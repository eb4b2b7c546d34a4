//! Two-node harness for replication tests: writes the config of a
//! replicated resource `r0` shared by nodes "alpha" (the one that dials)
//! and "beta" (the one that accepts), starts one real `repld` per node
//! (each with its own log file, optionally under a wrapper such as
//! `ip netns exec NS`), and bootstraps the pair as an operator would with
//! `replctl`: `create-md` and `up` on each node, then, once connected,
//! `new-current-uuid --clear-bitmap` (both fresh disks are zero-filled)
//! and `promote` on alpha; a pair started unconnected gets
//! `promote --force` on alpha instead. It stops or kills the daemons by
//! PID. Dropping a `Pair` SIGKILLs whatever is still
//! running and removes the temporary directory (configs, disks, logs,
//! control sockets).
//!
//! `NetnsLink` builds two network namespaces joined by a veth pair and
//! deletes them again when dropped.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{run_tool, WAIT};

/// The two node names; alpha sorts lower, so alpha dials beta.
pub const ALPHA: &str = "alpha";
pub const BETA: &str = "beta";
const NAMES: [&str; 2] = [ALPHA, BETA];

/// Upper bound for a daemon to exit after SIGTERM (it drains NBD requests
/// and flushes first).
pub const STOP_WAIT: Duration = Duration::from_secs(30);

fn index(node: &str) -> usize {
    NAMES
        .iter()
        .position(|n| *n == node)
        .unwrap_or_else(|| panic!("no node named {node:?} (nodes are alpha and beta)"))
}

/// A TCP port for a daemon to listen on. Ports come from below the
/// kernel's ephemeral range (`ip_local_port_range`), so that between this
/// call and the daemon's bind neither another test's bind to port 0 nor
/// the source port of an outgoing connection (a peer dialling) can take
/// it: a port released by a bind to port 0 could be handed out again at
/// once. Each call in this process gets a port of its own; the process id
/// spreads concurrent test binaries apart, and a port that something holds
/// is skipped.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let range: Vec<u32> = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .map(|t| {
            t.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let (ephemeral_low, ephemeral_high) = match range[..] {
        [l, h] => (l, h),
        _ => (32768, 60999),
    };
    let (low, high) = if ephemeral_low > 12000 {
        (10000, ephemeral_low)
    } else {
        (ephemeral_high.clamp(1024, 60000) + 1, 65536)
    };
    let span = high - low;
    let base = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low + (base + n) % span) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port in {low}..{high}");
}

/// What one node's side of the pair looks like before it starts.
#[derive(Debug, Clone, Default)]
struct NodeSpec {
    secret: Option<String>,
    resource: Option<String>,
    disk_size: Option<u64>,
    /// Where the backing file goes (default: the pair's directory).
    disk_dir: Option<PathBuf>,
    wrapper: Vec<String>,
    ip: Option<IpAddr>,
    nbd_listen: Option<SocketAddr>,
    start: bool,
    /// Extra `[[resource]]` keys in this node's config file.
    resource_keys: Vec<(String, String)>,
}

pub struct PairBuilder {
    disk_size: u64,
    description: String,
    secret: String,
    resource: String,
    replication: Vec<(String, String)>,
    resync: Vec<(String, String)>,
    specs: [NodeSpec; 2],
    internal_meta: bool,
    bootstrap: bool,
    /// Extra keys for the `[[resource]]` table.
    resource_keys: String,
    metrics: bool,
    /// Keys for `[resource.on.ABOUT]` in the config file of FILE (`None`:
    /// every file): (file, about, keys).
    on_keys: Vec<(Option<usize>, usize, String)>,
    /// Write `secret = ...` into the resource table.
    inline_secret: bool,
    dial_via: Option<SocketAddr>,
    /// Keys for the `[nbd]` table of both config files (e.g. TLS).
    nbd_keys: String,
}

impl PairBuilder {
    /// Extra TOML lines for the `[nbd]` table of both nodes (e.g. TLS).
    pub fn nbd_keys(mut self, toml: &str) -> Self {
        self.nbd_keys.push_str(toml);
        self
    }

    /// alpha (the node that dials) reaches beta's replication address
    /// through `addr` (a fault proxy of the test's) instead of directly.
    pub fn dial_via(mut self, addr: SocketAddr) -> Self {
        self.dial_via = Some(addr);
        self
    }

    /// Each node serves Prometheus metrics on a port of its own
    /// (`Node::metrics_addr`).
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Extra TOML lines for the `[[resource]]` table (e.g. fencing keys).
    pub fn resource_keys(mut self, toml: &str) -> Self {
        self.resource_keys.push_str(toml);
        self
    }

    /// Metadata at the end of each backing file (default: a separate
    /// `NODE.md` file, so the backing files hold data only).
    pub fn internal_meta(mut self) -> Self {
        self.internal_meta = true;
        self
    }

    /// Start the daemons only: no metadata, nothing up, nobody promoted.
    pub fn fresh(mut self) -> Self {
        self.bootstrap = false;
        self
    }

    /// Size of both sparse backing files (unless overridden per node).
    pub fn disk_size(mut self, size: u64) -> Self {
        self.disk_size = size;
        self
    }

    /// The resource's description (what NBD clients are shown).
    pub fn description(mut self, text: &str) -> Self {
        self.description = text.into();
        self
    }

    /// Sets (or overrides) a `[replication]` key, e.g. `("ack_timeout_ms", "5000")`.
    pub fn replication(mut self, key: &str, value: &str) -> Self {
        self.replication.retain(|(k, _)| k != key);
        self.replication.push((key.into(), value.into()));
        self
    }

    /// Sets (or overrides) a `[resync]` key, e.g. `("c_min_rate_mib", "8")`.
    pub fn resync(mut self, key: &str, value: &str) -> Self {
        self.resync.retain(|(k, _)| k != key);
        self.resync.push((key.into(), value.into()));
        self
    }

    /// `node`'s config file has this secret (the nodes then get one config
    /// file each).
    pub fn secret_on(mut self, node: &str, secret: &str) -> Self {
        self.specs[index(node)].secret = Some(secret.into());
        self
    }

    /// `node`'s config file names the resource `name` instead of "r0".
    pub fn resource_on(mut self, node: &str, name: &str) -> Self {
        self.specs[index(node)].resource = Some(name.into());
        self
    }

    /// Sets a `[[resource]]` key (raw TOML value) in both nodes' config,
    /// e.g. `("after_sb_0pri", "\"discard-least-changes\"")`.
    pub fn resource_key(mut self, key: &str, value: &str) -> Self {
        for spec in self.specs.iter_mut() {
            spec.resource_keys.retain(|(k, _)| k != key);
            spec.resource_keys.push((key.into(), value.into()));
        }
        self
    }

    /// Sets a `[[resource]]` key in `node`'s config only.
    pub fn resource_key_on(mut self, node: &str, key: &str, value: &str) -> Self {
        let spec = &mut self.specs[index(node)];
        spec.resource_keys.retain(|(k, _)| k != key);
        spec.resource_keys.push((key.into(), value.into()));
        self
    }

    /// `node`'s backing file has this size.
    pub fn disk_size_on(mut self, node: &str, size: u64) -> Self {
        self.specs[index(node)].disk_size = Some(size);
        self
    }

    /// `node`'s backing file is created in `dir` (e.g. a small file
    /// system the test mounted) instead of the pair's directory.
    pub fn disk_dir_on(mut self, node: &str, dir: &Path) -> Self {
        self.specs[index(node)].disk_dir = Some(dir.to_path_buf());
        self
    }

    /// Runs `node`'s repld as `WRAPPER... repld --config ...`. The wrapper
    /// must exec repld (as `ip netns exec` does) so the PID is repld's.
    pub fn wrapper_on(mut self, node: &str, wrapper: &[&str]) -> Self {
        self.specs[index(node)].wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self
    }

    /// `node` listens for NBD and replication on `ip` (default 127.0.0.1).
    pub fn ip_on(mut self, node: &str, ip: IpAddr) -> Self {
        self.specs[index(node)].ip = Some(ip);
        self
    }

    /// `node` listens for NBD on `addr` (default: its IP, port 0), e.g.
    /// `0.0.0.0:PORT` to take connections for an address that moves.
    pub fn nbd_listen_on(mut self, node: &str, addr: SocketAddr) -> Self {
        self.specs[index(node)].nbd_listen = Some(addr);
        self
    }

    /// Starts only `node`; the other is configured but not started (start
    /// it later with `Pair::start`), e.g. to talk to `node` as a fake peer.
    pub fn only(mut self, node: &str) -> Self {
        for (i, spec) in self.specs.iter_mut().enumerate() {
            spec.start = NAMES[i] == node;
        }
        self
    }

    /// Keys for `[resource.on.ABOUT]`, in the config file of `file` (or in
    /// both files with `None`).
    pub fn on_keys(mut self, file: Option<&str>, about: &str, keys: &str) -> Self {
        self.on_keys
            .push((file.map(index), index(about), keys.to_owned()));
        self
    }

    /// Leave the inline `secret` out (a `secret_file` replaces it).
    pub fn no_inline_secret(mut self) -> Self {
        self.inline_secret = false;
        self
    }

    fn config_text(&self, node: usize, nodes: &[Node; 2]) -> String {
        let spec = &self.specs[node];
        let secret = spec.secret.as_deref().unwrap_or(&self.secret);
        let resource = spec.resource.as_deref().unwrap_or(&self.resource);
        let mut text = String::new();
        if !self.nbd_keys.is_empty() {
            text.push_str(&format!("[nbd]\n{}\n", self.nbd_keys));
        }
        text.push_str("[replication]\n");
        for (k, v) in &self.replication {
            text.push_str(&format!("{k} = {v}\n"));
        }
        if !self.resync.is_empty() {
            text.push_str("\n[resync]\n");
            for (k, v) in &self.resync {
                text.push_str(&format!("{k} = {v}\n"));
            }
        }
        for n in nodes {
            text.push_str(&format!(
                "\n[nodes.{}]\nnbd_listen = \"{}\"\ncontrol_socket = {:?}\n",
                n.name,
                n.nbd_listen,
                n.ctl.display().to_string()
            ));
            if let Some(m) = n.metrics_addr {
                text.push_str(&format!("metrics_listen = \"{m}\"\n"));
            }
        }
        text.push_str(&format!(
            "\n[[resource]]\nname = {resource:?}\ndescription = {:?}\n",
            self.description
        ));
        if self.inline_secret {
            text.push_str(&format!("secret = {secret:?}\n"));
        }
        text.push_str(&self.resource_keys);
        for (k, v) in &spec.resource_keys {
            text.push_str(&format!("{k} = {v}\n"));
        }
        for (i, n) in nodes.iter().enumerate() {
            let address = match self.dial_via {
                Some(via) if node == 0 && n.name == BETA => via,
                _ => n.repl_addr,
            };
            text.push_str(&format!(
                "\n[resource.on.{}]\ndisk = {:?}\naddress = \"{}\"\n",
                n.name,
                n.disk.display().to_string(),
                address
            ));
            for (file, about, keys) in &self.on_keys {
                if *about == i && file.is_none_or(|f| f == node) {
                    text.push_str(keys);
                }
            }
            if !self.internal_meta {
                text.push_str(&format!("meta_disk = {:?}\n", n.meta.display().to_string()));
            }
        }
        text
    }

    /// Writes the config, creates the disks and starts the daemons; waits
    /// (bounded) until both report `Connected` if both were started.
    pub fn start(self) -> Pair {
        let both = self.specs.iter().all(|s| s.start);
        let bootstrap = self.bootstrap;
        let pair = self.start_nodes();
        if both && bootstrap {
            pair.wait_connected();
            pair.promote_fresh_alpha();
        } else if both {
            pair.wait_connected();
        } else if bootstrap && self_started(&pair, ALPHA) {
            let r = pair.alpha().resource.clone();
            pair.ok(ALPHA, &["promote", &r, "--force"]);
        }
        pair
    }

    /// Like `start`, but does not wait for the nodes to connect: alpha is
    /// promoted with `--force` right away.
    pub fn start_unconnected(self) -> Pair {
        let bootstrap = self.bootstrap;
        let pair = self.start_nodes();
        if bootstrap && self_started(&pair, ALPHA) {
            let r = pair.alpha().resource.clone();
            pair.ok(ALPHA, &["promote", &r, "--force"]);
        }
        pair
    }

    fn start_nodes(self) -> Pair {
        let dir = tempfile::Builder::new()
            .prefix("replblk-pair-")
            .tempdir_in(std::env::var_os("REPLBLK_TEST_DIR").unwrap_or_else(|| "/var/tmp".into()))
            .expect("temp dir");
        let mut nodes = NAMES.map(|name| {
            let spec = &self.specs[index(name)];
            let ip = spec.ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
            Node {
                name,
                config: PathBuf::new(),
                log: dir.path().join(format!("{name}.log")),
                disk: spec
                    .disk_dir
                    .as_deref()
                    .unwrap_or(dir.path())
                    .join(format!("{name}.img")),
                meta: dir.path().join(format!("{name}.md")),
                disk_size: spec.disk_size.unwrap_or(self.disk_size),
                ctl: dir.path().join(format!("{name}.ctl")),
                ip,
                nbd_listen: spec.nbd_listen.unwrap_or(SocketAddr::new(ip, 0)),
                repl_addr: SocketAddr::new(ip, free_port()),
                metrics_addr: self.metrics.then(|| SocketAddr::new(ip, free_port())),
                nbd_port: 0,
                resource: spec
                    .resource
                    .clone()
                    .unwrap_or_else(|| self.resource.clone()),
                wrapper: spec.wrapper.clone(),
                child: None,
                log_start: 0,
                md_created: false,
            }
        });
        for n in &nodes {
            File::create(&n.disk)
                .and_then(|f| f.set_len(n.disk_size))
                .expect("backing file");
            if !self.internal_meta {
                File::create(&n.meta)
                    .and_then(|f| f.set_len(META_FILE_SIZE))
                    .expect("metadata file");
            }
        }
        let texts = [self.config_text(0, &nodes), self.config_text(1, &nodes)];
        if texts[0] == texts[1] {
            let path = dir.path().join("pair.toml");
            std::fs::write(&path, &texts[0]).expect("config");
            nodes.iter_mut().for_each(|n| n.config = path.clone());
        } else {
            for (n, text) in nodes.iter_mut().zip(&texts) {
                n.config = dir.path().join(format!("{}.toml", n.name));
                std::fs::write(&n.config, text).expect("config");
            }
        }
        let mut pair = Pair {
            nodes,
            dir,
            bootstrap: self.bootstrap,
        };
        for (i, spec) in self.specs.iter().enumerate() {
            if spec.start {
                pair.start(NAMES[i]);
            }
        }
        pair
    }
}

/// Room for the metadata of disks up to a few GiB.
pub const META_FILE_SIZE: u64 = 4 << 20;

fn self_started(pair: &Pair, node: &str) -> bool {
    pair.node(node).child.is_some()
}

/// One node of the pair.
pub struct Node {
    pub name: &'static str,
    pub config: PathBuf,
    pub log: PathBuf,
    pub disk: PathBuf,
    /// External metadata file (unused with `internal_meta`).
    pub meta: PathBuf,
    pub disk_size: u64,
    pub ctl: PathBuf,
    pub ip: IpAddr,
    /// Where repld listens for NBD (port 0: chosen by the OS).
    pub nbd_listen: SocketAddr,
    /// Replication address (the accepting node, beta, listens here).
    pub repl_addr: SocketAddr,
    /// Where the node serves metrics (`PairBuilder::metrics`).
    pub metrics_addr: Option<SocketAddr>,
    /// NBD port of the running (or last) daemon; 0 before the first start.
    pub nbd_port: u16,
    /// Resource name in this node's config.
    pub resource: String,
    wrapper: Vec<String>,
    child: Option<Child>,
    /// Where the current daemon's output starts in the (appended) log.
    log_start: u64,
    md_created: bool,
}

impl Node {
    pub fn nbd_addr(&self) -> String {
        SocketAddr::new(self.ip, self.nbd_port).to_string()
    }

    pub fn uri(&self) -> String {
        format!("nbd://{}/{}", self.nbd_addr(), self.resource)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The whole log, over every start of this node.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The log of the current (or last) daemon only.
    fn current_log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            if f.seek(SeekFrom::Start(self.log_start)).is_ok() {
                let _ = f.read_to_string(&mut s);
            }
        }
        s
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        self.log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        // A killed daemon leaves its control socket behind; the new one
        // would replace it, but waiting for it must not see the old one.
        let _ = std::fs::remove_file(&self.ctl);
        let repld = env!("CARGO_BIN_EXE_repld");
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(repld);
                c
            }
            None => Command::new(repld),
        };
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(self.name)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {cmd:?}: {e}", self.name)),
        );
        self.nbd_port = self.wait_for_port();
        // The control socket comes up just after the NBD listener.
        let deadline = Instant::now() + WAIT;
        while !self.ctl.exists() {
            assert!(
                Instant::now() < deadline,
                "{}: no control socket within {WAIT:?}:\n{}",
                self.name,
                self.current_log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_for_port(&mut self) -> u16 {
        let needle = format!("listening for NBD on tcp {}:", self.nbd_listen.ip());
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let text = self.current_log();
            if let Some(rest) = text.split(&needle).nth(1) {
                let port: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                if let Ok(p) = port.parse() {
                    return p;
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                panic!("{} exited early with {status}:\n{text}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} did not start listening within {WAIT:?}:\n{}",
            self.name,
            self.current_log()
        );
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `replctl status --json` for the (only) resource of one node.
#[derive(Debug, Clone)]
pub struct Status {
    pub role: String,
    pub connection: String,
    pub out_of_sync_bytes: u64,
    pub out_of_sync_blocks: u64,
    pub last_error: Option<String>,
    pub raw: Value,
}

impl Status {
    pub fn connected(&self) -> bool {
        self.connection == "Connected"
    }
}

pub struct Pair {
    nodes: [Node; 2],
    pub dir: tempfile::TempDir,
    bootstrap: bool,
}

impl Pair {
    /// On a connected pair of freshly created metadata: skip the initial
    /// sync (both disks are zero-filled) and promote alpha; waits until
    /// beta sees alpha Primary and itself UpToDate.
    pub fn promote_fresh_alpha(&self) {
        let r = self.alpha().resource.clone();
        self.ok(ALPHA, &["new-current-uuid", &r, "--clear-bitmap"]);
        self.ok(ALPHA, &["promote", &r]);
        self.wait_status(BETA, "seeing alpha Primary and UpToDate", |s| {
            s.raw["resources"][0]["peer_role"] == "Primary"
                && s.raw["resources"][0]["disk"] == "UpToDate"
        });
    }

    pub fn builder() -> PairBuilder {
        PairBuilder {
            disk_size: 64 << 20,
            description: "replicated test volume".into(),
            secret: "pair-test-secret".into(),
            resource: "r0".into(),
            replication: [
                ("ping_interval_ms", "200"),
                ("ping_timeout_ms", "1500"),
                ("reconnect_max_ms", "1000"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            resync: Vec::new(),
            specs: [
                NodeSpec {
                    start: true,
                    ..NodeSpec::default()
                },
                NodeSpec {
                    start: true,
                    ..NodeSpec::default()
                },
            ],
            internal_meta: false,
            bootstrap: true,
            resource_keys: String::new(),
            metrics: false,
            on_keys: Vec::new(),
            inline_secret: true,
            dial_via: None,
            nbd_keys: String::new(),
        }
    }

    /// A connected pair on loopback with 64 MiB disks.
    pub fn start_default() -> Pair {
        Self::builder().start()
    }

    pub fn node(&self, node: &str) -> &Node {
        &self.nodes[index(node)]
    }

    fn node_mut(&mut self, node: &str) -> &mut Node {
        &mut self.nodes[index(node)]
    }

    pub fn alpha(&self) -> &Node {
        self.node(ALPHA)
    }

    pub fn beta(&self) -> &Node {
        self.node(BETA)
    }

    /// The Primary's export URI, e.g. `nbd://127.0.0.1:PORT/r0`.
    pub fn primary_uri(&self) -> String {
        self.alpha().uri()
    }

    /// The Primary's NBD address, `IP:PORT`.
    pub fn primary_addr(&self) -> String {
        self.alpha().nbd_addr()
    }

    pub fn log(&self, node: &str) -> String {
        self.node(node).log_text()
    }

    /// Waits (bounded by `WAIT`) until `node`'s log has a line containing
    /// `needle`; returns that line.
    pub fn wait_log_line(&self, node: &str, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.log(node);
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "{node} never logged {needle:?} within {WAIT:?}; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self, node: &str) -> bool {
        self.node_mut(node).is_running()
    }

    /// Starts a node that is not running (never started, stopped or killed)
    /// and waits until it listens for NBD. The first start of a node also
    /// runs `create-md` and `up` (unless the pair is `fresh`).
    pub fn start(&mut self, node: &str) {
        self.node_mut(node).spawn();
        if self.bootstrap && !self.node(node).md_created {
            let r = self.node(node).resource.clone();
            self.ok(node, &["create-md", &r]);
            self.ok(node, &["up", &r]);
            self.node_mut(node).md_created = true;
        }
    }

    /// SIGTERM and a bounded wait; the daemon must exit 0. Returns the log
    /// of the daemon that was stopped.
    pub fn stop(&mut self, node: &str) -> String {
        let n = self.node_mut(node);
        assert!(n.child.is_some(), "{node} is not running");
        n.signal(libc::SIGTERM);
        let status = n.wait_exit(STOP_WAIT);
        let log = n.current_log();
        match status {
            Some(s) => assert!(
                s.success(),
                "{node} exited with {s} after SIGTERM; log:\n{log}"
            ),
            None => panic!("{node} did not exit within {STOP_WAIT:?} after SIGTERM; log:\n{log}"),
        }
        log
    }

    /// SIGKILL by PID, then reap.
    pub fn kill(&mut self, node: &str) {
        let n = self.node_mut(node);
        n.signal(libc::SIGKILL);
        n.wait_exit(WAIT)
            .unwrap_or_else(|| panic!("{node} survived SIGKILL"));
    }

    /// Stops `node` (asserting exit 0) and starts it again.
    pub fn restart(&mut self, node: &str) {
        self.stop(node);
        self.start(node);
    }

    /// Runs `replctl --socket CTL ARGS` on `node`: stdout, or the failure
    /// (stdout and stderr).
    pub fn ctl(&self, node: &str, args: &[&str]) -> Result<String, String> {
        let (ok, out, err) = run_tool(
            Command::new(env!("CARGO_BIN_EXE_replctl"))
                .arg("--socket")
                .arg(&self.node(node).ctl)
                .args(args),
        );
        if ok {
            Ok(out)
        } else {
            Err(format!("{out}{err}"))
        }
    }

    /// `ctl` that must succeed.
    pub fn ok(&self, node: &str, args: &[&str]) -> String {
        self.ctl(node, args).unwrap_or_else(|e| {
            panic!(
                "replctl {args:?} on {node} failed: {e}\n--- log:\n{}",
                self.log(node)
            )
        })
    }

    /// Raw `replctl --socket CTL ARGS --json` answer, or the error output.
    pub fn replctl(&self, node: &str, args: &[&str]) -> Result<Value, String> {
        let (ok, out, err) = run_tool(
            Command::new(env!("CARGO_BIN_EXE_replctl"))
                .arg("--socket")
                .arg(&self.node(node).ctl)
                .args(args)
                .arg("--json"),
        );
        if !ok {
            return Err(format!("replctl {args:?} on {node} failed: {out}{err}"));
        }
        serde_json::from_str(out.trim())
            .map_err(|e| format!("replctl {args:?} on {node}: bad JSON ({e}): {out}"))
    }

    pub fn try_status(&self, node: &str) -> Result<Status, String> {
        let v = self.replctl(node, &["status"])?;
        if v["ok"] != Value::Bool(true) || v["node"] != Value::String(node.into()) {
            return Err(format!("unexpected status answer from {node}: {v}"));
        }
        let r = &v["resources"][0];
        let num = |k: &str| {
            r[k].as_u64()
                .ok_or_else(|| format!("status of {node} has no integer {k}: {v}"))
        };
        Ok(Status {
            role: r["role"].as_str().unwrap_or_default().to_owned(),
            connection: r["connection"].as_str().unwrap_or_default().to_owned(),
            out_of_sync_bytes: num("out_of_sync_bytes")?,
            out_of_sync_blocks: num("out_of_sync_blocks")?,
            last_error: r["last_error"].as_str().map(str::to_owned),
            raw: v.clone(),
        })
    }

    pub fn status(&self, node: &str) -> Status {
        self.try_status(node).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Out-of-sync byte runs `(offset, length)` of `node`'s resource.
    pub fn out_of_sync_runs(&self, node: &str) -> Vec<(u64, u64)> {
        let resource = self.node(node).resource.clone();
        let v = self
            .replctl(node, &["out-of-sync", &resource])
            .unwrap_or_else(|e| panic!("{e}"));
        v["runs"]
            .as_array()
            .unwrap_or_else(|| panic!("no runs in {v}"))
            .iter()
            .map(|run| match (run[0].as_u64(), run[1].as_u64()) {
                (Some(o), Some(l)) => (o, l),
                _ => panic!("bad run {run} in {v}"),
            })
            .collect()
    }

    /// Polls (bounded by `WAIT`) until `check` holds for `node`'s status.
    pub fn wait_status(&self, node: &str, what: &str, check: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + WAIT;
        let mut last = Err("no status yet".to_owned());
        while Instant::now() < deadline {
            last = self.try_status(node);
            if let Ok(s) = &last {
                if check(s) {
                    return s.clone();
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{node}: {what} did not happen within {WAIT:?}; last status {last:?}\n\
             --- alpha log:\n{}\n--- beta log:\n{}",
            self.log(ALPHA),
            self.log(BETA)
        );
    }

    /// Waits (bounded) until both nodes report `Connected`.
    pub fn wait_connected(&self) {
        for node in NAMES {
            self.wait_status(node, "connection Connected", Status::connected);
        }
    }

    /// Panics if any log mentions a panic.
    pub fn assert_no_panic(&self) {
        for node in NAMES {
            let log = self.log(node);
            assert!(!log.contains("panicked"), "{node} panicked:\n{log}");
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                // SAFETY: kill(2) on our own unreaped child's PID.
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                let _ = child.wait();
            }
        }
    }
}

/// Reads a whole backing file.
pub fn read_disk(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------

static NETNS_SEQ: AtomicU32 = AtomicU32::new(0);

/// Two network namespaces joined by a veth pair, each end addressed
/// (10.199.X.1/24 and 10.199.X.2/24) and up, loopback up too. Deleted when
/// dropped (deleting a namespace removes its veth end and so the pair).
pub struct NetnsLink {
    pub ns: [String; 2],
    pub ips: [IpAddr; 2],
    veth: [String; 2],
    created: Vec<String>,
}

fn ip_cmd(args: &[&str]) -> Result<(), String> {
    let (ok, out, err) = run_tool(Command::new("ip").args(args));
    if ok {
        Ok(())
    } else {
        Err(format!("`ip {}` failed: {out}{err}", args.join(" ")))
    }
}

impl NetnsLink {
    /// Creates the namespaces; panics with the failing `ip` command (this
    /// needs root, or CAP_NET_ADMIN and CAP_SYS_ADMIN).
    pub fn create() -> NetnsLink {
        let pid = std::process::id();
        let seq = NETNS_SEQ.fetch_add(1, Ordering::SeqCst);
        let subnet = (pid + seq) % 250 + 1;
        let mut link = NetnsLink {
            ns: [format!("rbA-{pid}-{seq}"), format!("rbB-{pid}-{seq}")],
            ips: [
                IpAddr::V4(Ipv4Addr::new(10, 199, subnet as u8, 1)),
                IpAddr::V4(Ipv4Addr::new(10, 199, subnet as u8, 2)),
            ],
            // At most 15 bytes: "rbva" + 7-digit PID + "n" + seq.
            veth: [format!("rbva{pid}n{seq}"), format!("rbvb{pid}n{seq}")],
            created: Vec::new(),
        };
        if let Err(e) = link.setup() {
            panic!("cannot build the network namespaces (needs root): {e}");
        }
        link
    }

    fn setup(&mut self) -> Result<(), String> {
        for ns in self.ns.clone() {
            ip_cmd(&["netns", "add", &ns])?;
            self.created.push(ns);
        }
        let [va, vb] = &self.veth;
        ip_cmd(&["link", "add", va, "type", "veth", "peer", "name", vb])?;
        for i in 0..2 {
            let (ns, veth) = (&self.ns[i], &self.veth[i]);
            ip_cmd(&["link", "set", veth, "netns", ns])?;
            let addr = format!("{}/24", self.ips[i]);
            ip_cmd(&["-n", ns, "addr", "add", &addr, "dev", veth])?;
            ip_cmd(&["-n", ns, "link", "set", veth, "up"])?;
            ip_cmd(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// `["ip", "netns", "exec", NS]` for namespace `i` (0 or 1).
    pub fn exec_prefix(&self, i: usize) -> Vec<&str> {
        vec!["ip", "netns", "exec", &self.ns[i]]
    }
}

impl Drop for NetnsLink {
    fn drop(&mut self) {
        for ns in &self.created {
            let _ = ip_cmd(&["netns", "del", ns]);
        }
        // If moving an end into a namespace failed, the pair is still here.
        let _ = run_tool(Command::new("ip").args(["link", "del", &self.veth[0]]));
    }
}

// ---------------------------------------------------------------------------
// `replctl events` watcher
// ---------------------------------------------------------------------------

/// A running `replctl events --json` on one node, its lines read on a
/// thread; killed by PID when dropped.
pub struct EventWatch {
    child: Child,
    lines: std::sync::mpsc::Receiver<Value>,
    pub seen: Vec<Value>,
}

impl EventWatch {
    pub fn start(pair: &Pair, node: &str) -> EventWatch {
        let mut child = Command::new(env!("CARGO_BIN_EXE_replctl"))
            .arg("--socket")
            .arg(&pair.node(node).ctl)
            .args(["events", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting replctl events");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("replctl events printed non-JSON ({e}): {line}"));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        EventWatch {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded by `WAIT`) for an event satisfying `check`, and
    /// returns it; every event read is kept in `seen`.
    pub fn wait_for(&mut self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if check(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "no event for {what} within {WAIT:?}; events seen:\n{}",
                    self.seen
                        .iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own unreaped child's PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}
