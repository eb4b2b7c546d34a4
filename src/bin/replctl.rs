//! `replctl`: the operator's tool. Sends one request to the local repld's
//! control socket and prints the answer.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
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
    /// Show roles, connection and out-of-sync data of each resource.
    Status {
        resource: Option<String>,
        /// Print the daemon's JSON (stable; see docs/control.md).
        #[arg(long)]
        json: bool,
    },
    /// List the out-of-sync byte ranges of a resource.
    OutOfSync {
        resource: String,
        #[arg(long)]
        json: bool,
    },
}

fn request(socket: &PathBuf, req: &Value) -> Result<Value> {
    let mut conn = UnixStream::connect(socket)
        .with_context(|| format!("cannot reach repld at {}", socket.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(conn, "{req}")?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    let answer: Value = serde_json::from_str(&line).context("repld sent an unreadable answer")?;
    if answer["ok"] != json!(true) {
        bail!("{}", answer["error"].as_str().unwrap_or("request failed"));
    }
    Ok(answer)
}

fn print_status(answer: &Value) {
    let node = answer["node"].as_str().unwrap_or("?");
    for r in answer["resources"].as_array().into_iter().flatten() {
        println!(
            "{} role:{} node:{node}",
            r["name"].as_str().unwrap_or("?"),
            r["role"].as_str().unwrap_or("?")
        );
        match r["peer"].as_str() {
            Some(peer) => {
                println!(
                    "  {peer} connection:{}",
                    r["connection"].as_str().unwrap_or("?")
                );
                println!(
                    "    out-of-sync: {} bytes ({} blocks)",
                    r["out_of_sync_bytes"], r["out_of_sync_blocks"]
                );
                if let Some(e) = r["last_error"].as_str() {
                    println!("    last error: {e}");
                }
            }
            None => println!("  no peer (single node)"),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match &args.verb {
        Verb::Status { resource, json } => request(
            &args.socket,
            &json!({"verb": "status", "resource": resource}),
        )
        .map(|a| {
            if *json {
                println!("{a}");
            } else {
                print_status(&a);
            }
        }),
        Verb::OutOfSync { resource, json } => request(
            &args.socket,
            &json!({"verb": "out-of-sync", "resource": resource}),
        )
        .map(|a| {
            if *json {
                println!("{a}");
            } else {
                for run in a["runs"].as_array().into_iter().flatten() {
                    println!("{} {}", run[0], run[1]);
                }
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
