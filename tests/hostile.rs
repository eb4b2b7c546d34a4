//! Hostile and stalled NBD clients: many connections that stall in the
//! handshake or in the middle of a write's payload. Other clients are
//! still served, and the daemon's threads and memory stay bounded
//! (measured from /proc and printed).
//!
//! Every wait is bounded; the daemon is stopped by PID on drop, sockets
//! close with the test.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use replblk_proto::nbd::{Command as NbdCommand, Request};

use common::client::{connect_raw, greet, Client};
use common::pair::{Pair, ALPHA};
use common::Daemon;

/// (threads, resident KiB) of a process.
fn usage(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("Threads:"), field("VmRSS:"))
}

/// A real client, timed: qemu-io writes and reads back 1 MiB.
fn served_within(addr: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &format!("nbd://{addr}/r0"),
            "-c",
            "write -P 0x5c 0 1M",
            "-c",
            "read -P 0x5c 0 1M",
        ])
        .output()
        .expect("qemu-io");
    let took = started.elapsed();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("Pattern verification"),
        "the real client failed: {text}"
    );
    assert!(took < limit, "the real client took {took:?}");
    took
}

#[test]
fn clients_stalled_in_the_handshake_do_not_stop_others_and_cost_bounded_threads() {
    let d = Daemon::builder().disk_size(64 << 20).start();
    let (threads0, rss0) = usage(d.pid());
    // 150 connections: some silent from the first byte, some stopped after
    // the greeting, some halfway through an option.
    let mut stalled: Vec<TcpStream> = Vec::new();
    for i in 0..150 {
        let mut s = connect_raw(&d.addr());
        match i % 3 {
            0 => {}
            1 => {
                greet(&mut s);
            }
            _ => {
                greet(&mut s);
                // IHAVEOPT and half an option header.
                s.write_all(&0x4948_4156_454f_5054u64.to_be_bytes())
                    .expect("partial option");
                s.write_all(&[0, 0]).expect("partial option");
            }
        }
        stalled.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let (threads1, rss1) = usage(d.pid());
    let took = served_within(&d.addr(), Duration::from_secs(10));
    eprintln!(
        "150 stalled handshakes: threads {threads0} -> {threads1}, RSS {rss0} -> {rss1} KiB; \
         a real client served in {took:?}"
    );
    // One thread per connection in the handshake, no workers yet.
    assert!(
        threads1 <= threads0 + 150 + 8,
        "threads {threads0} -> {threads1} for 150 stalled handshakes"
    );
    assert!(
        rss1 <= rss0 + 64 * 1024,
        "RSS {rss0} -> {rss1} KiB for 150 stalled handshakes"
    );
    drop(stalled);
}

#[test]
fn clients_stalled_in_a_write_payload_cost_what_they_sent_not_what_they_announced() {
    let d = Daemon::builder().disk_size(64 << 20).start();
    let (_, rss0) = usage(d.pid());
    // 48 clients each announce a 32 MiB write (the maximum) and send one
    // byte of it: 1.5 GiB announced.
    let mut stalled = Vec::new();
    for cookie in 0..48u64 {
        let mut c = Client::connect(&d.addr(), "r0");
        let mut out = BytesMut::new();
        Request {
            flags: 0,
            command: NbdCommand::Write,
            cookie,
            offset: 0,
            length: 32 << 20,
        }
        .encode(&mut out);
        out.extend_from_slice(&[7]);
        c.stream.write_all(&out).expect("partial write");
        stalled.push(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (threads1, rss1) = usage(d.pid());
    let took = served_within(&d.addr(), Duration::from_secs(10));
    eprintln!(
        "48 writes of 32 MiB stalled after one byte: RSS {rss0} -> {rss1} KiB, {threads1} threads; \
         a real client served in {took:?}"
    );
    assert!(
        rss1 <= rss0 + 256 * 1024,
        "RSS {rss0} -> {rss1} KiB: stalled payloads cost what they announced"
    );
    drop(stalled);
}

#[test]
fn a_replication_port_flooded_with_stalled_handshakes_still_lets_the_real_peer_in() {
    let mut pair = Pair::builder()
        .replication("connect_timeout_ms", "2000")
        .replication("reconnect_max_ms", "500")
        .start();
    // 40 connections to beta's replication port that never say a word.
    let mut stalled = Vec::new();
    for _ in 0..40 {
        stalled.push(std::net::TcpStream::connect(pair.beta().repl_addr).expect("connect to beta"));
    }
    // The real peer comes back: alpha restarted.
    pair.stop(ALPHA);
    let started = Instant::now();
    pair.start(ALPHA);
    pair.wait_connected();
    let took = started.elapsed();
    eprintln!("with 40 stalled handshakes queued, the real peer connected in {took:?}");
    assert!(
        took < Duration::from_secs(8),
        "the real peer waited {took:?} behind stalled handshakes"
    );
    drop(stalled);
}
