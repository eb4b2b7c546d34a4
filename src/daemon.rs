//! What the `repld` binary runs: logging setup, the serve-until-signalled
//! loop, and the self-contained demo.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::Config;
use crate::server::Server;

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

/// Serves `config` until SIGTERM or SIGINT, then shuts down gracefully.
pub fn run(config: &Config) -> Result<()> {
    // Register before starting, so an early signal is not lost.
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    let server = Server::start(config)?;
    tracing::info!(
        "repld {} serving {} export(s)",
        env!("CARGO_PKG_VERSION"),
        config.resources.len()
    );
    let signal = signals.forever().next();
    tracing::info!(signal = ?signal, "shutting down: draining in-flight requests");
    server.shutdown().context("flushing exports at shutdown")?;
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

/// Serves a temporary, sparse 1 GiB file on 127.0.0.1:`port` as export
/// `r0`, printing how to use it.
pub fn demo(port: u16, dir: Option<&Path>) -> Result<()> {
    let base = dir.map(Path::to_owned).unwrap_or_else(std::env::temp_dir);
    let dir = DemoDir(base.join(format!("replblk-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let disk = dir.0.join("r0.img");
    let file =
        std::fs::File::create(&disk).with_context(|| format!("creating {}", disk.display()))?;
    file.set_len(1 << 30).context("sizing the demo disk")?;
    let text = format!(
        "[nbd]\nlisten = \"127.0.0.1:{port}\"\n\n[[resource]]\nname = \"r0\"\ndisk = {:?}\ndescription = \"replblk demo volume\"\n",
        disk.display().to_string()
    );
    let config = Config::parse(&text)?;
    println!(
        "replblk demo: serving a 1 GiB volume backed by {}",
        disk.display()
    );
    println!("  export:     nbd://127.0.0.1:{port}/r0");
    println!("  try:        nbdinfo nbd://127.0.0.1:{port}/r0");
    println!("              qemu-io -f raw nbd://127.0.0.1:{port}/r0 -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'");
    println!("  stop with Ctrl-C (the temporary files are removed)");
    run(&config)
}
