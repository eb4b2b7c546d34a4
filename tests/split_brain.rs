//! Split brain, end to end with two real `repld` processes on loopback:
//! the manual resolution (`connect --discard-my-data`) moves only the
//! blocks either side changed (the union of both bitmaps, exchanged at
//! connect), and each automatic policy (`after_sb_0pri`,
//! `after_sb_1pri`) picks the victim DRBD's would, logs the numbers it
//! decided on and shows them in `status`. A fake peer's hostile bitmap
//! gets a clear error and leaves the daemon running.
//!
//! Every wait is bounded; daemons are killed by PID on drop and the
//! temporary directory is removed.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use bytes::BytesMut;
use replblk_proto::repl::{
    self, auth_mac, BitmapChunk, Frame, FrameHeader, Hello, StateFrame, CHALLENGE_LEN,
};
use serde_json::Value;

use common::pair::{Pair, ALPHA, BETA};
use common::run_tool;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn st(pair: &Pair, node: &str) -> Value {
    pair.status(node).raw["resources"][0].clone()
}

fn qemu_io_ok(uri: &str, cmd: &str) {
    let (ok, out, err) = run_tool(Command::new("qemu-io").args(["-f", "raw", uri, "-c", cmd]));
    assert!(
        ok && !out.contains("fail"),
        "qemu-io {cmd:?} on {uri}: {out}{err}"
    );
}

fn wait_synced(pair: &Pair) {
    for node in [ALPHA, BETA] {
        pair.ok(node, &["wait-sync", "r0", "--timeout", "20"]);
    }
}

fn disk(pair: &Pair, node: &str) -> Vec<u8> {
    std::fs::read(&pair.node(node).disk).expect("backing file")
}

fn range(d: &[u8], off: u64, len: u64) -> &[u8] {
    &d[off as usize..(off + len) as usize]
}

/// Both nodes cut apart, each promoted and written to on its own:
/// alpha writes `alpha_len` bytes of 0xaa at 0, beta `beta_len` bytes
/// of 0xbb at 8 MiB (0: no write). Then the nodes are demoted as asked
/// (`primary` names the node left Primary, if any) and reconnected.
fn split(pair: &Pair, alpha_len: u64, beta_len: u64, primary: Option<&str>) {
    pair.ok(ALPHA, &["disconnect", "r0"]);
    pair.wait_status(BETA, "losing alpha", |s| !s.connected());
    pair.ok(BETA, &["disconnect", "r0"]);
    // Alpha, if still Primary, was Primary when the link went; beta is
    // promoted apart.
    pair.ok(ALPHA, &["promote", "r0"]);
    pair.ok(BETA, &["promote", "r0"]);
    if alpha_len > 0 {
        qemu_io_ok(&pair.alpha().uri(), &format!("write -P 0xaa 0 {alpha_len}"));
    }
    if beta_len > 0 {
        qemu_io_ok(
            &pair.beta().uri(),
            &format!("write -P 0xbb {} {beta_len}", 8 * MIB),
        );
    }
    for node in [ALPHA, BETA] {
        if primary != Some(node) {
            pair.ok(node, &["demote", "r0"]);
        }
    }
}

fn connect_both(pair: &Pair) {
    pair.ok(ALPHA, &["connect", "r0"]);
    pair.ok(BETA, &["connect", "r0"]);
}

/// Waits until the policy's decision shows, then until both are in sync;
/// returns alpha's and beta's `split_brain` status objects.
fn resolved(pair: &Pair) -> (Value, Value) {
    for node in [ALPHA, BETA] {
        pair.wait_status(node, "a split-brain decision", |s| {
            !s.raw["resources"][0]["split_brain"].is_null()
        });
    }
    wait_synced(pair);
    (
        st(pair, ALPHA)["split_brain"].clone(),
        st(pair, BETA)["split_brain"].clone(),
    )
}

fn assert_identical(pair: &Pair) {
    let (a, b) = (disk(pair, ALPHA), disk(pair, BETA));
    assert!(a == b, "the copies differ after the resolution");
}

fn policy_pair(zero: &str, one: &str) -> Pair {
    Pair::builder()
        .resource_key("after_sb_0pri", &format!("{zero:?}"))
        .resource_key("after_sb_1pri", &format!("{one:?}"))
        .start()
}

/// The union of the blocks alpha and beta changed, from the bitmap
/// exchange the sync source logs.
fn union_blocks(log: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("bitmaps exchanged"))
        .unwrap_or_else(|| panic!("no bitmap exchange logged:\n{log}"));
    let at = line.find("union_blocks=").expect("union_blocks") + "union_blocks=".len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad line {line}"))
}

#[test]
fn manual_resolution_moves_only_the_blocks_either_side_changed() {
    let pair = Pair::start_default();
    qemu_io_ok(&pair.alpha().uri(), "write -P 0x11 0 16M");
    wait_synced(&pair);
    split(&pair, 64 * KIB, 128 * KIB, Some(ALPHA));
    // A block that differs but that no bitmap marks: written behind both
    // daemons' backs into beta's file. A full sync would overwrite it; a
    // sync of the bitmaps' union must leave it alone.
    let hidden = 20 * MIB;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pair.beta().disk)
        .and_then(|f| f.write_all_at(&[0x5c; 4096], hidden))
        .expect("writing beta's file");
    pair.ok(BETA, &["connect", "r0", "--discard-my-data"]);
    pair.ok(ALPHA, &["connect", "r0"]);
    pair.wait_status(BETA, "reconnected", |s| s.connected());
    wait_synced(&pair);
    let b = st(&pair, BETA);
    assert_eq!(
        b["decision"]["decision"]["sync-target"]["full"], false,
        "{b}"
    );
    assert_eq!(b["decision"]["rule_number"], 90, "{b}");
    // 16 blocks changed on alpha, 32 on beta: 48 resynced, not the 16384
    // of the device.
    assert_eq!(union_blocks(&pair.log(ALPHA)), 48);
    let (a, d) = (disk(&pair, ALPHA), disk(&pair, BETA));
    assert!(range(&d, 0, 64 * KIB).iter().all(|&x| x == 0xaa));
    assert_eq!(range(&d, 8 * MIB, 128 * KIB), range(&a, 8 * MIB, 128 * KIB));
    assert!(range(&d, 8 * MIB, 128 * KIB).iter().all(|&x| x == 0x11));
    assert!(
        range(&d, hidden, 4096).iter().all(|&x| x == 0x5c),
        "the unmarked block was copied: not a bitmap-based sync"
    );
    // Everything else is identical; online verify finds the one block
    // and the next connect repairs it.
    let mut a2 = a.clone();
    a2[hidden as usize..(hidden + 4096) as usize].fill(0x5c);
    assert!(a2 == d, "copies differ outside the hidden block");
    pair.ok(ALPHA, &["verify", "r0"]);
    let v = pair.wait_status(ALPHA, "verify done", |s| {
        s.raw["resources"][0]["verify"]["state"] == "done"
    });
    assert_eq!(v.raw["resources"][0]["verify"]["out_of_sync_blocks"], 1);
    pair.ok(BETA, &["disconnect", "r0"]);
    pair.ok(BETA, &["connect", "r0"]);
    pair.wait_status(BETA, "reconnected", |s| s.connected());
    wait_synced(&pair);
    assert_identical(&pair);
    pair.assert_no_panic();
}

#[test]
fn discard_zero_changes_discards_the_node_that_wrote_nothing() {
    let pair = policy_pair("discard-zero-changes", "disconnect");
    // Beta is promoted while apart but writes nothing.
    split(&pair, 64 * KIB, 0, None);
    connect_both(&pair);
    let (a, b) = resolved(&pair);
    assert_eq!(b["victim"], "local", "{b}");
    assert_eq!(a["victim"], "peer", "{a}");
    assert_eq!(
        (b["local_changes"].clone(), b["peer_changes"].clone()),
        (0.into(), 16.into())
    );
    assert_eq!(b["setting"], "after-sb-0pri");
    assert_eq!(b["policy"], "discard-zero-changes");
    assert!(range(&disk(&pair, BETA), 0, 64 * KIB)
        .iter()
        .all(|&x| x == 0xaa));
    assert_identical(&pair);
    let text = pair.ok(BETA, &["status", "r0"]);
    assert!(
        text.contains("last split brain: after-sb-0pri discard-zero-changes"),
        "{text}"
    );
    assert!(
        pair.log(BETA).contains("resolved automatically"),
        "no log line"
    );
}

#[test]
fn discard_zero_changes_disconnects_when_both_wrote() {
    let pair = policy_pair("discard-zero-changes", "disconnect");
    split(&pair, 64 * KIB, 4 * KIB, None);
    connect_both(&pair);
    for node in [ALPHA, BETA] {
        let s = pair.wait_status(node, "StandAlone", |s| s.connection == "StandAlone");
        let sb = &s.raw["resources"][0]["split_brain"];
        assert!(sb["victim"].is_null(), "{sb}");
        assert!(
            sb["reason"]
                .as_str()
                .unwrap_or("")
                .contains("both nodes changed blocks"),
            "{sb}"
        );
        assert!(s.last_error.unwrap_or_default().contains("split brain"));
    }
}

#[test]
fn discard_least_changes_keeps_the_node_with_more_changes() {
    let pair = policy_pair("discard-least-changes", "disconnect");
    split(&pair, 64 * KIB, 256 * KIB, None);
    connect_both(&pair);
    let (a, b) = resolved(&pair);
    assert_eq!(a["victim"], "local", "{a}");
    assert_eq!(
        (a["local_changes"].clone(), a["peer_changes"].clone()),
        (16.into(), 64.into())
    );
    let d = disk(&pair, ALPHA);
    assert!(range(&d, 8 * MIB, 256 * KIB).iter().all(|&x| x == 0xbb));
    assert!(range(&d, 0, 64 * KIB).iter().all(|&x| x == 0));
    assert_eq!(b["victim"], "peer");
    assert_identical(&pair);
}

#[test]
fn discard_younger_primary_discards_the_node_promoted_after_the_split() {
    let pair = policy_pair("discard-younger-primary", "disconnect");
    // Alpha was Primary when the link went; beta was promoted after. Beta
    // wrote more, which does not matter here.
    split(&pair, 4 * KIB, 256 * KIB, None);
    connect_both(&pair);
    let (a, b) = resolved(&pair);
    assert_eq!(b["victim"], "local", "{b}");
    assert!(
        b["reason"].as_str().unwrap_or("").contains("younger"),
        "{b}"
    );
    assert_eq!(a["victim"], "peer", "{a}");
    assert!(range(&disk(&pair, BETA), 8 * MIB, 256 * KIB)
        .iter()
        .all(|&x| x == 0));
    assert_identical(&pair);
}

#[test]
fn discard_secondary_keeps_the_primary() {
    let pair = policy_pair("disconnect", "discard-secondary");
    // Beta stays Primary, alpha (which wrote more) is Secondary.
    split(&pair, 256 * KIB, 4 * KIB, Some(BETA));
    connect_both(&pair);
    let (a, _) = resolved(&pair);
    assert_eq!(a["victim"], "local", "{a}");
    assert_eq!(
        (a["setting"].clone(), a["primaries"].clone()),
        ("after-sb-1pri".into(), 1.into())
    );
    assert_eq!(st(&pair, BETA)["role"], "Primary");
    assert!(range(&disk(&pair, ALPHA), 0, 256 * KIB)
        .iter()
        .all(|&x| x == 0));
    assert_identical(&pair);
}

#[test]
fn consensus_resolves_only_when_after_sb_0pri_discards_the_secondary() {
    let pair = policy_pair("discard-least-changes", "consensus");
    // Alpha Secondary with fewer changes: least-changes discards it too.
    split(&pair, 4 * KIB, 64 * KIB, Some(BETA));
    connect_both(&pair);
    let (a, _) = resolved(&pair);
    assert_eq!(a["victim"], "local", "{a}");
    assert!(a["reason"].as_str().unwrap_or("").contains("agrees"), "{a}");
    assert_identical(&pair);
    // Now the Secondary wrote more: least-changes would discard the
    // Primary, so there is no consensus and both stay apart.
    split(&pair, 256 * KIB, 4 * KIB, Some(BETA));
    connect_both(&pair);
    let s = pair.wait_status(ALPHA, "StandAlone", |s| s.connection == "StandAlone");
    let sb = &s.raw["resources"][0]["split_brain"];
    assert!(sb["victim"].is_null(), "{sb}");
    assert!(
        sb["reason"]
            .as_str()
            .unwrap_or("")
            .contains("would not discard the Secondary"),
        "{sb}"
    );
}

#[test]
fn nodes_with_different_policies_refuse_to_connect_with_a_clear_error() {
    let pair = Pair::builder()
        .resource_key_on(ALPHA, "after_sb_0pri", "\"discard-least-changes\"")
        .start_unconnected();
    let s = pair.wait_status(ALPHA, "the refusal", |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("split-brain policies differ"))
    });
    assert!(!s.connected());
}

// ---------------------------------------------------------------------------
// A hostile peer's bitmap
// ---------------------------------------------------------------------------

/// Plays alpha to beta through the handshake and the State exchange,
/// claiming beta's generation with `dirty` blocks marked, so beta
/// decides a bitmap-based resync and expects alpha's bitmap; then sends
/// `bitmap` (raw bytes) instead of a good one. Returns beta's frames up to
/// the close.
fn hostile_bitmap(pair: &Pair, current: u64, bitmap: &[u8]) -> Vec<Frame> {
    let size = pair.beta().disk_size;
    let mut s = TcpStream::connect_timeout(&pair.beta().repl_addr, Duration::from_secs(5))
        .expect("connecting to beta");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let send = |s: &mut TcpStream, f: &Frame| {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        s.write_all(&b).expect("send");
    };
    let recv = |s: &mut TcpStream| -> std::io::Result<Frame> {
        let mut raw = [0u8; FrameHeader::LEN];
        s.read_exact(&mut raw)?;
        let h = FrameHeader::decode(&mut std::io::Cursor::new(&raw[..]))
            .expect("header")
            .expect("whole header");
        let mut body = vec![0u8; h.length as usize];
        s.read_exact(&mut body)?;
        Ok(Frame::decode_body(h.kind, &body).expect("a frame beta sent"))
    };
    let mut challenge = [0u8; CHALLENGE_LEN];
    challenge[0] = 7;
    send(
        &mut s,
        &Frame::Hello(Hello {
            min_version: repl::PROTOCOL_MIN,
            max_version: repl::PROTOCOL_MAX,
            features: repl::features::NONE,
            node: ALPHA.into(),
            peer: BETA.into(),
            resource: "r0".into(),
            size,
            challenge,
            after_sb: [0, 0],
        }),
    );
    let Ok(Frame::Hello(theirs)) = recv(&mut s) else {
        panic!("no Hello from beta")
    };
    let mac = auth_mac(b"pair-test-secret", &theirs.challenge, ALPHA, "r0").expect("mac");
    send(&mut s, &Frame::Auth { mac });
    assert!(matches!(recv(&mut s), Ok(Frame::Auth { .. })));
    send(&mut s, &Frame::AuthOk);
    assert!(matches!(recv(&mut s), Ok(Frame::AuthOk)));
    send(
        &mut s,
        &Frame::State(StateFrame {
            role: 0,
            disk: 4,
            md_flags: 0b11,
            current,
            dirty_bits: 5,
            ..StateFrame::default()
        }),
    );
    assert!(matches!(recv(&mut s), Ok(Frame::State(_))));
    s.write_all(bitmap).expect("sending the bitmap");
    let mut frames = Vec::new();
    while let Ok(f) = recv(&mut s) {
        frames.push(f);
    }
    frames
}

#[test]
fn a_hostile_peer_bitmap_is_refused_with_a_clear_error_and_the_real_peer_still_syncs() {
    let mut pair = Pair::start_default();
    qemu_io_ok(&pair.alpha().uri(), "write -P 0x44 0 1M");
    wait_synced(&pair);
    let gens = st(&pair, BETA)["generations"]["current"]
        .as_str()
        .map(|h| u64::from_str_radix(h, 16).expect("hex"))
        .expect("beta's generation");
    pair.ok(ALPHA, &["demote", "r0"]);
    pair.stop(ALPHA);
    pair.wait_status(BETA, "losing alpha", |s| !s.connected());
    let total = pair.beta().disk_size / 4096;
    let frame = |c: BitmapChunk| {
        let mut b = BytesMut::new();
        Frame::Bitmap(c).encode(&mut b);
        b.to_vec()
    };
    // A bitmap for another device size.
    let other = BitmapChunk::split(&[0xff; 8], 64, 64).remove(0);
    // Beta may or may not have sent (part of) its own bitmap before it
    // read ours and gave up; nothing else.
    let frames = hostile_bitmap(&pair, gens, &frame(other));
    assert!(
        frames
            .iter()
            .all(|f| matches!(f, Frame::Bitmap(c) if c.total_bits == total)),
        "beta sent more than its bitmap: {frames:?}"
    );
    let s = pair.wait_status(BETA, "the refusal", |s| {
        s.last_error
            .as_deref()
            .unwrap_or("")
            .contains("bitmap exchange failed")
    });
    assert!(
        s.last_error
            .as_deref()
            .unwrap_or("")
            .contains("different device size"),
        "{s:?}"
    );
    // A chunk that starts in the middle.
    let mut late = BitmapChunk::split(&vec![0u8; total as usize / 8], total, 4096).remove(1);
    late.total_bits = total;
    hostile_bitmap(&pair, gens, &frame(late));
    pair.wait_status(BETA, "the refusal", |s| {
        s.last_error.as_deref().unwrap_or("").contains("expected 0")
    });
    // A header announcing a 30 MiB chunk: refused before reading it.
    let mut huge = BytesMut::new();
    FrameHeader {
        kind: repl::kind::BITMAP,
        length: 30 << 20,
    }
    .encode(&mut huge);
    hostile_bitmap(&pair, gens, &huge);
    pair.wait_status(BETA, "the refusal", |s| {
        s.last_error.as_deref().unwrap_or("").contains("limit")
    });
    assert!(pair.is_running(BETA), "beta exited:\n{}", pair.log(BETA));
    // The real alpha comes back: they sync and end identical.
    pair.start(ALPHA);
    pair.wait_connected();
    wait_synced(&pair);
    assert_identical(&pair);
    pair.assert_no_panic();
}
