//! End-to-end replication tests: two real `repld` processes ("alpha" the
//! Primary, "beta" the Secondary) mirror every write synchronously; these
//! tests drive the Primary with fio and the raw NBD client, kill the peer
//! mid-run, and act as a fake (misbehaving) peer on the replication port.
//!
//! Every wait is bounded, every daemon is stopped or killed by PID (also
//! when a test fails, by `Pair`'s Drop), and every temporary file and
//! network namespace is removed on drop.

mod common;

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use replblk_proto::nbd::{cmd_flags, tflags, Command as NbdCommand};
use replblk_proto::repl::{
    self, auth_mac, auth_verify, Frame, FrameHeader, Hello, RefuseCode, StateFrame, WriteFrame,
    CHALLENGE_LEN,
};
use serde_json::Value;

use common::client::Client;
use common::pair::{read_disk, NetnsLink, Pair, ALPHA, BETA};
use common::{run_tool, WAIT};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;
const SECRET: &str = "pair-test-secret";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Runs fio's nbd engine (optionally under a wrapper such as `ip netns exec
/// NS`); returns (success, jobs[0], all output).
fn fio(dir: &Path, prefix: &[String], uri: &str, args: &[String]) -> (bool, Value, String) {
    let mut cmd = match prefix.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg("fio");
            c
        }
        None => Command::new("fio"),
    };
    cmd.current_dir(dir)
        .args(["--name=v", "--ioengine=nbd", "--output-format=json"])
        .arg(format!("--uri={uri}"))
        .args(args);
    let (ok, out, err) = run_tool(&mut cmd);
    let text = format!("{cmd:?}\nstdout:\n{out}\nstderr:\n{err}");
    // fio may print lines such as "fio: connected to NBD server" first.
    let start = out
        .find("\n{")
        .map(|i| i + 1)
        .or_else(|| out.starts_with('{').then_some(0))
        .unwrap_or_else(|| panic!("no JSON in fio's output: {text}"));
    let report: Value = serde_json::Deserializer::from_str(&out[start..])
        .into_iter()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("unreadable JSON from fio: {text}"));
    let job = report["jobs"][0].clone();
    assert!(job.is_object(), "no job in fio's report: {text}");
    (ok, job, text)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn num(v: &Value, what: &str, text: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("fio report has no integer {what}: {text}"))
}

/// A write-then-verify fio run through the Primary: it must succeed, write
/// `size` bytes and read all of them back verified.
fn fio_verified(pair: &Pair, prefix: &[String], args: &[&str], size: u64) {
    let (ok, job, text) = fio(pair.dir.path(), prefix, &pair.primary_uri(), &strings(args));
    assert!(ok, "fio failed: {text}");
    assert_eq!(num(&job["error"], "error", &text), 0, "{text}");
    assert!(!text.contains("verify failed"), "{text}");
    let written = num(&job["write"]["io_bytes"], "write.io_bytes", &text);
    let verified = num(&job["read"]["io_bytes"], "read.io_bytes", &text);
    assert_eq!(written, size, "{text}");
    assert_eq!(
        verified, written,
        "fio did not verify what it wrote: {text}"
    );
}

/// The Primary reports an in-sync, connected peer.
fn assert_in_sync(pair: &Pair) {
    let s = pair.status(ALPHA);
    assert!(s.connected(), "alpha not connected after the run: {s:?}");
    assert_eq!(s.role, "Primary", "{s:?}");
    assert_eq!(s.out_of_sync_blocks, 0, "alpha has out-of-sync data: {s:?}");
    let b = pair.status(BETA);
    assert!(b.connected(), "beta not connected after the run: {b:?}");
    assert_eq!(b.role, "Secondary", "{b:?}");
}

/// Stops the Primary, then the Secondary; both must exit 0.
fn stop_both(pair: &mut Pair) {
    pair.stop(ALPHA);
    pair.stop(BETA);
    pair.assert_no_panic();
}

/// Indices of the 4 KiB blocks in which `a` and `b` differ.
fn differing_blocks(a: &[u8], b: &[u8]) -> Vec<usize> {
    a.chunks(BLOCK)
        .zip(b.chunks(BLOCK))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect()
}

/// Both backing files have the same bytes (and something was written).
fn assert_disks_identical(pair: &Pair) {
    let a = read_disk(&pair.alpha().disk);
    let b = read_disk(&pair.beta().disk);
    assert_eq!(a.len(), b.len(), "backing files differ in size");
    assert!(a.iter().any(|&x| x != 0), "nothing reached alpha's disk");
    if a != b {
        let diff = differing_blocks(&a, &b);
        panic!(
            "the two backing files differ in {} of {} 4 KiB blocks, first at byte offset {}",
            diff.len(),
            a.len() / BLOCK,
            diff[0] * BLOCK
        );
    }
}

fn assert_all_zero(path: &Path, what: &str) {
    let data = read_disk(path);
    if let Some(i) = data.iter().position(|&x| x != 0) {
        panic!(
            "{what}: {} has a non-zero byte at offset {i}",
            path.display()
        );
    }
}

fn count_lines(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

// ---------------------------------------------------------------------------
// 1. fio through the Primary on loopback
// ---------------------------------------------------------------------------

const FIO_VERIFY: [&str; 5] = [
    "--size=64m",
    "--verify=crc32c",
    "--do_verify=1",
    "--verify_fatal=1",
    "--randrepeat=1",
];

#[test]
fn fio_random_4k_writes_through_the_primary_verify_and_leave_both_disks_identical() {
    let mut pair = Pair::start_default();
    let mut args = vec!["--rw=randwrite", "--bs=4k", "--iodepth=16"];
    args.extend(FIO_VERIFY);
    fio_verified(&pair, &[], &args, 64 * MIB);
    assert_in_sync(&pair);
    stop_both(&mut pair);
    assert_disks_identical(&pair);
}

#[test]
fn fio_sequential_1m_writes_through_the_primary_verify_and_leave_both_disks_identical() {
    let mut pair = Pair::start_default();
    let mut args = vec!["--rw=write", "--bs=1M", "--iodepth=8"];
    args.extend(FIO_VERIFY);
    fio_verified(&pair, &[], &args, 64 * MIB);
    assert_in_sync(&pair);
    stop_both(&mut pair);
    assert_disks_identical(&pair);
}

// ---------------------------------------------------------------------------
// 2. The same across two network namespaces
// ---------------------------------------------------------------------------

#[test]
fn fio_across_two_network_namespaces_joined_by_veth_verifies_and_leaves_both_disks_identical() {
    // Declared first, dropped last: the daemons die before their namespaces.
    let netns = NetnsLink::create();
    let mut pair = Pair::builder()
        .wrapper_on(ALPHA, &netns.exec_prefix(0))
        .ip_on(ALPHA, netns.ips[0])
        .wrapper_on(BETA, &netns.exec_prefix(1))
        .ip_on(BETA, netns.ips[1])
        .start();
    // The peers really talk across the veth pair.
    let connected = pair.wait_log_line(ALPHA, "peer connected");
    assert!(
        connected.contains(&netns.ips[1].to_string()),
        "alpha's peer is not beta's namespace address: {connected}"
    );
    let prefix = strings(&netns.exec_prefix(0));
    let mut args = vec!["--rw=randwrite", "--bs=4k", "--iodepth=16"];
    args.extend(FIO_VERIFY);
    fio_verified(&pair, &prefix, &args, 64 * MIB);
    assert_in_sync(&pair);
    stop_both(&mut pair);
    assert_disks_identical(&pair);
}

// ---------------------------------------------------------------------------
// 3. Concurrent overlapping writes
// ---------------------------------------------------------------------------

/// Pipelines `batches` x 8 random writes (some FUA), write-zeroes, trims
/// and flushes, all inside the first `region` bytes, so every connection
/// overwrites the others' ranges.
fn overlapping_writer(addr: &str, id: u64, region: u64, batches: usize) -> usize {
    let mut client = Client::connect(addr, "r0");
    assert_ne!(client.flags & tflags::SEND_WRITE_ZEROES, 0);
    assert_ne!(client.flags & tflags::SEND_TRIM, 0);
    let mut rng = StdRng::seed_from_u64(0x5eed_0000 + id);
    let mut done = 0;
    for _ in 0..batches {
        let mut cookies = HashSet::new();
        for _ in 0..8 {
            let len = rng.gen_range(1..=64u64) * 512;
            let offset = rng.gen_range(0..(region - len) / 512) * 512;
            let cookie = match rng.gen_range(0..32) {
                0 => client.send(NbdCommand::Flush, 0, 0, 0, &[]),
                1 => client.send(NbdCommand::Trim, 0, offset, len as u32, &[]),
                2 => client.send(NbdCommand::WriteZeroes, 0, offset, len as u32, &[]),
                3 => client.send(
                    NbdCommand::WriteZeroes,
                    cmd_flags::NO_HOLE,
                    offset,
                    len as u32,
                    &[],
                ),
                op => {
                    let mut data = vec![0u8; len as usize];
                    rng.fill_bytes(&mut data);
                    let flags = if op < 8 { cmd_flags::FUA } else { 0 };
                    client.send(NbdCommand::Write, flags, offset, len as u32, &data)
                }
            };
            cookies.insert(cookie);
        }
        while !cookies.is_empty() {
            let reply = client.recv();
            assert!(cookies.remove(&reply.cookie), "unexpected cookie {reply:?}");
            assert_eq!(reply.error, 0, "connection {id}: request failed: {reply:?}");
            done += 1;
        }
    }
    client.disconnect();
    done
}

#[test]
fn concurrent_overlapping_writes_from_four_connections_leave_both_disks_identical() {
    let mut pair = Pair::start_default();
    let addr = pair.primary_addr();
    let region = MIB;
    let writers: Vec<_> = (0..4u64)
        .map(|id| {
            let addr = addr.clone();
            std::thread::spawn(move || overlapping_writer(&addr, id, region, 60))
        })
        .collect();
    let mut total = 0;
    for w in writers {
        total += w.join().expect("a writer thread failed");
    }
    assert_eq!(total, 4 * 60 * 8);
    assert_in_sync(&pair);

    // The Primary serves what is in its file.
    let mut reader = Client::connect(&addr, "r0");
    let served = reader.read(0, region as u32).expect("read back");
    reader.disconnect();
    assert!(
        served == read_disk(&pair.alpha().disk)[..region as usize],
        "alpha serves data that differs from its backing file"
    );

    stop_both(&mut pair);
    assert_disks_identical(&pair);
}

/// Overlapping writes that reach the Primary in one segment are read as
/// one burst: the second must wait for the first, whose frame the burst
/// has not sent yet. It is sent before the wait, so both complete at once
/// (not at the next keepalive, here a minute away) and land in order.
#[test]
fn overlapping_writes_in_one_segment_complete_without_waiting_for_a_keepalive() {
    let mut pair = Pair::builder()
        .replication("ping_interval_ms", "60000")
        .replication("ping_timeout_ms", "120000")
        .start();
    let mut client = Client::connect(&pair.primary_addr(), "r0");
    client
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    // 64 overlapping writes in one send: the Primary reads them 32 KiB at
    // a time, so most are read with others still buffered behind them.
    let mut out = BytesMut::new();
    for cookie in 1..=64u64 {
        replblk_proto::nbd::Request {
            flags: 0,
            command: NbdCommand::Write,
            cookie,
            offset: 4096,
            length: 8192,
        }
        .encode(&mut out);
        out.extend_from_slice(&[cookie as u8; 8192]);
    }
    client.stream.write_all(&out).expect("send the writes");
    let mut cookies: HashSet<u64> = (1..=64).collect();
    while !cookies.is_empty() {
        let reply = client.recv();
        assert_eq!(reply.error, 0, "{reply:?}");
        assert!(cookies.remove(&reply.cookie), "unexpected {reply:?}");
    }
    assert_eq!(
        client.read(4096, 8192).expect("read back"),
        vec![64u8; 8192]
    );
    client.disconnect();
    assert_in_sync(&pair);
    stop_both(&mut pair);
    assert_disks_identical(&pair);
}

// ---------------------------------------------------------------------------
// 4. The Secondary is killed in the middle of a fio run
// ---------------------------------------------------------------------------

#[test]
fn killing_the_secondary_mid_fio_keeps_the_primary_serving_and_marks_every_differing_block_out_of_sync(
) {
    let mut pair = Pair::start_default();
    let dir: PathBuf = pair.dir.path().to_owned();
    let uri = pair.primary_uri();
    let args = strings(&[
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--size=64m",
        "--time_based",
        "--runtime=4",
        // Slow enough that the blocks written after the kill are a
        // fraction of the device, so the out-of-sync set means something.
        "--rate_iops=1000",
    ]);
    let fio_thread = std::thread::spawn(move || fio(&dir, &[], &uri, &args));
    std::thread::sleep(Duration::from_millis(1500));
    pair.kill(BETA);
    let (ok, job, text) = fio_thread.join().expect("fio thread");

    // The client never noticed.
    assert!(ok, "fio failed after the peer was killed: {text}");
    assert_eq!(num(&job["error"], "error", &text), 0, "{text}");
    let written = num(&job["write"]["io_bytes"], "write.io_bytes", &text);
    let written_blocks = written / BLOCK as u64;
    assert!(written_blocks > 0, "{text}");

    let s = pair.wait_status(ALPHA, "losing the peer", |s| !s.connected());
    assert!(s.out_of_sync_blocks > 0, "nothing out of sync: {s:?}");
    assert!(
        s.out_of_sync_blocks <= written_blocks,
        "{} blocks out of sync but fio only wrote {written_blocks}: {s:?}",
        s.out_of_sync_blocks
    );
    let device_blocks = pair.alpha().disk_size / BLOCK as u64;
    assert!(
        s.out_of_sync_blocks < device_blocks,
        "the whole device is out of sync, nothing to tell apart: {s:?}"
    );
    let runs = pair.out_of_sync_runs(ALPHA);
    let run_bytes: u64 = runs.iter().map(|r| r.1).sum();
    assert_eq!(
        run_bytes, s.out_of_sync_bytes,
        "runs {runs:?} disagree with {s:?}"
    );
    let log = pair.stop(ALPHA);
    assert!(
        log.contains("peer disconnected"),
        "alpha did not log losing its peer:\n{log}"
    );
    pair.assert_no_panic();

    let a = read_disk(&pair.alpha().disk);
    let b = read_disk(&pair.beta().disk);
    assert_eq!(a.len(), b.len());
    let in_runs = |block: usize| {
        let (start, end) = ((block * BLOCK) as u64, ((block + 1) * BLOCK) as u64);
        runs.iter().any(|&(o, l)| o <= start && end <= o + l)
    };
    let diff = differing_blocks(&a, &b);
    eprintln!(
        "fio wrote {written_blocks} blocks; {} out of sync in {} runs; {} blocks differ",
        s.out_of_sync_blocks,
        runs.len(),
        diff.len()
    );
    assert!(
        !diff.is_empty(),
        "writes after the kill did not reach alpha"
    );
    let outside: Vec<_> = diff.iter().filter(|&&blk| !in_runs(blk)).collect();
    assert!(
        outside.is_empty(),
        "{} of {} differing blocks are not marked out of sync, e.g. block {} (byte {}); runs {runs:?}",
        outside.len(),
        diff.len(),
        outside[0],
        outside[0] * BLOCK
    );
    // Blocks replicated before the kill reached beta.
    assert!(
        b.iter().any(|&x| x != 0),
        "nothing was replicated before the kill"
    );
}

#[test]
fn a_restarted_secondary_reconnects_and_the_out_of_sync_set_is_resynced() {
    let mut pair = Pair::start_default();
    let addr = pair.primary_addr();
    let write = |offset: u64, byte: u8| {
        let mut client = Client::connect(&addr, "r0");
        assert_eq!(client.write(offset, &[byte; 64 * KIB as usize]), 0);
        assert_eq!(client.flush(), 0);
        client.disconnect();
    };
    write(0, 0x11);
    assert_in_sync(&pair);

    // A graceful restart of the Secondary: nothing is lost.
    pair.restart(BETA);
    pair.wait_connected();
    pair.wait_log_line(ALPHA, "peer disconnected");
    assert_in_sync(&pair);

    // Killed, then a write while it is away: exactly that range is out of
    // sync, and the reconnect resyncs it (rule 70: alpha's bitmap
    // generation is beta's current one).
    pair.kill(BETA);
    pair.wait_status(ALPHA, "losing the peer", |s| !s.connected());
    write(MIB, 0x22);
    let before = pair.status(ALPHA);
    assert_eq!(before.out_of_sync_blocks, 16, "{before:?}");
    assert_eq!(pair.out_of_sync_runs(ALPHA), [(MIB, 64 * KIB)]);
    pair.start(BETA);
    pair.wait_connected();
    pair.ok(ALPHA, &["wait-sync", "r0", "--timeout", "20"]);
    write(2 * MIB, 0x33);
    let after = pair.status(ALPHA);
    assert!(after.connected(), "{after:?}");
    assert_eq!(after.out_of_sync_blocks, 0, "{after:?}");
    assert_eq!(
        after.raw["resources"][0]["decision"]["rule_number"],
        70,
        "{after:?}\n{}\n{}",
        pair.log(ALPHA),
        pair.log(BETA)
    );

    stop_both(&mut pair);
    assert_disks_identical(&pair);
    let b = read_disk(&pair.beta().disk);
    assert!(b[..64 * KIB as usize].iter().all(|&x| x == 0x11));
    assert!(b[MIB as usize..(MIB + 64 * KIB) as usize]
        .iter()
        .all(|&x| x == 0x22));
    assert!(b[2 * MIB as usize..(2 * MIB + 64 * KIB) as usize]
        .iter()
        .all(|&x| x == 0x33));
}

// ---------------------------------------------------------------------------
// 5. Refusals
// ---------------------------------------------------------------------------

/// Writes 64 KiB at offset 0 through the Primary (which serves while its
/// peer is refused) and checks they are counted out of sync.
fn write_through_disconnected_primary(pair: &Pair) {
    let mut client = Client::connect(&pair.primary_addr(), "r0");
    assert_eq!(client.write(0, &[0xa5; 64 * KIB as usize]), 0);
    assert_eq!(client.flush(), 0);
    client.disconnect();
    let s = pair.status(ALPHA);
    assert!(s.out_of_sync_blocks >= 16, "{s:?}");
}

/// For `duration`, neither node ever reports `Connected`.
fn assert_never_connected(pair: &Pair, duration: Duration) {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        for node in [ALPHA, BETA] {
            let s = pair.status(node);
            assert!(
                !s.connected(),
                "{node} connected to a peer it should refuse: {s:?}\n--- log:\n{}",
                pair.log(node)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A real alpha is refused by a real beta (or the other way round): both
/// log `needle` on an ERROR line, both keep reporting `last_error`
/// containing `error_word`, nothing reaches beta's disk, both keep running
/// and stop cleanly. Returns both logs.
fn assert_refused_both_ways(mut pair: Pair, needle: &str, error_word: &str) -> [String; 2] {
    for node in [ALPHA, BETA] {
        let line = pair.wait_log_line(node, needle);
        assert!(line.contains("ERROR"), "{node}: not an error line: {line}");
    }
    write_through_disconnected_primary(&pair);
    assert_never_connected(&pair, Duration::from_secs(4));
    for node in [ALPHA, BETA] {
        let s = pair.status(node);
        let e = s.last_error.clone().unwrap_or_default();
        assert!(
            e.contains(error_word),
            "{node}: last_error does not mention {error_word:?}: {s:?}"
        );
        assert!(pair.is_running(node), "{node} exited:\n{}", pair.log(node));
    }
    assert_all_zero(&pair.beta().disk, "beta's disk after a refused link");
    stop_both(&mut pair);
    [pair.log(ALPHA), pair.log(BETA)]
}

#[test]
fn a_peer_with_the_wrong_secret_is_refused_on_both_sides_without_a_retry_storm() {
    let pair = Pair::builder()
        .secret_on(BETA, "not-the-shared-secret")
        .start_unconnected();
    let logs = assert_refused_both_ways(pair, "authentication failed", "authentication");
    // Over ~4 s with reconnect_max_ms = 1000 there are a handful of
    // attempts; each side logs one line per distinct failure.
    for (node, log) in [ALPHA, BETA].iter().zip(&logs) {
        let n = count_lines(log, "authentication failed");
        assert!(
            (1..=3).contains(&n),
            "{node} logged {n} authentication failures:\n{log}"
        );
    }
}

#[test]
fn a_dialer_refused_for_a_wrong_secret_retries_no_faster_than_reconnect_max_ms() {
    // alpha alone, dialing a fake beta that knows another secret: count
    // the attempts that actually reach beta's address.
    let mut pair = Pair::builder().only(ALPHA).start_unconnected();
    let size = pair.alpha().disk_size;
    let listener = TcpListener::bind(pair.beta().repl_addr).expect("binding beta's address");
    listener.set_nonblocking(true).expect("nonblocking");
    let mut attempts = 0;
    let mut times: Vec<Instant> = Vec::new();
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + WAIT;
    loop {
        if first.is_some_and(|t| t.elapsed() >= Duration::from_secs(4)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alpha never dialed beta's address"
        );
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => panic!("accept: {e}"),
        };
        first.get_or_insert_with(Instant::now);
        attempts += 1;
        times.push(Instant::now());
        stream.set_nonblocking(false).expect("blocking");
        let mut fake = FakePeer::with(stream);
        fake.answer_as_beta(size, b"some-other-secret");
        assert!(matches!(fake.recv(), Ok(Frame::Auth { .. })), "no Auth");
        match fake.recv() {
            Ok(Frame::Refuse { code, message }) => {
                assert_eq!(code, RefuseCode::AuthFailed, "{message}");
                assert!(message.contains("authentication failed"), "{message}");
            }
            other => panic!("expected Refuse, got {other:?}"),
        }
        assert!(fake.until_closed().is_empty());
    }
    // A backoff of 1 s (±20 %) allows 4 to 6 attempts in 4 s; a storm
    // would be hundreds.
    assert!(
        (3..=6).contains(&attempts),
        "{attempts} connection attempts in 4 s with reconnect_max_ms = 1000\n{}",
        pair.log(ALPHA)
    );
    // After each refusal the dialer waits the cap (1 s, -20 % jitter at
    // most), not the short first backoff of a plain failure.
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(800),
            "a retry {gap:?} after a refusal, with reconnect_max_ms = 1000"
        );
    }
    let log = pair.log(ALPHA);
    assert_eq!(count_lines(&log, "authentication failed"), 1, "{log}");
    let s = pair.status(ALPHA);
    assert!(!s.connected(), "{s:?}");
    assert!(pair.is_running(ALPHA), "alpha exited:\n{log}");
    pair.stop(ALPHA);
    pair.assert_no_panic();
}

#[test]
fn a_peer_configured_for_another_resource_is_refused() {
    let pair = Pair::builder().resource_on(BETA, "r1").start_unconnected();
    assert_ne!(pair.alpha().config, pair.beta().config);
    assert_refused_both_ways(pair, "this link is for \"r1\"", "resource");
}

#[test]
fn peers_with_different_disk_sizes_are_refused() {
    let pair = Pair::builder()
        .disk_size_on(BETA, 32 * MIB)
        .start_unconnected();
    assert_refused_both_ways(pair, "sizes differ", "sizes differ");
}

/// Our side of the replication protocol, for playing a (bad) peer.
struct FakePeer {
    stream: TcpStream,
}

impl FakePeer {
    fn connect(addr: SocketAddr) -> FakePeer {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        Self::with(stream)
    }

    fn with(stream: TcpStream) -> FakePeer {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        FakePeer { stream }
    }

    fn send(&mut self, frame: &Frame) {
        let mut out = BytesMut::new();
        frame.encode(&mut out);
        self.stream.write_all(&out).expect("sending a frame");
    }

    fn recv(&mut self) -> io::Result<Frame> {
        let mut raw = [0u8; FrameHeader::LEN];
        self.stream.read_exact(&mut raw)?;
        let header = FrameHeader::decode(&mut io::Cursor::new(&raw[..]))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
        let mut body = vec![0u8; header.length as usize];
        self.stream.read_exact(&mut body)?;
        Frame::decode_body(header.kind, &body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    }

    /// Plays beta to a dialing alpha: reads alpha's Hello, answers with
    /// beta's Hello and an Auth made with `secret`.
    fn answer_as_beta(&mut self, size: u64, secret: &[u8]) {
        let theirs = match self.recv().expect("alpha's Hello") {
            Frame::Hello(h) => h,
            other => panic!("expected Hello, got {other:?}"),
        };
        let mut challenge = [0u8; CHALLENGE_LEN];
        rand::thread_rng().fill_bytes(&mut challenge);
        self.send(&Frame::Hello(Hello {
            min_version: repl::PROTOCOL_MIN,
            max_version: repl::PROTOCOL_MAX,
            features: repl::features::NONE,
            node: BETA.into(),
            peer: ALPHA.into(),
            resource: "r0".into(),
            size,
            challenge,
            after_sb: [0, 0],
        }));
        let mac = auth_mac(secret, &theirs.challenge, BETA, "r0").expect("mac");
        self.send(&Frame::Auth { mac });
    }

    /// The full handshake as alpha with the right secret, up to beta's
    /// AuthOk.
    fn authenticate_as_alpha(&mut self, size: u64) {
        let mut challenge = [0u8; CHALLENGE_LEN];
        rand::thread_rng().fill_bytes(&mut challenge);
        self.send(&hello(
            (repl::PROTOCOL_MIN, repl::PROTOCOL_MAX),
            size,
            challenge,
        ));
        let theirs = match self.recv().expect("beta's Hello") {
            Frame::Hello(h) => h,
            other => panic!("expected Hello, got {other:?}"),
        };
        assert_eq!((theirs.node.as_str(), theirs.peer.as_str()), (BETA, ALPHA));
        let mac = auth_mac(SECRET.as_bytes(), &theirs.challenge, ALPHA, "r0").expect("mac");
        self.send(&Frame::Auth { mac });
        match self.recv().expect("beta's Auth") {
            Frame::Auth { mac } => assert!(
                auth_verify(SECRET.as_bytes(), &challenge, BETA, "r0", &mac),
                "beta's MAC does not verify"
            ),
            other => panic!("expected Auth, got {other:?}"),
        }
        self.send(&Frame::AuthOk);
        match self.recv().expect("beta's AuthOk") {
            Frame::AuthOk => {}
            other => panic!("expected AuthOk, got {other:?}"),
        }
    }

    /// State exchange: a fresh Primary meets beta's fresh metadata, so no
    /// sync is needed and the session starts.
    fn start_session_as_fresh_primary(&mut self) {
        self.send(&Frame::State(StateFrame {
            role: 1,
            disk: 1,
            current: 4,
            ..StateFrame::default()
        }));
        match self.recv().expect("beta's State") {
            Frame::State(st) => assert_eq!((st.role, st.current), (0, 4), "{st:?}"),
            other => panic!("expected State, got {other:?}"),
        }
    }

    /// The next frame that is not a keepalive (Pings are answered).
    fn recv_data(&mut self) -> Frame {
        loop {
            match self.recv().expect("a frame from beta") {
                Frame::Ping { nonce } => self.send(&Frame::Pong { nonce }),
                Frame::Pong { .. } | Frame::State(_) => {}
                f => return f,
            }
        }
    }

    /// Reads until the other side closes (bounded by the read timeout);
    /// returns the frames that came before.
    fn until_closed(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            match self.recv() {
                Ok(f) => frames.push(f),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    return frames
                }
                Err(e) => panic!("connection not closed ({e}); frames so far: {frames:?}"),
            }
        }
    }
}

fn hello(versions: (u16, u16), size: u64, challenge: [u8; CHALLENGE_LEN]) -> Frame {
    Frame::Hello(Hello {
        min_version: versions.0,
        max_version: versions.1,
        features: repl::features::NONE,
        node: ALPHA.into(),
        peer: BETA.into(),
        resource: "r0".into(),
        size,
        challenge,
        after_sb: [0, 0],
    })
}

/// Beta survived a fake peer: still running, never panicked, and it
/// stops cleanly.
fn beta_survives(pair: &mut Pair) {
    assert!(pair.is_running(BETA), "beta exited:\n{}", pair.log(BETA));
    pair.stop(BETA);
    pair.assert_no_panic();
}

#[test]
fn a_peer_offering_only_an_unknown_protocol_version_is_refused_with_version_mismatch() {
    let mut pair = Pair::builder().only(BETA).start_unconnected();
    let mut fake = FakePeer::connect(pair.beta().repl_addr);
    fake.send(&hello((9, 9), pair.beta().disk_size, [7; CHALLENGE_LEN]));
    match fake.recv().expect("beta's answer") {
        Frame::Refuse { code, message } => {
            assert_eq!(code, RefuseCode::VersionMismatch, "{message}");
            assert!(message.contains("no common protocol version"), "{message}");
        }
        other => panic!("expected Refuse, got {other:?}"),
    }
    let rest = fake.until_closed();
    assert!(rest.is_empty(), "frames after the refusal: {rest:?}");
    let line = pair.wait_log_line(BETA, "no common protocol version");
    assert!(line.contains("ERROR"), "not an error line: {line}");
    let s = pair.status(BETA);
    assert!(!s.connected(), "{s:?}");
    assert!(
        s.last_error.as_deref().unwrap_or("").contains("version"),
        "{s:?}"
    );
    assert_all_zero(&pair.beta().disk, "beta's disk after a refused peer");
    beta_survives(&mut pair);
}

#[test]
fn garbage_on_the_replication_port_is_dropped_and_a_real_peer_still_connects() {
    let mut pair = Pair::builder().only(BETA).start_unconnected();
    let mut fake = FakePeer::connect(pair.beta().repl_addr);
    let mut garbage = vec![0u8; 4096];
    StdRng::seed_from_u64(0x6a7b).fill_bytes(&mut garbage);
    garbage[..4].copy_from_slice(b"junk");
    // Beta may already have closed (reset) after reading the header.
    let _ = fake.stream.write_all(&garbage);
    let frames = fake.until_closed();
    assert!(frames.is_empty(), "beta answered garbage with {frames:?}");
    pair.wait_log_line(BETA, "protocol error");
    assert!(pair.is_running(BETA), "beta exited:\n{}", pair.log(BETA));
    assert!(!pair.status(BETA).connected());

    // A real alpha still gets through, and replication works.
    pair.start(ALPHA);
    pair.wait_connected();
    pair.promote_fresh_alpha();
    let mut client = Client::connect(&pair.primary_addr(), "r0");
    assert_eq!(client.write(MIB, &[0x3c; 256 * KIB as usize]), 0);
    assert_eq!(client.flush(), 0);
    client.disconnect();
    assert_in_sync(&pair);
    stop_both(&mut pair);
    assert_disks_identical(&pair);
}

#[test]
fn a_replicated_write_with_a_bad_crc_is_not_applied_and_closes_the_link() {
    let mut pair = Pair::builder().only(BETA).start_unconnected();
    let size = pair.beta().disk_size;
    let mut fake = FakePeer::connect(pair.beta().repl_addr);
    fake.authenticate_as_alpha(size);
    fake.start_session_as_fresh_primary();

    // A good write is applied and acknowledged: the session is real.
    let good = Bytes::from(vec![0x5a; 4096]);
    fake.send(&Frame::Write(WriteFrame::new(1, MIB, 0, good)));
    match fake.recv_data() {
        Frame::Ack { seq: 1, status: 0 } => {}
        other => panic!("expected Ack for seq 1, got {other:?}"),
    }
    assert!(pair.status(BETA).connected());

    // Then one whose crc does not match its payload.
    let mut bad = WriteFrame::new(2, 0, 0, Bytes::from(vec![0xc3; 64 * KIB as usize]));
    bad.crc ^= 0xdead_beef;
    fake.send(&Frame::Write(bad));
    let frames = fake.until_closed();
    assert!(
        !frames
            .iter()
            .any(|f| matches!(f, Frame::Ack { seq: 2, .. })),
        "beta acknowledged the corrupt write: {frames:?}"
    );
    let line = pair.wait_log_line(BETA, "crc32c mismatch");
    assert!(line.contains("peer disconnected"), "{line}");
    let s = pair.wait_status(BETA, "dropping the link", |s| !s.connected());
    assert!(
        s.last_error.as_deref().unwrap_or("").contains("crc32c"),
        "{s:?}"
    );

    let disk = read_disk(&pair.beta().disk);
    assert!(
        disk[..64 * KIB as usize].iter().all(|&x| x == 0),
        "the corrupt write reached beta's disk"
    );
    assert!(
        disk[MIB as usize..MIB as usize + 4096]
            .iter()
            .all(|&x| x == 0x5a),
        "the good write did not reach beta's disk"
    );
    beta_survives(&mut pair);
}

#[test]
fn writes_a_peer_acknowledged_but_never_made_durable_count_as_out_of_sync_when_it_vanishes() {
    // A fake beta acknowledges writes as applied but never answers a
    // barrier, then disappears, as a Secondary machine that crashed with
    // those writes in its page cache would.
    let pair = Pair::builder().only(ALPHA).start_unconnected();
    let size = pair.alpha().disk_size;
    let listener = TcpListener::bind(pair.beta().repl_addr).expect("binding beta's address");
    let addr = pair.primary_addr();
    // Bootstrapping promoted alpha with --force: a new generation.
    let current = u64::from_str_radix(
        pair.status(ALPHA).raw["resources"][0]["generations"]["current"]
            .as_str()
            .expect("current generation"),
        16,
    )
    .expect("hex");
    let (stream, _) = listener.accept().expect("alpha dials beta");
    let mut fake = FakePeer::with(stream);
    fake.answer_as_beta(size, SECRET.as_bytes());
    assert!(matches!(fake.recv(), Ok(Frame::Auth { .. })), "no Auth");
    assert!(matches!(fake.recv(), Ok(Frame::AuthOk)), "no AuthOk");
    fake.send(&Frame::AuthOk);
    assert!(matches!(fake.recv(), Ok(Frame::State(_))), "no State");
    // Same generation, UpToDate: no sync needed.
    fake.send(&Frame::State(StateFrame {
        disk: 4,
        md_flags: 3,
        current,
        ..StateFrame::default()
    }));
    pair.wait_status(ALPHA, "connected to the fake beta", |s| s.connected());

    let writer = std::thread::spawn(move || {
        let mut client = Client::connect(&addr, "r0");
        let status = client.write(MIB, &[0x7e; 64 * KIB as usize]);
        client.disconnect();
        status
    });
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(
            Instant::now() < deadline,
            "the write never reached the fake beta"
        );
        match fake.recv_data() {
            Frame::Write(w) => {
                fake.send(&Frame::Ack {
                    seq: w.seq,
                    status: 0,
                });
                if w.offset == MIB {
                    break;
                }
            }
            // Barriers (the periodic one) are never answered.
            Frame::Barrier { .. } => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
    assert_eq!(
        writer.join().expect("writer"),
        0,
        "the client's write failed"
    );
    assert_eq!(
        pair.status(ALPHA).out_of_sync_blocks,
        0,
        "acknowledged: in sync while the link is up"
    );
    drop(fake);
    pair.wait_status(ALPHA, "losing the fake beta", |s| !s.connected());
    let runs = pair.out_of_sync_runs(ALPHA);
    assert!(
        runs.iter()
            .any(|&(o, l)| o <= MIB && MIB + 64 * KIB <= o + l),
        "the acknowledged but unflushed write is not out of sync: {runs:?}\n{}",
        pair.log(ALPHA)
    );
    assert!(pair
        .log(ALPHA)
        .contains("had not yet made durable are marked out of sync"));
}

#[test]
fn a_peer_connection_that_cannot_be_taken_now_is_refused_as_busy() {
    // The fake peers answer no pings: with the test pairs' 1.5 s ping
    // timeout, a loaded machine could end the running session (and then
    // the waiting one) before the third connection is refused.
    let mut pair = Pair::builder()
        .only(BETA)
        .replication("ping_timeout_ms", "30000")
        .replication("connect_timeout_ms", "30000")
        .start_unconnected();
    let size = pair.beta().disk_size;
    let addr = pair.beta().repl_addr;
    // A session runs...
    let mut session = FakePeer::connect(addr);
    session.authenticate_as_alpha(size);
    session.start_session_as_fresh_primary();
    assert!(pair.status(BETA).connected());
    // ...a second authenticated connection waits for the link loop (a
    // peer that redialed while beta still holds the old session)...
    let mut waiting = FakePeer::connect(addr);
    waiting.authenticate_as_alpha(size);
    // ...and a third is told why it cannot be served, then closed.
    let mut third = FakePeer::connect(addr);
    third.authenticate_as_alpha(size);
    match third.recv().expect("beta's refusal") {
        Frame::Refuse { code, message } => {
            assert_eq!(code, RefuseCode::Busy, "{message}");
            assert!(message.contains("try again"), "{message}");
        }
        other => panic!("expected Refuse, got {other:?}"),
    }
    assert!(third.until_closed().is_empty());
    // Busy is transient: logged as information, not as an error.
    let line = pair.wait_log_line(BETA, "already being served");
    assert!(line.contains("INFO"), "not an info line: {line}");
    // The running session was not disturbed: a write is still applied.
    session.send(&Frame::Write(WriteFrame::new(
        1,
        MIB,
        0,
        Bytes::from(vec![0x77; 4096]),
    )));
    match session.recv_data() {
        Frame::Ack { seq: 1, status: 0 } => {}
        other => panic!("expected Ack for seq 1, got {other:?}"),
    }
    drop(waiting);
    beta_survives(&mut pair);
}
