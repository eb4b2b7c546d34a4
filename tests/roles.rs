//! Roles, generation identifiers, persistent metadata and `replctl`, end
//! to end: two real `repld` processes on loopback driven with the real
//! `replctl`, real NBD clients (qemu-io, qemu-img, nbdinfo, and the raw
//! test client) and the real metadata files.
//!
//! Every wait is bounded; daemons and `replctl events` watchers are killed
//! by PID on drop, and the temporary directory is removed.

mod common;

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::BytesMut;
use replblk_proto::nbd::{
    info as nbd_info, opt as nbd_opt, rep as nbd_rep, Command as NbdCommand, InfoRequest,
};
use serde_json::Value;

use common::client::{connect_raw, greet, read_option_reply, send_option, Client, OptReply};
use common::pair::{EventWatch, Pair, ALPHA, BETA};
use common::run_tool;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn resource(v: &Value) -> &Value {
    &v["resources"][0]
}

/// `replctl status --json` of node's resource.
fn st(pair: &Pair, node: &str) -> Value {
    resource(&pair.status(node).raw).clone()
}

fn qemu_io(uri: &str, cmd: &str) -> (bool, String, String) {
    run_tool(Command::new("qemu-io").args(["-f", "raw", uri, "-c", cmd]))
}

fn qemu_io_ok(uri: &str, cmd: &str) {
    let (ok, out, err) = qemu_io(uri, cmd);
    assert!(
        ok && !out.contains("fail"),
        "qemu-io {cmd:?} on {uri}: {out}{err}"
    );
}

/// The refusal must name its reason and the command must fail.
fn refused(pair: &Pair, node: &str, args: &[&str], reason: &str) -> String {
    match pair.ctl(node, args) {
        Ok(out) => panic!("replctl {args:?} on {node} succeeded: {out}"),
        Err(e) => {
            assert!(
                e.contains(reason),
                "replctl {args:?} on {node}: {e:?} lacks {reason:?}"
            );
            e
        }
    }
}

fn wait_synced(pair: &Pair) {
    for node in [ALPHA, BETA] {
        pair.ok(node, &["wait-sync", "r0", "--timeout", "20"]);
    }
}

fn log_since(pair: &Pair, node: &str, from: usize) -> String {
    pair.log(node)[from..].to_owned()
}

// ---------------------------------------------------------------------------
// Metadata: create-md, dump-md, missing and corrupt superblocks
// ---------------------------------------------------------------------------

#[test]
fn without_metadata_the_resource_stays_down_with_a_clear_error_until_create_md_and_up() {
    let pair = Pair::builder().fresh().start_unconnected();
    for node in [ALPHA, BETA] {
        let s = st(&pair, node);
        assert_eq!(s["up"], false, "{s}");
        let why = s["down_reason"].as_str().unwrap_or_default();
        assert!(why.contains("no replblk metadata"), "{node}: {s}");
        assert!(why.contains("create-md"), "{node}: {s}");
        assert!(
            pair.log(node).contains("no replblk metadata"),
            "{}",
            pair.log(node)
        );
        // An NBD client is told why.
        let (ok, out, err) =
            run_tool(Command::new("qemu-img").args(["info", &pair.node(node).uri()]));
        assert!(!ok, "{out}");
        assert!(err.contains("is down on node"), "{err}");
        refused(&pair, node, &["up", "r0"], "no replblk metadata");
    }
    // The metadata file was never written: nothing re-initialised it.
    let md = std::fs::read(&pair.alpha().meta).expect("md file");
    assert!(md.iter().all(|&b| b == 0));

    pair.ok(ALPHA, &["create-md", "r0"]);
    refused(&pair, ALPHA, &["create-md", "r0"], "--force");
    let dump = pair.replctl(ALPHA, &["dump-md", "r0"]).expect("dump-md");
    let slots = dump["metadata"]["slots"].as_array().expect("slots").clone();
    assert_eq!(slots.len(), 2, "{dump}");
    for slot in &slots {
        assert_eq!(slot["Ok"]["node"], ALPHA, "{dump}");
        assert_eq!(slot["Ok"]["resource"], "r0", "{dump}");
    }
    pair.ok(ALPHA, &["create-md", "r0", "--force"]);
    pair.ok(ALPHA, &["up", "r0"]);
    refused(&pair, ALPHA, &["create-md", "r0", "--force"], "is up");
    let s = st(&pair, ALPHA);
    assert_eq!(
        (s["up"].clone(), s["role"].clone(), s["disk"].clone()),
        (true.into(), "Secondary".into(), "Inconsistent".into()),
        "{s}"
    );
    let text = pair.ok(ALPHA, &["dump-md", "r0"]);
    assert!(text.contains("slot 0") && text.contains("slot 1"), "{text}");
}

/// The superblock slot `dump-md` reports as active, and its byte offset.
fn active_slot(pair: &Pair, node: &str) -> (usize, u64) {
    let dump = pair.replctl(node, &["dump-md", "r0"]).expect("dump-md");
    let md = &dump["metadata"];
    let active = md["active"].as_u64().expect("an active slot") as usize;
    let start = md["md_start"].as_u64().expect("md_start");
    (active, start + active as u64 * 4096)
}

fn scribble(path: &Path, offset: u64) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open md");
    f.seek(SeekFrom::Start(offset + 100)).expect("seek");
    f.write_all(&[0xee; 64]).expect("scribble");
    f.sync_all().expect("sync");
}

#[test]
fn a_corrupt_superblock_slot_falls_back_to_the_other_and_two_corrupt_slots_refuse_clearly() {
    let mut pair = Pair::start_default();
    let (slot, offset) = active_slot(&pair, BETA);
    pair.stop(BETA);
    scribble(&pair.beta().meta, offset);
    let mark = pair.log(BETA).len();
    pair.start(BETA);
    pair.wait_status(BETA, "up again", |s| s.raw["resources"][0]["up"] == true);
    let log = log_since(&pair, BETA, mark);
    assert!(
        log.contains("slot") && log.contains("WARN"),
        "no warning about the bad slot:\n{log}"
    );
    // The previous version was used (it may name an older generation: the
    // metadata writer writes only the newest of versions queued together),
    // and after the handshake beta is UpToDate on alpha's generation.
    pair.wait_status(BETA, "UpToDate on alpha's generation", |s| {
        s.raw["resources"][0]["disk"] == "UpToDate"
            && s.raw["resources"][0]["generations"]["current"]
                == st(&pair, ALPHA)["generations"]["current"]
    });
    let _ = slot;

    // Now both slots.
    pair.stop(BETA);
    scribble(&pair.beta().meta, 0);
    scribble(&pair.beta().meta, 4096);
    let mark = pair.log(BETA).len();
    pair.start(BETA);
    let s = st(&pair, BETA);
    assert_eq!(s["up"], false, "{s}");
    let why = s["down_reason"].as_str().unwrap_or_default();
    assert!(why.contains("corrupt in both slots"), "{s}");
    assert!(log_since(&pair, BETA, mark).contains("corrupt in both slots"));
    refused(&pair, BETA, &["up", "r0"], "corrupt");
    // Nothing was silently re-initialised.
    let dump = pair.replctl(BETA, &["dump-md", "r0"]).expect("dump-md");
    assert!(dump["metadata"]["active"].is_null(), "{dump}");
}

/// `replctl dump-md --disk D [--meta-disk M]`: the metadata read from the
/// files themselves, no daemon (after a crash, before repld writes to it).
fn dump_md_offline(disk: &Path, meta: Option<&Path>) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_replctl"));
    // No daemon listens there: the offline dump must not need one.
    cmd.args([
        "--socket",
        "/nonexistent/repld.sock",
        "dump-md",
        "r0",
        "--json",
    ]);
    cmd.arg("--disk").arg(disk);
    if let Some(m) = meta {
        cmd.arg("--meta-disk").arg(m);
    }
    run_tool(&mut cmd)
}

#[test]
fn dump_md_reads_the_files_without_a_daemon_and_shows_torn_slots() {
    let mut pair = Pair::start_default();
    pair.stop(BETA);
    let (disk, meta) = (pair.beta().disk.clone(), pair.beta().meta.clone());
    let (ok, out, err) = dump_md_offline(&disk, Some(&meta));
    assert!(ok, "{out}{err}");
    let dump: Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(dump["ok"], true, "{dump}");
    assert_eq!(dump["resource"], "r0", "{dump}");
    let md = &dump["metadata"];
    let active = md["active"].as_u64().expect("an active slot");
    for slot in md["slots"].as_array().expect("slots") {
        assert_eq!(slot["Ok"]["node"], BETA, "{dump}");
    }
    // The clean shutdown is what the newest slot says.
    let flags = md["slots"][active as usize]["Ok"]["flags"]
        .as_u64()
        .expect("flags");
    assert_ne!(
        flags & u64::from(replblk::core::flags::CLEAN_SHUTDOWN),
        0,
        "{dump}"
    );

    // The newest slot torn: shown with its reason, the other one active.
    scribble(&meta, active * 4096);
    let (ok, out, err) = dump_md_offline(&disk, Some(&meta));
    assert!(ok, "{out}{err}");
    let dump: Value = serde_json::from_str(out.trim()).expect("JSON");
    let md = &dump["metadata"];
    assert!(md["slots"][active as usize]["Err"].is_string(), "{dump}");
    assert_eq!(md["active"], 1 - active, "{dump}");
    // Both torn: still a dump (no active slot), nothing written.
    scribble(&meta, (1 - active) * 4096);
    let before = std::fs::read(&meta).expect("md");
    let (ok, out, err) = dump_md_offline(&disk, Some(&meta));
    assert!(ok, "{out}{err}");
    let dump: Value = serde_json::from_str(out.trim()).expect("JSON");
    assert!(dump["metadata"]["active"].is_null(), "{dump}");
    assert_eq!(std::fs::read(&meta).expect("md"), before);
    // Without --meta-disk the disk is read for internal metadata: there
    // is none at the end of beta's data file, and the dump says why.
    let (ok, out, err) = dump_md_offline(&disk, None);
    assert!(ok, "{out}{err}");
    let dump: Value = serde_json::from_str(out.trim()).expect("JSON");
    assert!(dump["metadata"]["active"].is_null(), "{dump}");
    assert_eq!(
        dump["metadata"]["slots"][0]["Err"], "bad magic (no superblock)",
        "{dump}"
    );
    // A file that is not there: a clear error.
    let (ok, out, err) = dump_md_offline(&disk.with_extension("missing"), None);
    assert!(!ok, "{out}");
    assert!(err.contains("No such file"), "{err}");
}

// ---------------------------------------------------------------------------
// Role rules
// ---------------------------------------------------------------------------

#[test]
fn a_secondary_refuses_nbd_clients_and_the_client_is_told_why() {
    let pair = Pair::start_default();
    let uri = pair.beta().uri();
    let (ok, out, err) = run_tool(Command::new("qemu-img").args(["info", &uri]));
    assert!(!ok, "qemu-img opened the Secondary: {out}");
    assert!(err.contains("r0 is Secondary on node beta"), "{err}");
    assert!(err.contains("connect to the Primary, alpha"), "{err}");
    // libnbd's tools do not print an error reply's text (only with
    // LIBNBD_DEBUG=1), but `nbdinfo --list` shows the reason as the
    // export's description, and a plain nbdinfo fails.
    let (ok, _, err) = run_tool(Command::new("nbdinfo").arg(&uri));
    assert!(!ok && err.contains("opt_go"), "{err}");
    let (_, _, debug) = run_tool(Command::new("nbdinfo").arg(&uri).env("LIBNBD_DEBUG", "1"));
    assert!(debug.contains("r0 is Secondary on node beta"), "{debug}");
    let list_uri = format!("nbd://{}", pair.beta().nbd_addr());
    let (ok, out, err) = run_tool(Command::new("nbdinfo").args(["--list", &list_uri]));
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("description: REFUSING CLIENTS: resource r0 is Secondary on node beta"),
        "{out}"
    );
    // The Primary serves.
    let (ok, out, err) = run_tool(Command::new("nbdinfo").arg(pair.primary_uri()));
    assert!(ok, "{out}{err}");
}

#[test]
fn promote_is_refused_while_the_peer_is_primary_even_with_force() {
    let pair = Pair::start_default();
    refused(
        &pair,
        BETA,
        &["promote", "r0"],
        "promote refused: peer is Primary",
    );
    refused(
        &pair,
        BETA,
        &["promote", "r0", "--force"],
        "peer is Primary",
    );
    assert_eq!(st(&pair, BETA)["role"], "Secondary");
    assert_eq!(st(&pair, ALPHA)["role"], "Primary");
}

#[test]
fn promote_without_uptodate_data_is_refused_and_force_is_logged_loudly() {
    let pair = Pair::builder().only(ALPHA).fresh().start_unconnected();
    pair.ok(ALPHA, &["create-md", "r0"]);
    pair.ok(ALPHA, &["up", "r0"]);
    let e = refused(&pair, ALPHA, &["promote", "r0"], "promote refused");
    assert!(e.contains("Inconsistent") && e.contains("--force"), "{e}");
    let before = st(&pair, ALPHA)["generations"]["current"].clone();
    pair.ok(ALPHA, &["promote", "r0", "--force"]);
    let s = st(&pair, ALPHA);
    assert_eq!(
        (s["role"].clone(), s["disk"].clone()),
        ("Primary".into(), "UpToDate".into()),
        "{s}"
    );
    assert_ne!(
        s["generations"]["current"], before,
        "no new current UUID: {s}"
    );
    let log = pair.log(ALPHA);
    assert!(
        log.lines()
            .any(|l| (l.contains("WARN") || l.contains("ERROR"))
                && l.to_lowercase().contains("forced")),
        "the forced promote was not logged loudly:\n{log}"
    );
}

#[test]
fn demote_is_refused_while_clients_are_attached_and_force_disconnects_them() {
    let pair = Pair::start_default();
    let mut client = Client::connect(&pair.primary_addr(), "r0");
    assert_eq!(client.write(0, &[7; 4096]), 0);
    let e = refused(&pair, ALPHA, &["demote", "r0"], "demote refused");
    assert!(e.contains("1 NBD client"), "{e}");
    assert_eq!(
        client.write(4096, &[8; 4096]),
        0,
        "the refused demote disturbed the client"
    );
    pair.ok(ALPHA, &["demote", "r0", "--force"]);
    assert_eq!(st(&pair, ALPHA)["role"], "Secondary");
    // The client's connection was closed.
    let mut buf = [0u8; 1];
    client
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let n = client.stream.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the client is still connected");
    // Both writes acknowledged before the demote are on both nodes.
    pair.ok(BETA, &["promote", "r0"]);
    let mut c = Client::connect(&pair.beta().nbd_addr(), "r0");
    assert_eq!(
        c.read(0, 8192).expect("read"),
        [[7u8; 4096], [8u8; 4096]].concat()
    );
}

/// Sends NBD_OPT_GO for `r0` asking for the export's description and does
/// not read the reply. The pair's description is made larger than the
/// socket buffers, so the server, having admitted the client, stays
/// blocked sending that reply: the client is held between its admission
/// and the end of its handshake until the test reads.
fn go_and_stall(addr: &str) -> TcpStream {
    let mut s = connect_raw(addr);
    greet(&mut s);
    let mut data = BytesMut::new();
    InfoRequest {
        name: "r0".into(),
        requests: vec![nbd_info::DESCRIPTION],
    }
    .encode(&mut data);
    send_option(&mut s, nbd_opt::GO, &data);
    // The reply starts arriving once the server has admitted the client.
    let mut first = [0u8; 1];
    s.peek(&mut first).expect("the GO reply starts");
    s
}

/// Reads the replies to an NBD_OPT_GO up to the final one.
fn go_replies(s: &mut TcpStream) -> Vec<OptReply> {
    let mut replies = Vec::new();
    loop {
        let r = read_option_reply(s);
        let last = r.header.reply_type != nbd_rep::INFO;
        replies.push(r);
        if last {
            return replies;
        }
    }
}

/// Larger than loopback's socket buffers (4 MiB send, 128 KiB initial
/// receive) together.
const HUGE_DESCRIPTION: usize = 8 << 20;

#[test]
fn demote_counts_a_client_admitted_but_still_in_its_handshake() {
    let pair = Pair::builder()
        .description(&"d".repeat(HUGE_DESCRIPTION))
        .start();
    let mut s = go_and_stall(&pair.primary_addr());
    let e = refused(&pair, ALPHA, &["demote", "r0"], "demote refused");
    assert!(e.contains("1 NBD client"), "{e}");
    // The client finishes its handshake and is served by the Primary.
    let replies = go_replies(&mut s);
    let mut client = Client::after_go(s, &replies);
    assert_eq!(client.write(0, &[5; 4096]), 0);
    assert_eq!(st(&pair, ALPHA)["role"], "Primary");
}

#[test]
fn demote_force_closes_a_client_admitted_but_still_in_its_handshake() {
    let pair = Pair::builder()
        .description(&"d".repeat(HUGE_DESCRIPTION))
        .start();
    let mut s = go_and_stall(&pair.primary_addr());
    pair.ok(ALPHA, &["demote", "r0", "--force"]);
    assert_eq!(st(&pair, ALPHA)["role"], "Secondary");
    // Its connection was closed: what was sent can be read, then the
    // stream ends instead of entering transmission with a Secondary.
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the client is still connected to the Secondary ({e})"),
    }
    assert!(
        rest.len() < HUGE_DESCRIPTION,
        "the whole reply arrived: the client was not closed"
    );
}

/// SIGCONT for a process stopped by the test, also when the test fails.
struct Stopped(u32);

impl Stopped {
    /// SIGSTOP, then waits (bounded) until every thread is stopped: the
    /// signal is delivered asynchronously.
    fn stop(pid: u32) -> Stopped {
        // SAFETY: kill(2) on the PID of a repld the pair started.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let stopped = Stopped(pid);
        let all_stopped = || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|tasks| {
                    tasks.flatten().all(|t| {
                        std::fs::read_to_string(t.path().join("stat"))
                            .ok()
                            .and_then(|st| st.rsplit_once(") ").map(|(_, r)| r.starts_with('T')))
                            .unwrap_or(true)
                    })
                })
                .unwrap_or(false)
        };
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !all_stopped() {
            assert!(std::time::Instant::now() < until, "{pid} did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
        stopped
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

#[test]
fn demote_is_refused_and_stays_primary_while_requests_are_still_in_flight() {
    let pair = Pair::builder()
        .replication("ping_timeout_ms", "60000")
        .replication("ack_timeout_ms", "60000")
        .start();
    let mut client = Client::connect(&pair.primary_addr(), "r0");
    // beta stops: alpha's write waits for its acknowledgement.
    let beta = Stopped::stop(pair.beta().pid().expect("beta runs"));
    client.send(NbdCommand::Write, 0, 0, 4096, &[9; 4096]);
    std::thread::sleep(Duration::from_secs(1));
    let e = refused(
        &pair,
        ALPHA,
        &["demote", "r0", "--force", "--timeout", "2"],
        "demote refused: 1 request(s) still in flight after 2s",
    );
    assert!(e.contains("stays Primary"), "{e}");
    assert_eq!(st(&pair, ALPHA)["role"], "Primary");
    // It still serves: a new client is admitted and can read.
    let mut reader = Client::connect(&pair.primary_addr(), "r0");
    assert!(reader.read(0, 4096).is_ok());
    drop(reader);
    // Once beta answers, the write completes and the demote goes through.
    drop(beta);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match pair.ctl(ALPHA, &["demote", "r0"]) {
            Ok(_) => break,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "demote still refused: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(st(&pair, ALPHA)["role"], "Secondary");
    let b = std::fs::read(&pair.beta().disk).expect("beta disk");
    assert!(
        b[..4096].iter().all(|&x| x == 9),
        "the write was not replicated"
    );
}

/// At depth 1 the worker that read a write (or a flush) waits for the
/// peer's answer itself and then reads the client's next request; while
/// the answer is missing, a request the client sends meanwhile is read
/// and answered all the same.
fn a_lone_request_waiting_for_the_peer_does_not_hold_back_the_next_one(flush: bool) {
    let pair = Pair::builder()
        .replication("ping_timeout_ms", "60000")
        .replication("ack_timeout_ms", "60000")
        .start();
    let mut client = Client::connect(&pair.primary_addr(), "r0");
    client
        .stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // Warm up: the depth-1 path is taken once the link is established.
    assert_eq!(client.write(MIB, &[1; 4096]), 0);
    assert_eq!(client.write(0, &[7; 4096]), 0);
    let beta = Stopped::stop(pair.beta().pid().expect("beta runs"));
    let waiting = match flush {
        true => client.send(NbdCommand::Flush, 0, 0, 0, &[]),
        false => client.send(NbdCommand::Write, 0, 0, 4096, &[8; 4096]),
    };
    // Long enough for it to be waiting for the peer.
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let read = client.send(NbdCommand::Read, 0, MIB, 4096, &[]);
    let reply = client.recv();
    assert_eq!(
        reply.cookie, read,
        "the read was not answered before the request waiting for the peer"
    );
    assert_eq!(reply.error, 0);
    assert_eq!(client.recv_data(4096), vec![1; 4096]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the read waited {:?}",
        started.elapsed()
    );
    // Once beta answers, the request completes.
    drop(beta);
    let reply = client.recv();
    assert_eq!((reply.cookie, reply.error), (waiting, 0));
    let expect = if flush { 7 } else { 8 };
    assert_eq!(client.read(0, 4096).expect("read"), vec![expect; 4096]);
    assert_eq!(client.flush(), 0);
    client.disconnect();
    let b = std::fs::read(&pair.beta().disk).expect("beta disk");
    assert!(
        b[..4096].iter().all(|&x| x == expect),
        "the write was not replicated"
    );
}

#[test]
fn a_lone_write_waiting_for_its_ack_does_not_hold_back_the_next_request() {
    a_lone_request_waiting_for_the_peer_does_not_hold_back_the_next_one(false);
}

#[test]
fn a_lone_flush_waiting_for_the_peer_does_not_hold_back_the_next_request() {
    a_lone_request_waiting_for_the_peer_does_not_hold_back_the_next_one(true);
}

#[test]
fn switchover_moves_the_primary_and_the_client_finds_its_data_on_the_new_primary() {
    let pair = Pair::start_default();
    let mut watch = EventWatch::start(&pair, BETA);
    qemu_io_ok(&pair.primary_uri(), "write -P 0xa1 0 1M");
    qemu_io_ok(&pair.primary_uri(), "write -P 0xa2 7M 64k");
    pair.ok(ALPHA, &["demote", "r0"]);
    watch.wait_for("beta seeing alpha demoted", |e| {
        e["peer_role"] == "Secondary"
    });
    pair.ok(BETA, &["promote", "r0"]);
    watch.wait_for("beta Primary", |e| e["role"] == "Primary");
    let uri = pair.beta().uri();
    qemu_io_ok(&uri, "read -P 0xa1 0 1M");
    qemu_io_ok(&uri, "read -P 0xa2 7M 64k");
    // New writes on the new Primary replicate back to alpha.
    qemu_io_ok(&uri, "write -P 0xb3 2M 128k");
    let (ok, _, err) = run_tool(Command::new("qemu-img").args(["info", &pair.primary_uri()]));
    assert!(!ok && err.contains("Secondary on node alpha"), "{err}");
    let a = std::fs::read(&pair.alpha().disk).expect("alpha disk");
    assert!(a[2 * MIB as usize..(2 * MIB + 128 * KIB) as usize]
        .iter()
        .all(|&x| x == 0xb3));
    let s = st(&pair, ALPHA);
    assert_eq!(
        (
            s["role"].clone(),
            s["peer_role"].clone(),
            s["connection"].clone()
        ),
        ("Secondary".into(), "Primary".into(), "Connected".into()),
        "{s}"
    );
    wait_synced(&pair);
}

// ---------------------------------------------------------------------------
// Restarts
// ---------------------------------------------------------------------------

#[test]
fn a_primary_that_restarts_comes_back_secondary_with_its_data_and_generation() {
    let mut pair = Pair::start_default();
    qemu_io_ok(&pair.primary_uri(), "write -P 0x5c 1M 256k");
    let gen = st(&pair, ALPHA)["generations"]["current"].clone();
    pair.restart(ALPHA);
    let s = pair
        .wait_status(ALPHA, "connected again", |s| s.connected())
        .raw;
    let s = resource(&s);
    assert_eq!(s["role"], "Secondary", "{s}");
    assert_eq!(s["generations"]["current"], gen, "{s}");
    wait_synced(&pair);
    let s = st(&pair, ALPHA);
    assert_eq!(s["decision"]["decision"], "no-sync", "{s}");
    // Nobody is Primary now; alpha can be promoted again without force.
    pair.ok(ALPHA, &["promote", "r0"]);
    qemu_io_ok(&pair.primary_uri(), "read -P 0x5c 1M 256k");
}

#[test]
fn a_secondary_that_restarts_comes_back_secondary_and_in_sync() {
    let mut pair = Pair::start_default();
    qemu_io_ok(&pair.primary_uri(), "write -P 0x77 0 64k");
    pair.restart(BETA);
    pair.wait_connected();
    wait_synced(&pair);
    let b = st(&pair, BETA);
    assert_eq!(
        (b["role"].clone(), b["disk"].clone(), b["peer_role"].clone()),
        ("Secondary".into(), "UpToDate".into(), "Primary".into()),
        "{b}"
    );
    // The Primary lost its peer, so it started a new generation (as DRBD
    // does): beta is the target of a bitmap sync of nothing (rule 50).
    assert_eq!(b["decision"]["rule_number"], 50, "{b}");
    assert_eq!(b["out_of_sync_bytes"], 0, "{b}");
    qemu_io_ok(&pair.primary_uri(), "write -P 0x78 64k 64k");
    let d = std::fs::read(&pair.beta().disk).expect("beta disk");
    assert!(d[..64 * KIB as usize].iter().all(|&x| x == 0x77));
    assert!(d[64 * KIB as usize..128 * KIB as usize]
        .iter()
        .all(|&x| x == 0x78));
}

#[test]
fn both_nodes_restarted_come_back_secondary_consistent_and_then_uptodate_together() {
    let mut pair = Pair::start_default();
    qemu_io_ok(&pair.primary_uri(), "write -P 0x31 0 1M");
    pair.stop(ALPHA);
    pair.stop(BETA);
    pair.start(BETA);
    // Alone, beta cannot know it is UpToDate.
    let s = st(&pair, BETA);
    assert_eq!(
        (s["role"].clone(), s["disk"].clone()),
        ("Secondary".into(), "Consistent".into()),
        "{s}"
    );
    refused(&pair, BETA, &["promote", "r0"], "not UpToDate");
    pair.start(ALPHA);
    pair.wait_connected();
    wait_synced(&pair);
    pair.ok(BETA, &["promote", "r0"]);
    qemu_io_ok(&pair.beta().uri(), "read -P 0x31 0 1M");
}

#[test]
fn a_primary_written_to_while_its_peer_is_away_is_the_bitmap_sync_source_on_reconnect() {
    let mut pair = Pair::start_default();
    pair.stop(BETA);
    pair.wait_status(ALPHA, "losing beta", |s| !s.connected());
    qemu_io_ok(&pair.primary_uri(), "write -P 0x42 3M 64k");
    let a = st(&pair, ALPHA);
    assert_eq!(a["out_of_sync_bytes"], 64 * KIB, "{a}");
    pair.start(BETA);
    pair.wait_connected();
    let a = st(&pair, ALPHA);
    let b = st(&pair, BETA);
    assert_eq!(
        a["decision"]["decision"]["sync-source"]["full"], false,
        "{a}"
    );
    assert_eq!(
        b["decision"]["decision"]["sync-target"]["full"], false,
        "{b}"
    );
    // The same DRBD rule, seen from each side: 70 ("the peer's current
    // generation is my bitmap generation") and its mirror 50.
    assert_eq!(a["decision"]["rule_number"], 70, "{a}");
    assert_eq!(b["decision"]["rule_number"], 50, "{b}");
    // The 16 blocks written meanwhile are resynced, and then both are
    // UpToDate with nothing out of sync.
    wait_synced(&pair);
    assert_eq!(st(&pair, ALPHA)["out_of_sync_bytes"], 0);
    let d = std::fs::read(&pair.beta().disk).expect("beta disk");
    assert!(d[3 * MIB as usize..(3 * MIB + 64 * KIB) as usize]
        .iter()
        .all(|&x| x == 0x42));
    let text = pair.ok(ALPHA, &["status", "r0"]);
    assert!(
        text.contains("last decision") && text.contains("rule"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------
// Split brain, connect/disconnect, events
// ---------------------------------------------------------------------------

#[test]
fn split_brain_is_detected_on_both_sides_and_both_stay_standalone_with_their_data() {
    let pair = Pair::start_default();
    let mut watch = EventWatch::start(&pair, ALPHA);
    pair.ok(ALPHA, &["disconnect", "r0"]);
    watch.wait_for("alpha StandAlone", |e| e["connection"] == "StandAlone");
    pair.wait_status(BETA, "losing alpha", |s| !s.connected());
    pair.ok(BETA, &["disconnect", "r0"]);
    pair.ok(BETA, &["promote", "r0"]);
    qemu_io_ok(&pair.primary_uri(), "write -P 0xaa 0 64k");
    qemu_io_ok(&pair.beta().uri(), "write -P 0xbb 0 64k");
    pair.ok(ALPHA, &["connect", "r0"]);
    pair.ok(BETA, &["connect", "r0"]);
    let e = watch.wait_for("split brain", |e| {
        e["decision"]["decision"] == "split-brain" && e["connection"] == "StandAlone"
    });
    assert!(
        e["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase()
            .contains("split"),
        "{e}"
    );
    let b = pair
        .wait_status(BETA, "StandAlone", |s| s.connection == "StandAlone")
        .raw;
    assert_eq!(resource(&b)["decision"]["decision"], "split-brain", "{b}");
    for node in [ALPHA, BETA] {
        let s = st(&pair, node);
        assert_eq!(s["role"], "Primary", "{s}");
        refused(
            &pair,
            node,
            &["wait-sync", "r0", "--timeout", "1"],
            "StandAlone",
        );
    }
    qemu_io_ok(&pair.primary_uri(), "read -P 0xaa 0 64k");
    qemu_io_ok(&pair.beta().uri(), "read -P 0xbb 0 64k");
    // Manual resolution: beta gives up its changes.
    pair.ok(BETA, &["demote", "r0"]);
    pair.ok(BETA, &["connect", "r0", "--discard-my-data"]);
    pair.ok(ALPHA, &["connect", "r0"]);
    let b = pair.wait_status(BETA, "reconnected", |s| s.connected()).raw;
    assert_eq!(
        resource(&b)["decision"]["decision"]["sync-target"]["full"],
        false,
        "{b}"
    );
}

#[test]
fn events_streams_one_line_per_change_and_status_json_matches() {
    let pair = Pair::start_default();
    let mut watch = EventWatch::start(&pair, ALPHA);
    let first = watch.wait_for("the exists line", |e| e["type"] == "exists");
    assert_eq!(
        (first["name"].clone(), first["role"].clone()),
        ("r0".into(), "Primary".into()),
        "{first}"
    );
    pair.ok(ALPHA, &["disconnect", "r0"]);
    let e = watch.wait_for("StandAlone", |e| e["connection"] == "StandAlone");
    assert_eq!(e["type"], "change");
    pair.ok(ALPHA, &["connect", "r0"]);
    watch.wait_for("Connected again", |e| e["connection"] == "Connected");
    // The text form, one line per change.
    let (ok, out, _) = run_tool(
        Command::new("timeout")
            .args(["3", env!("CARGO_BIN_EXE_replctl"), "--socket"])
            .arg(&pair.alpha().ctl)
            .arg("events"),
    );
    assert!(!ok, "events should run until killed");
    assert!(
        out.starts_with("exists r0 role:Primary disk:UpToDate connection:Connected"),
        "{out}"
    );
    // status --json carries every documented field.
    let s = st(&pair, ALPHA);
    for key in [
        "name",
        "node",
        "up",
        "role",
        "disk",
        "size",
        "connection",
        "replication",
        "peer",
        "peer_role",
        "peer_disk",
        "out_of_sync_bytes",
        "out_of_sync_blocks",
        "bitmap_granularity",
        "decision",
        "generations",
        "last_error",
        "ping_rtt_us",
    ] {
        assert!(s.get(key).is_some(), "status lacks {key}: {s}");
    }
    assert_eq!(
        (s["replication"].clone(), s["peer_disk"].clone()),
        ("Established".into(), "UpToDate".into()),
        "{s}"
    );
    let text = pair.ok(ALPHA, &["status"]);
    assert!(text.starts_with("r0 role:Primary"), "{text}");
    assert!(
        text.contains("beta connection:Connected role:Secondary"),
        "{text}"
    );
    assert!(text.contains("peer-disk:UpToDate"), "{text}");
}

// ---------------------------------------------------------------------------
// The control socket
// ---------------------------------------------------------------------------

#[test]
fn the_control_socket_is_root_only_and_malformed_requests_get_an_error() {
    let pair = Pair::start_default();
    let ctl = &pair.alpha().ctl;
    let mode = std::fs::metadata(ctl).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");
    for bad in [
        "garbage\n",
        "{\"verb\":\"promote\"}\n",
        "{\"verb\":\"launch-missiles\",\"resource\":\"r0\"}\n",
        "{\"verb\":\"promote\",\"resource\":\"nope\"}\n",
        "{\"verb\":\"status\",\"extra\":1}\n",
        "\n",
    ] {
        let mut conn = UnixStream::connect(ctl).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        conn.write_all(bad.as_bytes()).expect("send");
        let mut line = String::new();
        BufReader::new(conn).read_line(&mut line).expect("answer");
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{bad:?}: {e}: {line}"));
        assert_eq!(v["ok"], false, "{bad:?}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    // A client that connects and says nothing does not block others.
    let _idle = UnixStream::connect(ctl).expect("connect");
    assert_eq!(st(&pair, ALPHA)["role"], "Primary");
    pair.assert_no_panic();
}

#[test]
fn internal_metadata_shrinks_the_export_and_survives_writes_to_the_last_block() {
    let mut pair = Pair::builder().internal_meta().start();
    let size = st(&pair, ALPHA)["size"].as_u64().expect("size");
    let disk = pair.alpha().disk_size;
    assert!(
        size < disk && size + 4 * MIB > disk,
        "size {size} of a {disk}-byte disk"
    );
    let (ok, out, err) = run_tool(Command::new("nbdinfo").args(["--size", &pair.primary_uri()]));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), size.to_string());
    let last = format!("write -P 0x99 {} 4k", size - 4096);
    qemu_io_ok(&pair.primary_uri(), &last);
    let (ok, out, _) = qemu_io(&pair.primary_uri(), &format!("write -P 0x99 {size} 4k"));
    assert!(
        !ok || out.contains("fail") || out.contains("error"),
        "a write past the end succeeded: {out}"
    );
    pair.restart(ALPHA);
    pair.wait_connected();
    wait_synced(&pair);
    pair.ok(ALPHA, &["promote", "r0"]);
    qemu_io_ok(
        &pair.primary_uri(),
        &format!("read -P 0x99 {} 4k", size - 4096),
    );
}

#[test]
fn a_killed_primary_comes_back_secondary_and_the_copies_converge() {
    let mut pair = Pair::start_default();
    qemu_io_ok(&pair.primary_uri(), "write -P 0x61 0 2M");
    pair.kill(ALPHA);
    pair.start(ALPHA);
    let s = st(&pair, ALPHA);
    assert_eq!(s["role"], "Secondary", "{s}");
    pair.wait_connected();
    wait_synced(&pair);
    let a = st(&pair, ALPHA);
    assert_eq!(a["decision"]["rule"], "crashed-primary-local", "{a}");
    assert_eq!(a["out_of_sync_bytes"], 0, "{a}");
    pair.ok(ALPHA, &["promote", "r0"]);
    qemu_io_ok(&pair.primary_uri(), "read -P 0x61 0 2M");
}

#[test]
fn failover_after_the_primary_dies_and_the_old_primary_resyncs_from_the_new_one() {
    let mut pair = Pair::start_default();
    qemu_io_ok(&pair.primary_uri(), "write -P 0x11 0 1M");
    pair.kill(ALPHA);
    pair.wait_status(BETA, "losing alpha", |s| !s.connected());
    // beta was UpToDate when it lost its Primary: it may take over.
    pair.ok(BETA, &["promote", "r0"]);
    let uri = pair.beta().uri();
    qemu_io_ok(&uri, "read -P 0x11 0 1M");
    qemu_io_ok(&uri, "write -P 0x22 512k 1M");
    pair.start(ALPHA);
    pair.wait_connected();
    wait_synced(&pair);
    let a = st(&pair, ALPHA);
    assert_eq!(a["role"], "Secondary", "{a}");
    assert!(
        a["decision"]["decision"].get("sync-target").is_some(),
        "{a}"
    );
    pair.ok(BETA, &["demote", "r0"]);
    pair.ok(ALPHA, &["promote", "r0"]);
    qemu_io_ok(&pair.primary_uri(), "read -P 0x11 0 512k");
    qemu_io_ok(&pair.primary_uri(), "read -P 0x22 512k 1M");
    let a = std::fs::read(&pair.alpha().disk).expect("alpha disk");
    let b = std::fs::read(&pair.beta().disk).expect("beta disk");
    assert!(a == b, "the copies differ after the resync");
}

#[test]
fn down_is_refused_on_the_primary_and_down_then_up_on_the_secondary_resumes_in_sync() {
    let pair = Pair::start_default();
    refused(&pair, ALPHA, &["down", "r0"], "down refused: r0 is Primary");
    pair.ok(BETA, &["down", "r0"]);
    let b = st(&pair, BETA);
    assert_eq!(
        (b["up"].clone(), b["disk"].clone()),
        (false.into(), "Diskless".into()),
        "{b}"
    );
    refused(&pair, BETA, &["promote", "r0"], "is down");
    // The metadata was written as a clean shutdown.
    let dump = pair.replctl(BETA, &["dump-md", "r0"]).expect("dump-md");
    let active = dump["metadata"]["active"].as_u64().expect("active slot") as usize;
    let flags = dump["metadata"]["slots"][active]["Ok"]["flags"]
        .as_u64()
        .expect("flags");
    assert_ne!(flags & 16, 0, "CLEAN_SHUTDOWN not set: {dump}");
    qemu_io_ok(&pair.primary_uri(), "write -P 0x4d 5M 64k");
    pair.ok(BETA, &["up", "r0"]);
    pair.wait_connected();
    wait_synced(&pair);
    let d = std::fs::read(&pair.beta().disk).expect("beta disk");
    assert!(d[5 * MIB as usize..(5 * MIB + 64 * KIB) as usize]
        .iter()
        .all(|&x| x == 0x4d));
}

#[test]
fn two_simultaneous_promotes_never_leave_two_primaries() {
    let pair = Pair::start_default();
    pair.ok(ALPHA, &["demote", "r0"]);
    pair.wait_status(BETA, "seeing alpha Secondary", |s| {
        s.raw["resources"][0]["peer_role"] == "Secondary"
    });
    let ctl = env!("CARGO_BIN_EXE_replctl");
    let mut backed_off = 0;
    for round in 0..5 {
        let spawn = |node: &str| {
            Command::new(ctl)
                .arg("--socket")
                .arg(&pair.node(node).ctl)
                .args(["promote", "r0"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("replctl")
        };
        let (a, b) = (spawn(ALPHA), spawn(BETA));
        let a = a.wait_with_output().expect("alpha promote");
        let b = b.wait_with_output().expect("beta promote");
        let primaries: Vec<&str> = [ALPHA, BETA]
            .into_iter()
            .filter(|n| st(&pair, n)["role"] == "Primary")
            .collect();
        assert!(
            primaries.len() <= 1,
            "round {round}: both Primary (alpha: {a:?}, beta: {b:?})"
        );
        // A refused promote says why; a promote that said yes made its
        // node the Primary.
        for (node, out) in [(ALPHA, &a), (BETA, &b)] {
            if out.status.success() {
                assert_eq!(primaries, [node], "round {round}: {node} said promoted");
            } else {
                let e = String::from_utf8_lossy(&out.stderr);
                assert!(e.contains("promote refused"), "{node}: {e}");
            }
        }
        pair.wait_connected();
        if primaries.is_empty() {
            // Both backed off: the refusal is not sticky, a lone promote
            // goes through.
            pair.wait_status(BETA, "seeing alpha Secondary", |s| {
                s.raw["resources"][0]["peer_role"] == "Secondary"
            });
            pair.ok(ALPHA, &["promote", "r0"]);
            pair.ok(ALPHA, &["demote", "r0"]);
            backed_off += 1;
        }
        for n in primaries {
            pair.ok(n, &["demote", "r0"]);
        }
        for node in [ALPHA, BETA] {
            pair.wait_status(node, "both Secondary again", |s| {
                s.role == "Secondary" && s.raw["resources"][0]["peer_role"] == "Secondary"
            });
        }
    }
    eprintln!("simultaneous promotes: both backed off in {backed_off} of 5 rounds");
    pair.assert_no_panic();
}

#[test]
fn a_secondary_can_be_the_sync_source() {
    let mut pair = Pair::start_default();
    pair.stop(BETA);
    pair.wait_status(ALPHA, "losing beta", |s| !s.connected());
    qemu_io_ok(&pair.primary_uri(), "write -P 0x5e 9M 192k");
    pair.ok(ALPHA, &["demote", "r0"]);
    pair.start(BETA);
    pair.wait_connected();
    wait_synced(&pair);
    let a = st(&pair, ALPHA);
    assert_eq!(
        (a["role"].clone(), a["decision"]["rule_number"].clone()),
        ("Secondary".into(), 70.into()),
        "{a}"
    );
    pair.ok(BETA, &["promote", "r0"]);
    qemu_io_ok(&pair.beta().uri(), "read -P 0x5e 9M 192k");
}
