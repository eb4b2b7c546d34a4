//! What the `repld` binary runs: logging setup, the serve-until-signalled
//! loop, and the self-contained demo.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::{Config, NodeView};
use crate::control::proto::{MessageAnswer, Request, StatusAnswer};
use crate::control::{client, ControlServer};
use crate::events::Events;
use crate::meta::{Location, MetaStore};
use crate::metrics::{IoMetrics, MetricsServer};
use crate::nbd::handshake::Admission;
use crate::nbd::{Export, Exports};
use crate::repl::{ConnState, Replica};
use crate::server::Server;
use crate::store::Store;

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// Only a Primary serves NBD clients; a Secondary (or a resource that is
/// down) tells them why not.
struct RoleAdmission {
    replicas: Vec<Arc<Replica>>,
}

impl Admission for RoleAdmission {
    fn check(&self, export: &Export) -> Result<(), String> {
        match self.replicas.iter().find(|r| r.name == export.name) {
            Some(r) => r.check_admission().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    fn admit(&self, export: &Export, attach: &mut dyn FnMut()) -> Result<(), String> {
        match self.replicas.iter().find(|r| r.name == export.name) {
            Some(r) => r.admit(attach).map_err(|e| e.to_string()),
            None => {
                attach();
                Ok(())
            }
        }
    }
}

/// The node name used when `--node` is not given: the hostname.
pub fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// `repld --pidfile P`: the file holds this process's PID while it runs
/// and is removed when dropped.
pub struct PidFile(PathBuf);

impl PidFile {
    pub fn create(path: &Path) -> Result<PidFile> {
        let tmp = path.with_extension("pid.tmp");
        std::fs::write(&tmp, format!("{}\n", std::process::id()))
            .and_then(|_| std::fs::rename(&tmp, path))
            .with_context(|| format!("writing the pid file {}", path.display()))?;
        Ok(PidFile(path.to_owned()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Only our own: a later repld may have replaced it.
        if std::fs::read_to_string(&self.0)
            .is_ok_and(|s| s.trim() == std::process::id().to_string())
        {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// `repld --check-config`: loads and validates the file, resolves it for
/// `node` and checks that every backing disk (and external metadata
/// device) of this node exists. Returns a one-line-per-resource summary;
/// opens nothing for writing and binds nothing.
pub fn check_config(path: &Path, node: &str) -> Result<String> {
    let config = Config::load(path)?;
    let view = config.for_node(node)?;
    let mut lines = vec![format!(
        "{}: valid for node {node}: {} resource(s), control socket {}",
        path.display(),
        view.resources.len(),
        view.control_socket.display()
    )];
    for r in &view.resources {
        std::fs::metadata(&r.disk)
            .with_context(|| format!("resource {:?}: disk {}", r.name, r.disk.display()))?;
        if let Some(crate::config::MetaDisk::External(m)) = &r.meta {
            std::fs::metadata(m)
                .with_context(|| format!("resource {:?}: meta_disk {}", r.name, m.display()))?;
        }
        lines.push(match &r.peer {
            Some(p) => format!(
                "  {}: disk {}, replicated with {} ({} <-> {})",
                r.name,
                r.disk.display(),
                p.peer_node,
                p.local_address,
                p.peer_address
            ),
            None => format!("  {}: disk {}, single node", r.name, r.disk.display()),
        });
    }
    Ok(lines.join("\n"))
}

/// Wraps every resource of this node for replication.
fn open_replicas(view: &NodeView, events: &Arc<Events>) -> Result<Vec<Arc<Replica>>> {
    let mut replicas = Vec::new();
    for r in &view.resources {
        replicas.push(Replica::new(r, &view.node, events.clone())?);
    }
    Ok(replicas)
}

/// Re-reads the access rules (`tls`, `allowed_clients`,
/// `allowed_addresses`) of every export from `path` and closes the
/// clients they no longer admit. Everything else in the file takes effect
/// at the next start.
fn reload_access(path: &Path, node: &str, exports: &Exports, clients: &crate::server::Clients) {
    let view = match Config::load(path).and_then(|c| c.for_node(node)) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!("reload refused, keeping the current access rules: {e}");
            return;
        }
    };
    for r in &view.resources {
        if let Some(export) = exports.find(&r.name).filter(|e| e.name == r.name) {
            if export.access() != r.access {
                tracing::info!(export = %r.name, "access rules changed");
            }
            export.set_access(r.access.clone());
        }
    }
    let closed = clients.enforce_access();
    tracing::info!(
        closed,
        "reloaded access rules from {}; other settings apply at restart",
        path.display()
    );
}

/// Serves `config` (read from `path`, which SIGHUP re-reads for the
/// access rules) as node `node` until SIGTERM or SIGINT, then shuts down
/// gracefully.
pub fn run(config: &Config, node: &str, path: Option<&Path>) -> Result<()> {
    // Register before starting, so an early signal is not lost.
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing signal handlers")?;
    let mut view = config.for_node(node)?;
    view.load_secrets()?;
    for r in &config.resources {
        if r.secret.is_some() && r.on.len() == 2 {
            tracing::warn!(
                resource = %r.name,
                "the shared secret is inline in the config file; move it to a secret_file"
            );
        }
    }
    let events = Events::new();
    let replicas = open_replicas(&view, &events)?;
    // Request counters exist only when metrics are served: with them off,
    // the data path records nothing.
    let io_metrics: Vec<(String, &'static IoMetrics)> = match view.metrics_listen {
        Some(_) => view
            .resources
            .iter()
            .map(|r| (r.name.clone(), IoMetrics::leak()))
            .collect(),
        None => Vec::new(),
    };
    let exports = Exports::new(
        view.resources
            .iter()
            .zip(&replicas)
            .map(|(r, replica)| {
                Arc::new(Export {
                    name: r.name.clone(),
                    description: r.description.clone(),
                    read_only: r.read_only,
                    store: replica.clone() as Arc<dyn Store>,
                    metrics: io_metrics
                        .iter()
                        .find(|(n, _)| *n == r.name)
                        .map(|(_, m)| *m),
                    access: std::sync::RwLock::new(r.access.clone()),
                })
            })
            .collect(),
        view.default_resource.clone(),
    );
    let exports_for_reload = exports.clone();
    let admission = RoleAdmission {
        replicas: replicas.clone(),
    };
    for r in &replicas {
        r.start()?;
    }
    let server = match Server::start_with(view.nbd.clone(), exports, Arc::new(admission)) {
        Ok(s) => s,
        Err(e) => {
            replicas.iter().for_each(|r| r.stop());
            return Err(e.into());
        }
    };
    let control = match ControlServer::start(
        &view.control_socket,
        node.to_owned(),
        replicas.clone(),
        server.clients(),
        events,
    ) {
        Ok(c) => c,
        Err(e) => {
            let _ = server.shutdown();
            replicas.iter().for_each(|r| r.stop());
            return Err(e);
        }
    };
    let metrics = match view.metrics_listen {
        Some(addr) => {
            match MetricsServer::start(addr, node.to_owned(), io_metrics, replicas.clone()) {
                Ok(m) => Some(m),
                Err(e) => {
                    control.stop();
                    let _ = server.shutdown();
                    replicas.iter().for_each(|r| r.stop());
                    return Err(e.into());
                }
            }
        }
        None => None,
    };
    tracing::info!(
        "repld {} serving {} resource(s) as node {node}",
        env!("CARGO_PKG_VERSION"),
        replicas.len()
    );
    let clients = server.clients();
    let signal = loop {
        match signals.forever().next() {
            Some(SIGHUP) => match path {
                Some(p) => reload_access(p, node, &exports_for_reload, &clients),
                None => tracing::info!("SIGHUP ignored: no config file to reload"),
            },
            other => break other,
        }
    };
    tracing::info!(signal = ?signal, "shutting down: draining in-flight requests");
    // NBD first (in-flight writes still replicate and the final flush is a
    // barrier on both nodes), then the peer links, then the control socket.
    let flushed = server.shutdown();
    for r in &replicas {
        r.stop();
    }
    control.stop();
    if let Some(m) = metrics {
        m.stop();
    }
    flushed.context("flushing exports at shutdown")?;
    tracing::info!("shutdown complete");
    Ok(())
}

/// Where the demo keeps its files, removed again when it exits.
struct DemoDir(PathBuf);

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two repld child processes, stopped by PID when dropped.
struct DemoNodes(Vec<Child>);

impl Drop for DemoNodes {
    fn drop(&mut self) {
        // The Primary first, so its final flush still reaches its peer.
        for c in &mut self.0 {
            // SAFETY: kill(2) on our own child's PID.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The demo's configuration: nodes alpha (Primary) and beta on loopback.
pub fn demo_config(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        r#"# Generated by `repld --demo`.
[replication]
ping_interval_ms = 500
ping_timeout_ms = 3000

[nodes.alpha]
nbd_listen = "127.0.0.1:{port}"
control_socket = "{d}/alpha.ctl"

[nodes.beta]
nbd_listen = "127.0.0.1:{beta_port}"
control_socket = "{d}/beta.ctl"

[[resource]]
name = "r0"
description = "replblk demo volume"
secret_file = "{d}/r0.secret"

[resource.on.alpha]
disk = "{d}/alpha.img"
address = "127.0.0.1:{alpha_repl}"

[resource.on.beta]
disk = "{d}/beta.img"
address = "127.0.0.1:{beta_repl}"
"#,
        beta_port = port.wrapping_add(1),
        alpha_repl = port.wrapping_add(2),
        beta_repl = port.wrapping_add(3),
    )
}

/// Once both nodes are connected: both fresh disks are zero-filled, so
/// identical; declare them UpToDate without a sync and promote alpha.
fn bring_up_demo(dir: &Path) -> Result<()> {
    let alpha = dir.join("alpha.ctl");
    let timeout = Duration::from_secs(10);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client::request::<StatusAnswer>(
            &alpha,
            &Request::Status {
                resource: Some("r0".into()),
            },
            Some(timeout),
        );
        if let Ok(s) = &status {
            if s.resources
                .first()
                .is_some_and(|r| r.connection == ConnState::Connected)
            {
                break;
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("the demo nodes did not connect within 30 s: {status:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for req in [
        Request::NewCurrentUuid {
            resource: "r0".into(),
            clear_bitmap: true,
        },
        Request::Promote {
            resource: "r0".into(),
            force: false,
        },
    ] {
        client::request::<MessageAnswer>(&alpha, &req, Some(timeout))?;
    }
    Ok(())
}

/// Starts a replicated pair on loopback with temporary 1 GiB disks:
/// alpha is Primary at nbd://127.0.0.1:`port`/r0, beta its Secondary.
pub fn demo(port: u16, dir: Option<&Path>) -> Result<()> {
    let base = dir.map(Path::to_owned).unwrap_or_else(std::env::temp_dir);
    let dir = DemoDir(base.join(format!("replblk-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    for name in ["alpha", "beta"] {
        let disk = dir.0.join(format!("{name}.img"));
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(1 << 30))
            .with_context(|| format!("creating {}", disk.display()))?;
    }
    let config_path = dir.0.join("replblk.toml");
    let mut secret = [0u8; 24];
    getrandom::getrandom(&mut secret)
        .map_err(|e| anyhow::anyhow!("making the demo secret: {e}"))?;
    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let secret_path = dir.0.join("r0.secret");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret_path)
            .and_then(|mut f| f.write_all(secret.as_bytes()))
            .context("writing the demo secret")?;
    }
    std::fs::write(&config_path, demo_config(&dir.0, port)).context("writing the demo config")?;
    Config::load(&config_path)?;
    let mut data_size = 0;
    for name in ["alpha", "beta"] {
        let disk = dir.0.join(format!("{name}.img"));
        let (_, sb) = MetaStore::create(
            &disk,
            &Location::Internal,
            name,
            "r0",
            crate::meta::DEFAULT_GRANULARITY,
            false,
        )
        .with_context(|| format!("creating metadata on {}", disk.display()))?;
        data_size = sb.data_size;
    }
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    let exe = std::env::current_exe().context("locating repld")?;
    let mut nodes = DemoNodes(Vec::new());
    for name in ["alpha", "beta"] {
        let child = Command::new(&exe)
            .arg("--config")
            .arg(&config_path)
            .arg("--node")
            .arg(name)
            .spawn()
            .with_context(|| format!("starting node {name}"))?;
        nodes.0.push(child);
    }
    bring_up_demo(&dir.0)?;
    let d = dir.0.display();
    println!("replblk demo: a replicated pair on loopback (config {d}/replblk.toml)");
    println!("  node alpha (Primary):   nbd://127.0.0.1:{port}/r0   disk {d}/alpha.img");
    println!("  node beta  (Secondary): refuses NBD clients          disk {d}/beta.img");
    println!("  try:    qemu-io -f raw nbd://127.0.0.1:{port}/r0 -c 'write -P 0xab 0 1M'");
    println!("  status: cargo run --release --bin replctl -- --socket {d}/alpha.ctl status");
    println!(
        "  copies: cmp -n {data_size} {d}/alpha.img {d}/beta.img   (data identical once acknowledged;"
    );
    println!("          the metadata at the end of each file differs)");
    println!("  stop with Ctrl-C (the temporary files are removed)");
    let _ = signals.forever().next();
    drop(nodes);
    Ok(())
}
