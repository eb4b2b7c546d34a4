//! `replctl`: the operator's tool. Sends one request to the local repld's
//! control socket and prints the answer (or, for `events`, the stream).

use std::io::{IsTerminal, Write};
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
    Answer, DumpMdAnswer, MessageAnswer, OutOfSyncAnswer, Request, ResourceStatus, Response,
    StatusAnswer, StatusEvent,
};
use replblk::core::Decision;
use replblk::meta::{Location, MetaStore};
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
        /// Read the metadata of this backing disk directly, without a
        /// daemon (e.g. after a crash, before repld starts and writes to
        /// it); internal metadata unless --meta-disk is given.
        #[arg(long)]
        disk: Option<PathBuf>,
        /// With --disk: the external metadata file or device.
        #[arg(long, requires = "disk")]
        meta_disk: Option<PathBuf>,
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
    /// Online verify: compare both copies block by block (digests only)
    /// in the background; differences are marked out of sync on both
    /// nodes and resynced at the next connect. Progress in `status`.
    Verify {
        resource: String,
        /// Stop the verify that is running.
        #[arg(long)]
        stop: bool,
    },
    /// Discard this node's data: it becomes a full sync target of the
    /// connected UpToDate peer (this node must be Secondary).
    Invalidate { resource: String },
    /// Make the connected Secondary peer a full sync target of this node.
    InvalidateRemote { resource: String },
    /// Wait until the resource is connected and both disks are UpToDate.
    WaitSync {
        resource: String,
        /// Give up after this many seconds (default: wait indefinitely).
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Mark this node's data Outdated: it cannot be promoted without
    /// --force (refused while Primary or connected). Used by a peer's
    /// fence handler.
    Outdate { resource: String },
    /// Release writes frozen by fencing (the peer could not be fenced):
    /// you vouch that the peer cannot be promoted.
    ResumeIo { resource: String },
    /// Show or change the resync rate settings of a running daemon.
    ResyncRate {
        resource: String,
        /// Resync rate at most, MiB/s (0: unlimited).
        #[arg(long)]
        max: Option<u64>,
        /// Rate the resync keeps while the application writes, MiB/s.
        #[arg(long)]
        min: Option<u64>,
        /// Resync data in flight at most, KiB.
        #[arg(long)]
        fill_target: Option<u64>,
        /// Controller planning horizon, ms.
        #[arg(long)]
        plan_ahead: Option<u64>,
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
                if let Some(p) = progress_line(r) {
                    println!("    {p}");
                }
                if r.resync.active || r.resync.finished > 0 {
                    println!(
                        "    resync: sent {} bytes, zeroed {} bytes, skipped {} equal bytes",
                        r.resync.moved_bytes, r.resync.zeroed_bytes, r.resync.same_bytes
                    );
                }
                if let Some(d) = &r.decision {
                    println!(
                        "    last decision: {} (rule {} {}: {})",
                        decision_name(d.decision),
                        d.rule_number,
                        name(&d.rule),
                        d.description
                    );
                }
                if let Some(v) = &r.verify {
                    let pct = if v.total_bytes == 0 {
                        100.0
                    } else {
                        v.done_bytes as f64 * 100.0 / v.total_bytes as f64
                    };
                    println!(
                        "    verify: {} {pct:.1}% ({} of {} bytes) out-of-sync:{} blocks ({} bytes){}{}",
                        name(&v.state),
                        v.done_bytes,
                        v.total_bytes,
                        v.out_of_sync_blocks,
                        v.out_of_sync_bytes,
                        if v.skipped_blocks > 0 {
                            format!(" skipped:{} blocks", v.skipped_blocks)
                        } else {
                            String::new()
                        },
                        v.message
                            .as_ref()
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    );
                }
                if let Some(p) = &r.split_brain_policy {
                    if !p.is_manual() {
                        println!("    split-brain policy: {p}");
                    }
                }
                if let Some(sb) = &r.split_brain {
                    println!("    last split brain: {sb}");
                }
                if let Some(f) = &r.disk_failure {
                    println!("    disk failed (detached): {f}");
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
    if let Some(v) = &r.verify {
        line.push_str(&format!(
            " verify:{} verified:{} verify-out-of-sync:{}",
            name(&v.state),
            v.done_bytes,
            v.out_of_sync_bytes
        ));
    }
    let s = &r.resync;
    if s.active {
        line.push_str(&format!(
            " sync-done:{} sync-total:{} sync-rate:{}",
            s.done_bytes, s.total_bytes, s.rate_bytes_per_sec
        ));
        if let Some(eta) = s.eta_secs {
            line.push_str(&format!(" eta:{eta}"));
        }
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

/// `dump-md --disk`: both slots read from the files themselves, printed
/// as the daemon's answer would be.
fn dump_md_offline(
    resource: String,
    disk: &Path,
    meta_disk: Option<PathBuf>,
    json: bool,
) -> Result<()> {
    let location = meta_disk.map_or(Location::Internal, Location::External);
    let answer = DumpMdAnswer {
        resource,
        metadata: MetaStore::inspect(disk, &location)?,
    };
    if json {
        let line = Response::Ok(Answer::DumpMd(Box::new(answer)));
        println!("{}", serde_json::to_string(&line)?);
    } else {
        print_md(&answer);
    }
    Ok(())
}

/// A verb answered with one line of text.
fn simple(socket: &Path, req: Request, timeout: Option<Duration>) -> Result<()> {
    let answer: MessageAnswer = request(socket, &req, timeout)?;
    println!("{}", answer.message);
    Ok(())
}

/// Bytes as MiB/GiB with one decimal.
fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

/// The resync progress of `r` in one line, if it is syncing.
fn progress_line(r: &ResourceStatus) -> Option<String> {
    let s = &r.resync;
    if !s.active {
        return None;
    }
    let pct = if s.total_bytes > 0 {
        s.done_bytes as f64 * 100.0 / s.total_bytes as f64
    } else {
        100.0
    };
    let eta = s.eta_secs.map_or_else(
        || "-".to_owned(),
        |e| format!("{}:{:02}:{:02}", e / 3600, e / 60 % 60, e % 60),
    );
    Some(format!(
        "sync {:.1}% {} of {} at {}/s, eta {eta}",
        pct,
        human(s.done_bytes),
        human(s.total_bytes),
        human(s.rate_bytes_per_sec)
    ))
}

/// `wait-sync` on a terminal: the answer, with a progress line redrawn
/// meanwhile (from `status`, once a second).
fn wait_with_progress(socket: &Path, req: Request) -> Result<()> {
    let Request::WaitSync { resource, .. } = &req else {
        return simple(socket, req, None);
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let (sock, res) = (socket.to_owned(), resource.clone());
    let painter = std::thread::spawn(move || {
        let mut drawn = false;
        loop {
            let st: Result<StatusAnswer> = request(
                &sock,
                &Request::Status {
                    resource: Some(res.clone()),
                },
                Some(Duration::from_secs(5)),
            );
            let line = st
                .ok()
                .and_then(|a| a.resources.first().and_then(progress_line));
            let mut out = std::io::stdout().lock();
            if let Some(l) = line {
                let _ = write!(out, "\r\x1b[2K{l}");
                let _ = out.flush();
                drawn = true;
            }
            drop(out);
            if done_rx.recv_timeout(Duration::from_secs(1)).is_ok() {
                break;
            }
        }
        if drawn {
            let _ = write!(std::io::stdout().lock(), "\r\x1b[2K");
        }
    });
    let answer: Result<MessageAnswer> = request(socket, &req, None);
    let _ = done_tx.send(());
    let _ = painter.join();
    println!("{}", answer?.message);
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
        Verb::DumpMd {
            resource,
            json,
            disk: Some(disk),
            meta_disk,
        } => dump_md_offline(resource, &disk, meta_disk, json),
        Verb::DumpMd { resource, json, .. } => {
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
        Verb::Verify { resource, stop } => simple(socket, Request::Verify { resource, stop }, wait),
        Verb::Invalidate { resource } => simple(socket, Request::Invalidate { resource }, wait),
        Verb::InvalidateRemote { resource } => {
            simple(socket, Request::InvalidateRemote { resource }, wait)
        }
        Verb::WaitSync { resource, timeout } => {
            let timeout_ms = timeout.map(timeout_ms).transpose()?.unwrap_or(0);
            let req = Request::WaitSync {
                resource,
                timeout_ms,
            };
            // The daemon answers at the timeout, or never: wait for it.
            if std::io::stdout().is_terminal() {
                wait_with_progress(socket, req)
            } else {
                simple(socket, req, None)
            }
        }
        Verb::Outdate { resource } => simple(socket, Request::Outdate { resource }, wait),
        Verb::ResumeIo { resource } => simple(socket, Request::ResumeIo { resource }, wait),
        Verb::ResyncRate {
            resource,
            max,
            min,
            fill_target,
            plan_ahead,
        } => simple(
            socket,
            Request::ResyncRate {
                resource,
                max_rate_mib: max,
                min_rate_mib: min,
                fill_target_kib: fill_target,
                plan_ahead_ms: plan_ahead,
            },
            wait,
        ),
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
