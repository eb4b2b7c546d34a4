//! `replctl`: the operator's tool. Sends one request to the local repld's
//! control socket and prints the answer (or, for `events`, the stream).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use replblk::attach;
use replblk::control::client;
use replblk::control::proto::{
    DumpMdAnswer, MessageAnswer, OutOfSyncAnswer, Request, ResourceStatus, StatusAnswer,
    StatusEvent,
};
use replblk::core::Decision;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(name = "replctl", version, about = "Control a local replblk daemon")]
struct Args {
    /// The daemon's control socket.
    #[arg(long, default_value = "/run/replblk/repld.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// Show role, disk, peer and connection of each resource.
    Status {
        resource: Option<String>,
        /// Print the daemon's JSON (stable; see docs/control.md).
        #[arg(long)]
        json: bool,
    },
    /// Stream state changes, one line each, until interrupted.
    Events {
        #[arg(long)]
        json: bool,
    },
    /// Write fresh metadata for a resource that is down.
    CreateMd {
        resource: String,
        /// Overwrite valid metadata (its generations are lost).
        #[arg(long)]
        force: bool,
    },
    /// Print both superblock slots of a resource's metadata.
    DumpMd {
        resource: String,
        #[arg(long)]
        json: bool,
    },
    /// Attach the disk (reading its metadata) and start connecting.
    Up { resource: String },
    /// Disconnect, write the metadata and detach (refused while Primary).
    Down { resource: String },
    /// Make this node Primary.
    Promote {
        resource: String,
        /// Promote without UpToDate data (logged; starts a new generation).
        #[arg(long)]
        force: bool,
    },
    /// Make this node Secondary.
    Demote {
        resource: String,
        /// Disconnect attached NBD clients first.
        #[arg(long)]
        force: bool,
        /// Wait this many seconds for clients to go (--force) and requests
        /// in flight to finish before refusing (default 30).
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Start (re)connecting to the peer.
    Connect {
        resource: String,
        /// In a split brain, become the sync target and give up this
        /// node's changes.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Drop the link and stay StandAlone.
    Disconnect { resource: String },
    /// Start a new data generation; with --clear-bitmap on a connected
    /// pair of freshly created disks, declare both UpToDate (skips the
    /// initial sync: only when both disks are known to be identical).
    NewCurrentUuid {
        resource: String,
        #[arg(long)]
        clear_bitmap: bool,
    },
    /// Wait until the resource is connected and both disks are UpToDate.
    WaitSync {
        resource: String,
        /// Give up after this many seconds (default: wait indefinitely).
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// List the out-of-sync byte ranges of a resource.
    OutOfSync {
        resource: String,
        #[arg(long)]
        json: bool,
    },
    /// Attach a kernel NBD device (/dev/nbdN) to whichever listed node is
    /// Primary, and follow the Primary across failover: stays running,
    /// reconnecting the device when its link dies (see docs/failover.md).
    Attach {
        /// nbd://HOST:PORT[,HOST:PORT...]/EXPORT (port default 10809).
        uri: String,
        /// The device, e.g. /dev/nbd0.
        device: String,
        /// Logical block size of the device (512..4096, a power of two).
        #[arg(long, default_value_t = 512)]
        block_size: u64,
        /// Seconds a request may go unanswered before the kernel gives up
        /// on the link and re-sends it on the next one.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        /// Seconds the kernel holds I/O while no link is up before failing
        /// it.
        #[arg(long, default_value_t = 120)]
        dead_conn_timeout: u64,
        /// Seconds for TCP connect plus handshake, per address.
        #[arg(long, default_value_t = 3.0)]
        connect_timeout: f64,
        /// PID file (default /run/replblk/attach-nbdN.pid).
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// Disconnect a device attached with `attach` and stop its attach
    /// process.
    Detach {
        device: String,
        /// PID file of the attach process (default
        /// /run/replblk/attach-nbdN.pid).
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
}

/// Answers arrive within this, except for verbs that wait on purpose.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

fn request<T: serde::de::DeserializeOwned>(
    socket: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<T> {
    Ok(client::request(socket, req, timeout)?)
}

/// The JSON name of an enum value (`"UpToDate"`, `"crashed-primary-local"`).
fn name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".to_owned(),
    }
}

fn name_or_dash<T: Serialize>(value: &Option<T>) -> String {
    value.as_ref().map_or_else(|| "-".to_owned(), name)
}

fn decision_name(d: Decision) -> String {
    let how = |full: bool| if full { "full" } else { "bitmap-based" };
    match d {
        Decision::SyncSource { full } => format!("sync-source ({})", how(full)),
        Decision::SyncTarget { full } => format!("sync-target ({})", how(full)),
        other => name(&other),
    }
}

fn print_status(answer: &StatusAnswer) {
    let node = &answer.node;
    for r in &answer.resources {
        println!("{} role:{} node:{node}", r.name, name(&r.role));
        println!("  disk:{}", name(&r.disk));
        if let Some(e) = &r.down_reason {
            println!("  down: {e}");
        }
        match &r.peer {
            Some(peer) => {
                println!(
                    "  {peer} connection:{} role:{}",
                    name(&r.connection),
                    name_or_dash(&r.peer_role)
                );
                println!(
                    "    replication:{} peer-disk:{} out-of-sync:{} bytes",
                    name(&r.replication),
                    name_or_dash(&r.peer_disk),
                    r.out_of_sync_bytes
                );
                if let Some(d) = &r.decision {
                    println!(
                        "    last decision: {} (rule {} {}: {})",
                        decision_name(d.decision),
                        d.rule_number,
                        name(&d.rule),
                        d.description
                    );
                }
                if let Some(e) = &r.last_error {
                    println!("    last error: {e}");
                }
            }
            None => println!("  no peer (single node)"),
        }
    }
}

/// One event as a `drbdsetup events2`-like line.
fn event_line(e: &StatusEvent) -> String {
    let r: &ResourceStatus = &e.status;
    let mut line = format!("{} {}", name(&e.kind), r.name);
    line.push_str(&format!(" role:{}", name(&r.role)));
    line.push_str(&format!(" disk:{}", name(&r.disk)));
    line.push_str(&format!(" connection:{}", name(&r.connection)));
    line.push_str(&format!(" replication:{}", name(&r.replication)));
    if let Some(role) = &r.peer_role {
        line.push_str(&format!(" peer-role:{}", name(role)));
    }
    if let Some(disk) = &r.peer_disk {
        line.push_str(&format!(" peer-disk:{}", name(disk)));
    }
    if let Some(d) = &r.decision {
        line.push_str(&format!(" rule:{}", name(&d.rule)));
    }
    line
}

fn events(socket: &Path, as_json: bool) -> Result<()> {
    let stdout = std::io::stdout();
    for item in client::events(socket)? {
        let (line, event) = item?;
        let mut out = stdout.lock();
        if as_json {
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{}", event_line(&event))?;
        }
        // Line-buffered, so scripts reading a pipe see each change at once.
        out.flush()?;
    }
    Ok(())
}

fn print_md(answer: &DumpMdAnswer) {
    let md = &answer.metadata;
    println!(
        "resource {} metadata on {} at offset {}",
        answer.resource, md.md_path, md.md_start
    );
    for (i, slot) in md.slots.iter().enumerate() {
        let mark = if md.active == Some(i) {
            " (active)"
        } else {
            ""
        };
        println!(
            "slot {i}{mark}: {}",
            serde_json::to_string_pretty(slot).unwrap_or_default()
        );
    }
}

/// A verb answered with one line of text.
fn simple(socket: &Path, req: Request, timeout: Option<Duration>) -> Result<()> {
    let answer: MessageAnswer = request(socket, &req, timeout)?;
    println!("{}", answer.message);
    Ok(())
}

/// `--timeout S` in milliseconds.
fn timeout_ms(timeout: f64) -> Result<u64> {
    if timeout.is_finite() && timeout > 0.0 {
        Ok((timeout * 1000.0).ceil() as u64)
    } else {
        bail!("--timeout {timeout}: must be a positive number of seconds")
    }
}

fn run(args: Args) -> Result<()> {
    let socket = args.socket.as_path();
    let wait = Some(ANSWER_TIMEOUT);
    match args.verb {
        Verb::Status { resource, json } => {
            let req = Request::Status { resource };
            if json {
                println!("{}", client::request_line(socket, &req, wait)?);
            } else {
                print_status(&request(socket, &req, wait)?);
            }
            Ok(())
        }
        Verb::Events { json } => events(socket, json),
        Verb::CreateMd { resource, force } => {
            simple(socket, Request::CreateMd { resource, force }, wait)
        }
        Verb::DumpMd { resource, json } => {
            let req = Request::DumpMd { resource };
            if json {
                println!("{}", client::request_line(socket, &req, wait)?);
            } else {
                print_md(&request(socket, &req, wait)?);
            }
            Ok(())
        }
        Verb::Up { resource } => simple(socket, Request::Up { resource }, wait),
        Verb::Down { resource } => simple(socket, Request::Down { resource }, wait),
        Verb::Promote { resource, force } => {
            simple(socket, Request::Promote { resource, force }, wait)
        }
        Verb::Demote {
            resource,
            force,
            timeout,
        } => {
            let timeout_ms = timeout.map(timeout_ms).transpose()?;
            // The daemon waits up to the timeout, then answers.
            let answer_within =
                ANSWER_TIMEOUT + timeout_ms.map_or(Duration::from_secs(30), Duration::from_millis);
            let req = Request::Demote {
                resource,
                force,
                timeout_ms,
            };
            simple(socket, req, Some(answer_within))
        }
        Verb::Connect {
            resource,
            discard_my_data,
        } => simple(
            socket,
            Request::Connect {
                resource,
                discard_my_data,
            },
            wait,
        ),
        Verb::Disconnect { resource } => simple(socket, Request::Disconnect { resource }, wait),
        Verb::NewCurrentUuid {
            resource,
            clear_bitmap,
        } => simple(
            socket,
            Request::NewCurrentUuid {
                resource,
                clear_bitmap,
            },
            wait,
        ),
        Verb::WaitSync { resource, timeout } => {
            let timeout_ms = timeout.map(timeout_ms).transpose()?.unwrap_or(0);
            let req = Request::WaitSync {
                resource,
                timeout_ms,
            };
            // The daemon answers at the timeout, or never: wait for it.
            simple(socket, req, None)
        }
        Verb::Attach {
            uri,
            device,
            block_size,
            timeout,
            dead_conn_timeout,
            connect_timeout,
            pid_file,
        } => attach(
            &uri,
            &device,
            block_size,
            timeout,
            dead_conn_timeout,
            connect_timeout,
            pid_file,
        ),
        Verb::Detach { device, pid_file } => {
            let index = nbd_index(&device)?;
            let pid_file = pid_file.unwrap_or_else(|| attach::default_pid_file(index));
            attach::detach(index, &pid_file)?;
            println!("{device} disconnected");
            Ok(())
        }
        Verb::OutOfSync { resource, json } => {
            let req = Request::OutOfSync { resource };
            if json {
                println!("{}", client::request_line(socket, &req, wait)?);
            } else {
                let answer: OutOfSyncAnswer = request(socket, &req, wait)?;
                for (offset, length) in answer.runs {
                    println!("{offset} {length}");
                }
            }
            Ok(())
        }
    }
}

fn nbd_index(device: &str) -> Result<u32> {
    match replblk::nbd::netlink::device_index(device) {
        Some(i) => Ok(i),
        None => bail!("{device:?} is not an NBD device (expected /dev/nbdN)"),
    }
}

#[allow(clippy::too_many_arguments)]
fn attach(
    uri: &str,
    device: &str,
    block_size: u64,
    timeout: u64,
    dead_conn_timeout: u64,
    connect_timeout: f64,
    pid_file: Option<PathBuf>,
) -> Result<()> {
    let target = attach::parse_uri(uri).map_err(anyhow::Error::msg)?;
    let index = nbd_index(device)?;
    if !(512..=4096).contains(&block_size) || !block_size.is_power_of_two() {
        bail!("--block-size {block_size}: must be a power of two from 512 to 4096");
    }
    if timeout == 0 {
        bail!("--timeout must be at least 1 second (without it the kernel never re-sends)");
    }
    if !(connect_timeout.is_finite() && connect_timeout > 0.0) {
        bail!("--connect-timeout must be a positive number of seconds");
    }
    let opts = attach::Options {
        index,
        block_size,
        timeout: Duration::from_secs(timeout),
        dead_conn_timeout: Duration::from_secs(dead_conn_timeout),
        connect_timeout: Duration::from_secs_f64(connect_timeout),
        retry_interval: Duration::from_millis(200),
        pid_file: Some(pid_file.unwrap_or_else(|| attach::default_pid_file(index))),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    attach::run(&target, &opts, &stop)
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
