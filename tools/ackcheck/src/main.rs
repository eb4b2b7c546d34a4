//! `ackcheck`: proves what a block device kept of the writes it
//! acknowledged.
//!
//! `ackcheck write` writes stamped blocks through NBD at a queue depth,
//! optionally with flushes, across connection losses if asked to
//! reconnect, and appends to a log which writes were sent, acknowledged
//! or failed, and which acknowledged flushes covered them. `ackcheck
//! verify` later reads the device (through NBD or a backing file) and
//! checks every block against the log: each acknowledged write must be
//! there or be superseded by a later write to the same block (with
//! `--flushed`, only writes an acknowledged flush covers).

mod log;
mod nbd;
mod stamp;

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use replblk_proto::nbd::{cmd, tflags};

use crate::log::{Expect, Verdict};
use crate::stamp::Stamp;

#[derive(Parser)]
#[command(name = "ackcheck", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write stamped blocks and log what was acknowledged.
    Write(WriteArgs),
    /// Check a device against one or more logs (oldest first).
    Verify(VerifyArgs),
    /// Merge logs (oldest first) into one that a plain `verify` judges
    /// alike: superseded writes and flushes are dropped.
    Compact(CompactArgs),
}

#[derive(clap::Args)]
struct CompactArgs {
    #[arg(long = "log", required = true)]
    logs: Vec<PathBuf>,
    /// Where to write the compacted log (replaced atomically).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct WriteArgs {
    /// nbd://HOST:PORT/EXPORT; several are tried in turn when reconnecting.
    #[arg(long = "uri", required = true)]
    uris: Vec<String>,
    /// Log file, appended to.
    #[arg(long)]
    log: PathBuf,
    /// Run id stamped into every block (default: from the clock).
    #[arg(long)]
    run: Option<u64>,
    #[arg(long, default_value_t = 4096)]
    block_size: u64,
    /// First block of the region written.
    #[arg(long, default_value_t = 0)]
    first_block: u64,
    /// Blocks in the region (default: to the end of the device).
    #[arg(long)]
    blocks: Option<u64>,
    #[arg(long, default_value_t = 16)]
    qd: usize,
    /// Stop after this many writes sent.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Send a flush after every N writes (0: never).
    #[arg(long, default_value_t = 0)]
    flush_every: u64,
    /// On a lost connection, keep trying the URIs for up to this many
    /// seconds, then go on writing (0: a lost connection ends the run).
    #[arg(long, default_value_t = 0.0)]
    reconnect: f64,
    /// Seed for the block choice (default: the run id).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop at a path's appearance (a test's signal to end the run).
    #[arg(long)]
    stop_file: Option<PathBuf>,
    /// Create this path once the first write is acknowledged (a test's
    /// sign that writes are flowing, however slowly the run started).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Hand each log line to the file as it is logged (not buffered), so
    /// a copy of the log taken at any moment holds every reply received
    /// before it (e.g. just before a power cut of the server).
    #[arg(long)]
    log_each_line: bool,
}

#[derive(clap::Args)]
struct VerifyArgs {
    /// Logs written by `ackcheck write`, oldest first.
    #[arg(long = "log", required = true)]
    logs: Vec<PathBuf>,
    /// Read the device through NBD.
    #[arg(long, conflicts_with = "file")]
    uri: Option<String>,
    /// Read the device from a file (e.g. a backing file), at
    /// `--offset` + the block's offset.
    #[arg(long)]
    file: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// Require only the writes an acknowledged flush covers (a power loss
    /// of every copy).
    #[arg(long)]
    flushed: bool,
    /// A file of byte ranges (`offset length` per line) where a block may
    /// fail without failing the check: e.g. what the other node marked out
    /// of sync. Such blocks are counted as excused.
    #[arg(long)]
    excuse: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Write(a) => write(a),
        Command::Verify(a) => verify(a),
        Command::Compact(a) => compact(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ackcheck: {e:#}");
            std::process::exit(2);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A request on the wire, by cookie.
enum Pending {
    Write { seq: u64, block: u64 },
    Flush { covers: u64 },
}

#[derive(Default)]
struct Shared {
    pending: HashMap<u64, Pending>,
    /// Blocks with a write in flight (never two to one block at once:
    /// their order would be undefined).
    busy: HashSet<u64>,
    acked: u64,
    failed: u64,
    flushes: u64,
    /// The connection ended (the reader saw it or a send failed).
    dead: bool,
}

/// The log file; with `each_line`, every line is written out at once.
struct Logger(Mutex<BufWriter<File>>, bool);

impl Logger {
    fn line(&self, s: std::fmt::Arguments<'_>) {
        let mut w = lock(&self.0);
        let _ = writeln!(w, "{s}");
        if self.1 {
            let _ = w.flush();
        }
    }
    fn flush(&self) {
        let _ = lock(&self.0).flush();
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn write(a: WriteArgs) -> Result<i32> {
    let uris = a
        .uris
        .iter()
        .map(|u| nbd::parse_uri(u))
        .collect::<Result<Vec<_>>>()?;
    if a.block_size < 64 || !a.block_size.is_power_of_two() {
        bail!("--block-size must be a power of two of at least 64");
    }
    if a.qd == 0 {
        bail!("--qd must be at least 1");
    }
    if a.count.is_none() && a.duration.is_none() && a.stop_file.is_none() {
        bail!("give --count, --duration or --stop-file");
    }
    let run = a.run.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let connect_timeout = Duration::from_secs(5);
    let mut conn = nbd::Conn::open(&uris[0], connect_timeout)?;
    if conn.flags & tflags::READ_ONLY != 0 {
        bail!("the export is read-only");
    }
    let device_blocks = conn.size / a.block_size;
    let blocks = a
        .blocks
        .unwrap_or(device_blocks.saturating_sub(a.first_block));
    if blocks == 0 || a.first_block + blocks > device_blocks {
        bail!(
            "region of {blocks} blocks from block {} does not fit the device ({device_blocks} blocks)",
            a.first_block
        );
    }
    if (a.qd as u64) >= blocks {
        bail!("--qd must be smaller than the region's block count");
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.log)
        .with_context(|| format!("opening {}", a.log.display()))?;
    let logger = Arc::new(Logger(Mutex::new(BufWriter::new(file)), a.log_each_line));
    logger.line(format_args!(
        "R {run} {} {} {blocks}",
        a.block_size, a.first_block
    ));
    let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
    let started = Instant::now();
    let deadline = a.duration.map(|d| started + Duration::from_secs_f64(d));
    let mut rng = a.seed.unwrap_or(run) | 1;
    let mut seq = 0u64;
    let mut cookie = 0u64;
    let mut since_flush = 0u64;
    let mut lost = 0u64;
    let mut unknown = 0u64;
    let mut max_pause = Duration::ZERO;
    // Blocks whose write is unknown (in flight when a connection died):
    // not written again, so a late landing cannot pass for a new write.
    let mut tainted: HashSet<u64> = HashSet::new();
    let mut buf = vec![0u8; a.block_size as usize];
    let done = |seq: u64| {
        a.count.is_some_and(|c| seq >= c)
            || deadline.is_some_and(|d| Instant::now() >= d)
            || a.stop_file.as_ref().is_some_and(|p| p.exists())
    };
    let mut ready = a.ready_file.clone();
    'connections: loop {
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let mut stream = conn.stream.try_clone()?;
            let shared = shared.clone();
            let logger = logger.clone();
            let stop = stop.clone();
            std::thread::spawn(move || read_replies(&mut stream, &shared, &logger, &stop))
        };
        let mut sender = conn.stream.try_clone()?;
        let mut dead = false;
        while !done(seq) {
            let (m, cv) = &*shared;
            let mut s = lock(m);
            while s.pending.len() >= a.qd && !s.dead {
                s = cv
                    .wait_timeout(s, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if s.dead {
                dead = true;
                break;
            }
            if s.acked > 0 {
                if let Some(path) = ready.take() {
                    std::fs::write(&path, b"")
                        .with_context(|| format!("creating {}", path.display()))?;
                }
            }
            cookie += 1;
            let (kind, offset, len) = if a.flush_every > 0 && since_flush >= a.flush_every {
                since_flush = 0;
                let covers = s.acked;
                s.pending.insert(cookie, Pending::Flush { covers });
                (cmd::FLUSH, 0, 0)
            } else {
                let block = loop {
                    let b = a.first_block + xorshift(&mut rng) % blocks;
                    if !s.busy.contains(&b) && !tainted.contains(&b) {
                        break b;
                    }
                };
                seq += 1;
                since_flush += 1;
                s.busy.insert(block);
                s.pending.insert(cookie, Pending::Write { seq, block });
                logger.line(format_args!("I {seq} {block}"));
                stamp::encode(Stamp { run, block, seq }, &mut buf);
                (cmd::WRITE, block * a.block_size, a.block_size as u32)
            };
            drop(s);
            let payload = if kind == cmd::WRITE {
                &buf[..]
            } else {
                &[][..]
            };
            if nbd::send(&mut sender, kind, cookie, offset, len, payload).is_err() {
                lock(m).dead = true;
                cv.notify_all();
                dead = true;
                break;
            }
        }
        if !dead {
            // Drain what is in flight, then say goodbye.
            let (m, cv) = &*shared;
            let mut s = lock(m);
            let until = Instant::now() + Duration::from_secs(60);
            while !s.pending.is_empty() && !s.dead && Instant::now() < until {
                s = cv
                    .wait_timeout(s, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            dead = s.dead || !s.pending.is_empty();
            drop(s);
            if !dead {
                nbd::disconnect(&mut conn);
            }
        }
        stop.store(true, Ordering::SeqCst);
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        let _ = reader.join();
        if !dead {
            break;
        }
        // The connection died: what was in flight is unknown.
        let lost_at = Instant::now();
        lost += 1;
        {
            let mut s = lock(&shared.0);
            for (_, p) in s.pending.drain() {
                if let Pending::Write { block, .. } = p {
                    unknown += 1;
                    tainted.insert(block);
                }
            }
            s.busy.clear();
            s.dead = false;
        }
        logger.line(format_args!("L connection lost"));
        logger.flush();
        if a.reconnect <= 0.0 || done(seq) {
            break;
        }
        let give_up = lost_at + Duration::from_secs_f64(a.reconnect);
        let mut i = 0usize;
        loop {
            if Instant::now() >= give_up {
                eprintln!(
                    "ackcheck: no server took the connection within {}s",
                    a.reconnect
                );
                break 'connections;
            }
            match nbd::Conn::open(&uris[i % uris.len()], Duration::from_secs(2)) {
                Ok(c) if c.flags & tflags::READ_ONLY == 0 => {
                    conn = c;
                    break;
                }
                _ => {
                    i += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        max_pause = max_pause.max(lost_at.elapsed());
    }
    logger.flush();
    let s = lock(&shared.0);
    println!(
        "{{\"run\":{run},\"sent\":{seq},\"acked\":{},\"failed\":{},\"flushes\":{},\"lost_connections\":{lost},\"unknown\":{unknown},\"max_reconnect_ms\":{},\"elapsed_ms\":{}}}",
        s.acked,
        s.failed,
        s.flushes,
        max_pause.as_millis(),
        started.elapsed().as_millis()
    );
    Ok(if s.failed > 0 { 1 } else { 0 })
}

/// Reads replies until the connection ends, logging each.
fn read_replies(
    stream: &mut std::net::TcpStream,
    shared: &(Mutex<Shared>, Condvar),
    logger: &Logger,
    stop: &AtomicBool,
) {
    let (m, cv) = shared;
    loop {
        let reply = nbd::recv(stream);
        let mut s = lock(m);
        let (cookie, error) = match reply {
            Ok(r) => r,
            Err(_) => {
                if !stop.load(Ordering::SeqCst) || !s.pending.is_empty() {
                    s.dead = true;
                }
                cv.notify_all();
                return;
            }
        };
        match s.pending.remove(&cookie) {
            Some(Pending::Write { seq, block }) => {
                s.busy.remove(&block);
                if error == 0 {
                    s.acked += 1;
                    logger.line(format_args!("A {seq}"));
                } else {
                    s.failed += 1;
                    logger.line(format_args!("E {seq} {error}"));
                }
            }
            Some(Pending::Flush { covers }) => {
                if error == 0 {
                    s.flushes += 1;
                    logger.line(format_args!("F {covers}"));
                } else {
                    s.failed += 1;
                }
            }
            None => {
                // A cookie we never sent: the server is confused.
                s.dead = true;
                cv.notify_all();
                return;
            }
        }
        cv.notify_all();
    }
}

fn read_logs(paths: &[PathBuf]) -> Result<Vec<log::Run>> {
    let mut runs = Vec::new();
    for path in paths {
        let mut text = String::new();
        File::open(path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .with_context(|| format!("reading {}", path.display()))?;
        runs.extend(log::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?);
    }
    Ok(runs)
}

fn compact(a: CompactArgs) -> Result<i32> {
    let runs = read_logs(&a.logs)?;
    let text = Expect::compact(&runs);
    let tmp = a.out.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("renaming to {}", a.out.display()))?;
    Ok(0)
}

/// Reads the device at an offset.
type ReadFn = dyn FnMut(u64, &mut [u8]) -> Result<()>;

fn verify(a: VerifyArgs) -> Result<i32> {
    let runs = read_logs(&a.logs)?;
    let Some(bs) = runs.first().map(|r| r.block_size) else {
        bail!("the logs hold no run");
    };
    if runs.iter().any(|r| r.block_size != bs) {
        bail!("the runs use different block sizes");
    }
    let expect = Expect::new(&runs, a.flushed);
    let mut read: Box<ReadFn> = match (&a.uri, &a.file) {
        (Some(uri), None) => {
            let mut conn = nbd::Conn::open(&nbd::parse_uri(uri)?, Duration::from_secs(5))?;
            Box::new(move |off, buf| nbd::read_at(&mut conn, off, buf))
        }
        (None, Some(path)) => {
            let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let base = a.offset;
            Box::new(move |off, buf| {
                f.read_exact_at(buf, base + off)
                    .with_context(|| format!("reading at {}", base + off))
            })
        }
        _ => bail!("give --uri or --file"),
    };
    let excused: Vec<(u64, u64)> = match &a.excuse {
        None => Vec::new(),
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let mut f = l.split_whitespace().map(str::parse::<u64>);
                match (f.next(), f.next()) {
                    (Some(Ok(o)), Some(Ok(n))) => Ok((o, n)),
                    _ => Err(anyhow::anyhow!("{}: bad range {l:?}", path.display())),
                }
            })
            .collect::<Result<_>>()?,
    };
    let is_excused = |off: u64| {
        excused
            .iter()
            .any(|&(o, n)| off < o.saturating_add(n) && o < off + bs)
    };
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    let mut bad = Vec::new();
    let mut buf = vec![0u8; bs as usize];
    for block in expect.blocks() {
        read(block * bs, &mut buf)?;
        let found = stamp::decode(&buf);
        let verdict = expect.judge(block, found);
        let name = match verdict {
            Verdict::Ok => "ok",
            Verdict::Free => "free",
            _ if is_excused(block * bs) => "excused",
            Verdict::Lost => "lost",
            Verdict::Misplaced => "misplaced",
            Verdict::Phantom => "phantom",
        };
        *counts.entry(name).or_default() += 1;
        if !matches!(name, "ok" | "free" | "excused") && bad.len() < 10 {
            bad.push(format!("\"block {block}: {name} ({found:?})\""));
        }
    }
    let n = |k: &str| counts.get(k).copied().unwrap_or(0);
    let acked: usize = runs.iter().map(|r| r.acked.len()).sum();
    println!(
        "{{\"runs\":{},\"acked_writes\":{acked},\"blocks\":{},\"required\":{},\"ok\":{},\"free\":{},\"excused\":{},\"lost\":{},\"misplaced\":{},\"phantom\":{},\"first_bad\":[{}]}}",
        runs.len(),
        expect.blocks().count(),
        expect.required(),
        n("ok"),
        n("free"),
        n("excused"),
        n("lost"),
        n("misplaced"),
        n("phantom"),
        bad.join(",")
    );
    Ok(if n("lost") + n("misplaced") + n("phantom") > 0 {
        1
    } else {
        0
    })
}
