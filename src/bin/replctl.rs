//! `replctl`: the operator's tool. Sends one request to the local repld's
//! control socket and prints the answer (or, for `events`, the stream).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

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
}

fn connect(socket: &Path, req: &Value) -> Result<UnixStream> {
    let mut conn = UnixStream::connect(socket)
        .with_context(|| format!("cannot reach repld at {}", socket.display()))?;
    writeln!(conn, "{req}")?;
    Ok(conn)
}

fn request(socket: &Path, req: &Value, timeout: Option<Duration>) -> Result<Value> {
    replblk::control::request(socket, req, timeout).map_err(anyhow::Error::msg)
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("-")
}

fn print_status(answer: &Value) {
    let node = answer["node"].as_str().unwrap_or("?");
    for r in answer["resources"].as_array().into_iter().flatten() {
        println!("{} role:{} node:{node}", s(r, "name"), s(r, "role"));
        println!("  disk:{}", s(r, "disk"));
        if let Some(e) = r["down_reason"].as_str() {
            println!("  down: {e}");
        }
        match r["peer"].as_str() {
            Some(peer) => {
                println!(
                    "  {peer} connection:{} role:{}",
                    s(r, "connection"),
                    s(r, "peer_role")
                );
                println!(
                    "    replication:{} peer-disk:{} out-of-sync:{} bytes",
                    s(r, "replication"),
                    s(r, "peer_disk"),
                    r["out_of_sync_bytes"]
                );
                if let Some(d) = r["decision"].as_object() {
                    println!(
                        "    last decision: {} (rule {} {}: {})",
                        d.get("decision").and_then(Value::as_str).unwrap_or("?"),
                        d.get("rule_number").unwrap_or(&Value::Null),
                        d.get("rule").and_then(Value::as_str).unwrap_or("?"),
                        d.get("description").and_then(Value::as_str).unwrap_or("")
                    );
                }
                if let Some(e) = r["last_error"].as_str() {
                    println!("    last error: {e}");
                }
            }
            None => println!("  no peer (single node)"),
        }
    }
}

/// One event as a `drbdsetup events2`-like line.
fn event_line(e: &Value) -> String {
    let mut line = format!("{} {}", s(e, "type"), s(e, "name"));
    for (key, label) in [
        ("role", "role"),
        ("disk", "disk"),
        ("connection", "connection"),
        ("replication", "replication"),
        ("peer_role", "peer-role"),
        ("peer_disk", "peer-disk"),
    ] {
        if let Some(v) = e[key].as_str() {
            line.push_str(&format!(" {label}:{v}"));
        }
    }
    if let Some(d) = e["decision"].as_object() {
        if let Some(rule) = d.get("rule").and_then(Value::as_str) {
            line.push_str(&format!(" rule:{rule}"));
        }
    }
    line
}

fn events(socket: &Path, as_json: bool) -> Result<()> {
    let conn = connect(socket, &json!({"verb": "events"}))?;
    let stdout = std::io::stdout();
    for line in BufReader::new(conn).lines() {
        let line = line?;
        let value: Value = serde_json::from_str(&line).context("unreadable event")?;
        if value.get("ok") == Some(&json!(false)) {
            bail!("{}", value["error"].as_str().unwrap_or("events refused"));
        }
        let mut out = stdout.lock();
        if as_json {
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{}", event_line(&value))?;
        }
        // Line-buffered, so scripts reading a pipe see each change at once.
        out.flush()?;
    }
    Ok(())
}

fn print_md(answer: &Value) {
    let md = &answer["metadata"];
    println!(
        "resource {} metadata on {} at offset {}",
        s(answer, "resource"),
        s(md, "md_path"),
        md["md_start"]
    );
    for (i, slot) in md["slots"].as_array().into_iter().flatten().enumerate() {
        let active = md["active"].as_u64() == Some(i as u64);
        let mark = if active { " (active)" } else { "" };
        println!(
            "slot {i}{mark}: {}",
            serde_json::to_string_pretty(slot).unwrap_or_default()
        );
    }
}

fn simple(socket: &Path, req: Value) -> Result<()> {
    let answer = request(socket, &req, Some(Duration::from_secs(60)))?;
    if let Some(m) = answer["message"].as_str() {
        println!("{m}");
    }
    Ok(())
}

fn run(args: Args) -> Result<()> {
    let socket = args.socket.as_path();
    match args.verb {
        Verb::Status { resource, json } => {
            let a = request(
                socket,
                &json!({"verb": "status", "resource": resource}),
                Some(Duration::from_secs(10)),
            )?;
            if json {
                println!("{a}");
            } else {
                print_status(&a);
            }
            Ok(())
        }
        Verb::Events { json } => events(socket, json),
        Verb::CreateMd { resource, force } => simple(
            socket,
            json!({"verb": "create-md", "resource": resource, "force": force}),
        ),
        Verb::DumpMd { resource, json } => {
            let a = request(
                socket,
                &json!({"verb": "dump-md", "resource": resource}),
                Some(Duration::from_secs(10)),
            )?;
            if json {
                println!("{a}");
            } else {
                print_md(&a);
            }
            Ok(())
        }
        Verb::Up { resource } => simple(socket, json!({"verb": "up", "resource": resource})),
        Verb::Down { resource } => simple(socket, json!({"verb": "down", "resource": resource})),
        Verb::Promote { resource, force } => simple(
            socket,
            json!({"verb": "promote", "resource": resource, "force": force}),
        ),
        Verb::Demote { resource, force } => simple(
            socket,
            json!({"verb": "demote", "resource": resource, "force": force}),
        ),
        Verb::Connect {
            resource,
            discard_my_data,
        } => simple(
            socket,
            json!({"verb": "connect", "resource": resource, "discard_my_data": discard_my_data}),
        ),
        Verb::Disconnect { resource } => {
            simple(socket, json!({"verb": "disconnect", "resource": resource}))
        }
        Verb::NewCurrentUuid {
            resource,
            clear_bitmap,
        } => simple(
            socket,
            json!({"verb": "new-current-uuid", "resource": resource, "clear_bitmap": clear_bitmap}),
        ),
        Verb::WaitSync { resource, timeout } => {
            let timeout_ms = match timeout {
                Some(t) if t.is_finite() && t > 0.0 => (t * 1000.0).ceil() as u64,
                Some(t) => bail!("--timeout {t}: must be a positive number of seconds"),
                None => 0,
            };
            let a = request(
                socket,
                &json!({"verb": "wait-sync", "resource": resource, "timeout_ms": timeout_ms}),
                None,
            )?;
            if let Some(m) = a["message"].as_str() {
                println!("{m}");
            }
            Ok(())
        }
        Verb::OutOfSync { resource, json } => {
            let a = request(
                socket,
                &json!({"verb": "out-of-sync", "resource": resource}),
                Some(Duration::from_secs(10)),
            )?;
            if json {
                println!("{a}");
            } else {
                for run in a["runs"].as_array().into_iter().flatten() {
                    println!("{} {}", run[0], run[1]);
                }
            }
            Ok(())
        }
    }
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
