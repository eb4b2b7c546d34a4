//! NBD protocol behaviour of the real `repld` binary, driven by a raw client
//! that can also misbehave: handshake options, error replies, hostile
//! input, pipelining, multi-connection flush, logs and graceful shutdown.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::process::Command as Process;
use std::time::{Duration, Instant};

use common::client::{self, Client};
use common::{run_tool, Daemon};
use replblk_proto::nbd::{cmd_flags, errno, info, opt, rep, Command, InfoReply, ServerEntry};

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// True if the server closed the connection (EOF or reset) within the bound.
fn closed_by_server(stream: &mut std::net::TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
    false
}

/// The daemon still serves a fresh client correctly.
fn assert_still_serving(d: &Daemon) {
    let mut c = Client::connect(&d.addr(), "r0");
    let data = pattern(99, 4096);
    assert_eq!(c.write(8192, &data), 0);
    assert_eq!(c.read(8192, 4096).expect("read"), data);
    c.disconnect();
}

fn finish(mut d: Daemon) {
    let status = d.stop();
    let log = d.log_text();
    assert!(status.success(), "repld exited with {status}:\n{log}");
    assert!(!log.contains("panicked"), "repld panicked:\n{log}");
}

#[test]
fn unknown_option_is_answered_unsupported_and_haggling_continues() {
    let d = Daemon::start();
    let mut s = client::connect_raw(&d.addr());
    client::greet(&mut s);
    client::send_option(&mut s, 0x1234, b"some option data");
    let r = client::read_option_reply(&mut s);
    assert_eq!(r.header.reply_type, rep::ERR_UNSUP);
    assert_eq!(r.header.option, 0x1234);
    client::send_option(&mut s, opt::STRUCTURED_REPLY, &[]);
    assert_eq!(
        client::read_option_reply(&mut s).header.reply_type,
        rep::ERR_UNSUP
    );
    let replies = client::go(&mut s, opt::GO, "r0", &[]);
    assert_eq!(replies.last().expect("reply").header.reply_type, rep::ACK);
    finish(d);
}

#[test]
fn block_size_is_sent_only_when_requested() {
    let d = Daemon::start();
    let mut s = client::connect_raw(&d.addr());
    client::greet(&mut s);
    let infos = |replies: &[client::OptReply]| -> Vec<InfoReply> {
        replies
            .iter()
            .filter(|r| r.header.reply_type == rep::INFO)
            .map(|r| InfoReply::decode_data(&r.data).expect("info"))
            .collect()
    };
    let plain = client::go(&mut s, opt::INFO, "r0", &[]);
    assert!(!infos(&plain)
        .iter()
        .any(|i| matches!(i, InfoReply::BlockSize { .. })));
    let asked = client::go(
        &mut s,
        opt::INFO,
        "r0",
        &[info::BLOCK_SIZE, info::NAME, info::DESCRIPTION],
    );
    let items = infos(&asked);
    assert!(items.contains(&InfoReply::BlockSize {
        minimum: 1,
        preferred: 4096,
        maximum: 32 << 20
    }));
    assert!(items.contains(&InfoReply::Name("r0".into())));
    assert!(items.contains(&InfoReply::Description("test volume".into())));
    assert!(items.contains(&InfoReply::Export {
        size: 64 << 20,
        flags: items
            .iter()
            .find_map(|i| match i {
                InfoReply::Export { flags, .. } => Some(*flags),
                _ => None,
            })
            .expect("export info")
    }));
    finish(d);
}

#[test]
fn unknown_export_gets_err_unknown_and_the_empty_name_selects_the_default() {
    let d = Daemon::start();
    let mut s = client::connect_raw(&d.addr());
    client::greet(&mut s);
    let replies = client::go(&mut s, opt::GO, "nope", &[]);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].header.reply_type, rep::ERR_UNKNOWN);
    let replies = client::go(&mut s, opt::GO, "", &[]);
    assert_eq!(replies.last().expect("reply").header.reply_type, rep::ACK);
    finish(d);
}

#[test]
fn list_with_data_is_invalid_and_list_names_every_export() {
    let d = Daemon::builder()
        .resource("r1", vec![0; 4096], "read_only = true")
        .start();
    let mut s = client::connect_raw(&d.addr());
    client::greet(&mut s);
    client::send_option(&mut s, opt::LIST, b"x");
    assert_eq!(
        client::read_option_reply(&mut s).header.reply_type,
        rep::ERR_INVALID
    );
    client::send_option(&mut s, opt::LIST, &[]);
    let mut names = Vec::new();
    loop {
        let r = client::read_option_reply(&mut s);
        if r.header.reply_type == rep::ACK {
            break;
        }
        assert_eq!(r.header.reply_type, rep::SERVER);
        names.push(ServerEntry::decode_data(&r.data).expect("entry").name);
    }
    assert_eq!(names, ["r0", "r1"]);
    finish(d);
}

#[test]
fn abort_is_acknowledged_and_export_name_enters_transmission() {
    let d = Daemon::start();
    let mut s = client::connect_raw(&d.addr());
    client::greet(&mut s);
    client::send_option(&mut s, opt::ABORT, &[]);
    assert_eq!(
        client::read_option_reply(&mut s).header.reply_type,
        rep::ACK
    );
    assert!(closed_by_server(&mut s));

    let mut s = client::connect_raw(&d.addr());
    client::greet(&mut s);
    client::send_option(&mut s, opt::EXPORT_NAME, b"r0");
    let mut raw = [0u8; 10];
    s.read_exact(&mut raw).expect("export reply");
    assert_eq!(
        u64::from_be_bytes(raw[..8].try_into().expect("8 bytes")),
        64 << 20
    );

    let mut s = client::connect_raw(&d.addr());
    client::greet(&mut s);
    client::send_option(&mut s, opt::EXPORT_NAME, b"missing");
    assert!(closed_by_server(&mut s), "unknown EXPORT_NAME must hang up");
    finish(d);
}

#[test]
fn garbage_during_the_handshake_drops_only_that_client() {
    let d = Daemon::start();
    let mut good = Client::connect(&d.addr(), "r0");
    assert_eq!(good.write(0, &pattern(1, 4096)), 0);

    // Not even a greeting reply: random bytes instead of client flags.
    let mut bad = client::connect_raw(&d.addr());
    let mut greeting = [0u8; 18];
    bad.read_exact(&mut greeting).expect("greeting");
    bad.write_all(&[0xff; 64]).expect("garbage");
    assert!(closed_by_server(&mut bad));

    // Valid flags, then an option with a wrong magic.
    let mut bad = client::connect_raw(&d.addr());
    client::greet(&mut bad);
    bad.write_all(b"GARBAGE!GARBAGE!GARBAGE!").expect("garbage");
    assert!(closed_by_server(&mut bad));

    // An option claiming a huge length.
    let mut bad = client::connect_raw(&d.addr());
    client::greet(&mut bad);
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&replblk_proto::nbd::IHAVEOPT.to_be_bytes());
    hdr.extend_from_slice(&opt::GO.to_be_bytes());
    hdr.extend_from_slice(&u32::MAX.to_be_bytes());
    bad.write_all(&hdr).expect("header");
    assert!(closed_by_server(&mut bad));

    // A GO whose name length runs past the option data.
    let mut bad = client::connect_raw(&d.addr());
    client::greet(&mut bad);
    client::send_option(&mut bad, opt::GO, &[0, 0, 0, 200, b'r', b'0', 0, 0]);
    assert_eq!(
        client::read_option_reply(&mut bad).header.reply_type,
        rep::ERR_INVALID
    );

    assert_eq!(good.read(0, 4096).expect("read"), pattern(1, 4096));
    good.disconnect();
    assert_still_serving(&d);
    finish(d);
}

#[test]
fn a_client_that_stalls_in_the_handshake_is_timed_out_without_blocking_others() {
    let d = Daemon::builder()
        .nbd_extra("handshake_timeout_ms = 300\n")
        .start();
    let mut idle = client::connect_raw(&d.addr());
    let mut greeting = [0u8; 18];
    idle.read_exact(&mut greeting).expect("greeting");
    assert_still_serving(&d);
    assert!(closed_by_server(&mut idle), "idle client must be dropped");
    assert!(d.log_text().contains("did not finish within"));
    finish(d);
}

#[test]
fn out_of_range_requests_get_the_errors_the_spec_names() {
    let d = Daemon::start();
    let mut c = Client::connect(&d.addr(), "r0");
    let size = c.size;
    assert_eq!(c.read(size - 4095, 4096), Err(errno::EINVAL));
    assert_eq!(c.read(u64::MAX - 10, 4096), Err(errno::EINVAL));
    assert_eq!(c.write(size - 1, &[1, 2]), errno::ENOSPC);
    assert_eq!(c.write(u64::MAX, &[1]), errno::ENOSPC);
    assert_eq!(c.call(Command::Trim, 0, size, 1, &[]), errno::EINVAL);
    assert_eq!(
        c.call(Command::WriteZeroes, 0, size - 4096, 8192, &[]),
        errno::ENOSPC
    );
    assert_eq!(c.call(Command::Cache, 0, size, 4096, &[]), errno::EINVAL);
    // The last byte is fine.
    assert_eq!(c.write(size - 1, &[7]), 0);
    assert_eq!(c.read(size - 1, 1).expect("read"), [7]);
    c.disconnect();
    finish(d);
}

#[test]
fn zero_lengths_and_oversized_reads_are_answered_and_the_connection_survives() {
    let d = Daemon::start();
    let mut c = Client::connect(&d.addr(), "r0");
    assert_eq!(c.read(0, 0).expect("empty read"), Vec::<u8>::new());
    assert_eq!(c.write(0, &[]), 0);
    assert_eq!(c.call(Command::Trim, 0, 0, 0, &[]), 0);
    assert_eq!(c.read(0, (32 << 20) + 1), Err(errno::EINVAL));
    assert_eq!(c.read(0, u32::MAX), Err(errno::EINVAL));
    // Trim and zeroing have no payload, so large lengths are fine.
    assert_eq!(c.call(Command::WriteZeroes, 0, 0, 64 << 20, &[]), 0);
    assert_eq!(c.write(4096, &pattern(3, 512)), 0);
    assert_eq!(c.read(4096, 512).expect("read"), pattern(3, 512));
    c.disconnect();
    finish(d);
}

#[test]
fn unknown_commands_and_flags_get_einval_and_payloads_stay_in_step() {
    let d = Daemon::start();
    let mut c = Client::connect(&d.addr(), "r0");
    assert_eq!(c.call(Command::Other(42), 0, 0, 0, &[]), errno::EINVAL);
    assert_eq!(c.call(Command::Other(7), 0, 0, 4096, &[]), errno::EINVAL);
    // A write with a flag writes do not take: EINVAL, and its payload is
    // consumed so the next request parses.
    let data = pattern(5, 4096);
    assert_eq!(
        c.call(Command::Write, cmd_flags::NO_HOLE, 0, 4096, &data),
        errno::EINVAL
    );
    assert_eq!(
        c.call(Command::Write, 1 << 15, 0, 4096, &data),
        errno::EINVAL
    );
    assert_eq!(
        c.call(Command::Read, cmd_flags::FUA, 0, 4096, &[]),
        errno::EINVAL
    );
    assert_eq!(
        c.read(0, 4096).expect("read"),
        vec![0; 4096],
        "rejected write applied"
    );
    assert_eq!(c.write(0, &data), 0);
    assert_eq!(c.read(0, 4096).expect("read"), data);
    c.disconnect();
    finish(d);
}

#[test]
fn fua_trim_and_write_zeroes_read_back_correctly() {
    let d = Daemon::start();
    let mut c = Client::connect(&d.addr(), "r0");
    let data = pattern(9, 65536);
    assert_eq!(c.call(Command::Write, cmd_flags::FUA, 0, 65536, &data), 0);
    assert_eq!(c.read(0, 65536).expect("read"), data);
    assert_eq!(
        c.call(Command::WriteZeroes, cmd_flags::NO_HOLE, 100, 1000, &[]),
        0
    );
    assert_eq!(
        c.call(Command::WriteZeroes, cmd_flags::FUA, 8192, 8192, &[]),
        0
    );
    let back = c.read(0, 65536).expect("read");
    assert_eq!(&back[..100], &data[..100]);
    assert!(back[100..1100].iter().all(|&b| b == 0));
    assert_eq!(&back[1100..8192], &data[1100..8192]);
    assert!(back[8192..16384].iter().all(|&b| b == 0));
    assert_eq!(&back[16384..], &data[16384..]);
    assert_eq!(c.call(Command::Trim, cmd_flags::FUA, 32768, 4096, &[]), 0);
    assert_eq!(c.call(Command::Cache, 0, 0, 65536, &[]), 0);
    c.disconnect();
    finish(d);
}

#[test]
fn bad_request_magic_or_oversized_write_drops_only_that_connection() {
    let d = Daemon::start();
    let mut other = Client::connect(&d.addr(), "r0");

    let mut c = Client::connect(&d.addr(), "r0");
    c.stream.write_all(&[0xee; 28]).expect("garbage request");
    assert!(closed_by_server(&mut c.stream));

    let mut c = Client::connect(&d.addr(), "r0");
    c.send(Command::Write, 0, 0, u32::MAX, &[0; 1024]);
    assert!(closed_by_server(&mut c.stream));

    assert_eq!(other.write(0, &pattern(2, 4096)), 0);
    other.disconnect();
    // The server logs each close after shutting the socket, so the client
    // can see the close first.
    let deadline = Instant::now() + Duration::from_secs(10);
    let logged = |log: &str| log.contains("bad request") && log.contains("exceeds");
    while !logged(&d.log_text()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = d.log_text();
    assert!(log.contains("bad request"), "{log}");
    assert!(log.contains("exceeds"), "{log}");
    finish(d);
}

#[test]
fn a_write_cut_off_mid_payload_is_not_applied() {
    let d = Daemon::start();
    let mut c = Client::connect(&d.addr(), "r0");
    c.send(Command::Write, 0, 0, 65536, &pattern(4, 30000));
    drop(c);
    // The server logs the close once it has seen the EOF.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log_text().contains("middle of a 65536-byte write") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        d.log_text().contains("middle of a 65536-byte write"),
        "{}",
        d.log_text()
    );
    let mut c = Client::connect(&d.addr(), "r0");
    assert_eq!(c.read(0, 65536).expect("read"), vec![0; 65536]);
    c.disconnect();
    finish(d);
}

#[test]
fn many_requests_in_flight_are_all_answered_by_cookie() {
    let d = Daemon::start();
    let mut c = Client::connect(&d.addr(), "r0");
    let n = 200u64;
    let mut expected = std::collections::HashMap::new();
    for i in 0..n {
        let data = pattern(i as u8, 4096 * (1 + (i as usize % 4)));
        let cookie = c.send(Command::Write, 0, i * 65536, data.len() as u32, &data);
        expected.insert(cookie, None);
    }
    for i in 0..n {
        let cookie = c.send(Command::Read, 0, i * 65536, 4096, &[]);
        expected.insert(cookie, Some(pattern(i as u8, 4096)));
    }
    // Reads were queued after the writes on one connection, but NBD does
    // not order them; a read may see old data only if it overtook the
    // write, which is why data is checked again below after all replies.
    for _ in 0..expected.len() {
        let reply = c.recv();
        assert_eq!(reply.error, 0);
        let want = expected
            .remove(&reply.cookie)
            .expect("known, unanswered cookie");
        if let Some(want) = want {
            let _ = c.recv_data(want.len());
        }
    }
    assert!(expected.is_empty());
    for i in 0..n {
        assert_eq!(
            c.read(i * 65536, 4096).expect("read"),
            pattern(i as u8, 4096)
        );
    }
    c.disconnect();
    finish(d);
}

#[test]
fn flush_on_one_connection_covers_writes_from_all_connections() {
    let d = Daemon::start();
    let mut writers: Vec<Client> = (0..3).map(|_| Client::connect(&d.addr(), "r0")).collect();
    for (i, c) in writers.iter_mut().enumerate() {
        assert_eq!(
            c.write(i as u64 * 1_000_000, &pattern(i as u8 + 10, 100_000)),
            0
        );
    }
    let mut flusher = Client::connect(&d.addr(), "r0");
    assert_eq!(flusher.flush(), 0);
    // Every connection sees every other connection's acknowledged writes.
    for c in writers.iter_mut().chain(std::iter::once(&mut flusher)) {
        for i in 0..3u64 {
            let got = c.read(i * 1_000_000, 100_000).expect("read");
            assert_eq!(got, pattern(i as u8 + 10, 100_000));
        }
    }
    // And after the flush the data is in the backing file itself.
    let file = std::fs::File::open(&d.disk).expect("disk");
    for i in 0..3u64 {
        let mut buf = vec![0u8; 100_000];
        file.read_exact_at(&mut buf, i * 1_000_000).expect("pread");
        assert_eq!(buf, pattern(i as u8 + 10, 100_000));
    }
    for c in writers {
        c.disconnect();
    }
    flusher.disconnect();
    finish(d);
}

#[test]
fn read_only_exports_refuse_writes_with_eperm() {
    let d = Daemon::builder()
        .resource("ro", vec![5u8; 8192], "read_only = true")
        .start();
    let mut c = Client::connect(&d.addr(), "ro");
    assert_ne!(c.flags & replblk_proto::nbd::tflags::READ_ONLY, 0);
    assert_eq!(c.write(0, &[1]), errno::EPERM);
    assert_eq!(c.call(Command::Trim, 0, 0, 4096, &[]), errno::EPERM);
    assert_eq!(c.call(Command::WriteZeroes, 0, 0, 4096, &[]), errno::EPERM);
    assert_eq!(c.read(0, 8192).expect("read"), vec![5u8; 8192]);
    c.disconnect();
    finish(d);
}

#[test]
fn each_connection_logs_one_open_and_one_close_line_with_the_client_address() {
    let d = Daemon::start();
    let c = Client::connect(&d.addr(), "r0");
    let local = c.stream.local_addr().expect("local addr").to_string();
    c.disconnect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log_text().contains("connection closed") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = d.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&local)).collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert!(lines[0].contains("connection opened"));
    assert!(lines[1].contains("connection closed") && lines[1].contains("r0"));
    finish(d);
}

#[test]
fn sigterm_finishes_in_flight_writes_and_exits_zero() {
    let mut d = Daemon::start();
    let mut c = Client::connect(&d.addr(), "r0");
    let n = 64u64;
    for i in 0..n {
        c.send(
            Command::Write,
            0,
            i * 262_144,
            262_144,
            &pattern(i as u8, 262_144),
        );
    }
    d.signal(libc::SIGTERM);
    // Every write the server acknowledges must be in the backing file.
    let mut acked = Vec::new();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    for _ in 0..n {
        let mut raw = [0u8; 16];
        if c.stream.read_exact(&mut raw).is_err() {
            break;
        }
        let error = u32::from_be_bytes(raw[4..8].try_into().expect("4 bytes"));
        let cookie = u64::from_be_bytes(raw[8..16].try_into().expect("8 bytes"));
        if error == 0 {
            acked.push(cookie - 1);
        }
    }
    // The client's sends only returned once the server had read nearly all
    // of the 16 MiB, so at least some writes were in flight at SIGTERM.
    assert!(
        !acked.is_empty(),
        "no write was acknowledged:\n{}",
        d.log_text()
    );
    let status = d.stop();
    assert!(status.success(), "exit status {status}:\n{}", d.log_text());
    assert!(d.log_text().contains("shutdown complete"));
    let file = std::fs::File::open(&d.disk).expect("disk");
    for i in acked {
        let mut buf = vec![0u8; 262_144];
        file.read_exact_at(&mut buf, i * 262_144).expect("pread");
        assert!(
            buf == pattern(i as u8, 262_144),
            "acknowledged write {i} missing"
        );
    }
}

#[test]
fn unix_socket_serves_the_same_exports() {
    let d = Daemon::builder().unix_socket().start();
    let uri = format!("nbd+unix:///r0?socket={}", d.socket.display());
    let (ok, out, err) = run_tool(Process::new("nbdinfo").arg("--size").arg(&uri));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), (64u64 << 20).to_string());
    let socket = d.socket.clone();
    finish(d);
    assert!(!socket.exists(), "socket file left behind");
}

fn start_with_config(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        text.replace("DIR", &dir.path().display().to_string()),
    )
    .expect("write");
    let disk = dir.path().join("ok.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    std::fs::File::create(dir.path().join("odd.img"))
        .and_then(|f| f.set_len(5000))
        .expect("odd disk");
    let (ok, _out, err) = run_tool(
        Process::new(env!("CARGO_BIN_EXE_repld"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info"),
    );
    (ok, err)
}

#[test]
fn bad_configs_are_refused_with_a_clear_message() {
    let cases = [
        (
            "[[resource]]\nname = \"r0\"\ndisk = \"DIR/ok.img\"\nbogus = 1\n",
            "unknown field `bogus`",
        ),
        (
            "[[resource]]\nname = \"r0\"\ndisk = \"DIR/missing.img\"\n",
            "missing.img: No such file or directory",
        ),
        (
            "[[resource]]\nname = \"r0\"\ndisk = \"DIR/ok.img\"\nsize = 12345\n",
            "not a positive multiple of 4 KiB",
        ),
        (
            "[[resource]]\nname = \"r0\"\ndisk = \"DIR/odd.img\"\n",
            "not a positive multiple of 4 KiB",
        ),
        ("[nbd]\nlisten = \"127.0.0.1:0\"\n", "no [[resource]]"),
        ("this is not toml", "config file"),
    ];
    for (text, needle) in cases {
        let text = if text.starts_with("[nbd]") {
            text.to_string()
        } else {
            format!("[nbd]\nlisten = \"127.0.0.1:0\"\n{text}")
        };
        let (ok, err) = start_with_config(&text);
        assert!(!ok, "config should be refused:\n{text}");
        assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_port_already_in_use_is_reported() {
    let d = Daemon::start();
    let text = format!(
        "[nbd]\nlisten = \"127.0.0.1:{}\"\n[[resource]]\nname = \"r0\"\ndisk = \"DIR/ok.img\"\n",
        d.port
    );
    let (ok, err) = start_with_config(&text);
    assert!(!ok);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{}", d.port)),
        "{err}"
    );
    assert!(err.contains("in use"), "{err}");
    finish(d);
}

#[test]
fn a_client_that_stops_reading_replies_is_dropped_without_blocking_others() {
    let d = Daemon::builder()
        .nbd_extra("send_timeout_ms = 300\n")
        .start();
    let mut stalled = Client::connect(&d.addr(), "r0");
    // Far more reply data than the socket buffers hold, never read: the
    // workers block sending until the send timeout ends the connection.
    for _ in 0..256 {
        stalled.send(Command::Read, 0, 0, 256 * 1024, &[]);
    }
    assert_still_serving(&d);
    std::thread::sleep(Duration::from_millis(1500));
    assert_still_serving(&d);
    assert!(
        closed_by_server(&mut stalled.stream),
        "a client that does not read its replies must be disconnected"
    );
    assert!(
        d.log_text().contains("writing reply"),
        "the reason is logged:\n{}",
        d.log_text()
    );
    finish(d);
}

/// Large writes, however their payloads arrive (in one segment or
/// trickled), read back whole, and a rejected one's payload is consumed.
#[test]
fn large_writes_read_back_whole_however_their_payload_arrives() {
    let d = Daemon::start();
    let mut c = Client::connect(&d.addr(), "r0");
    c.stream.set_nodelay(true).expect("nodelay");
    let mib = 1usize << 20;
    let mut expected = vec![0u8; 16 * mib];
    let put = |expected: &mut Vec<u8>, offset: usize, data: &[u8]| {
        expected[offset..offset + data.len()].copy_from_slice(data);
    };
    // Just past a burst's size, at an offset that is not a multiple of it.
    let a = pattern(1, 64 * 1024 + 4096);
    assert_eq!(c.write(4096, &a), 0);
    put(&mut expected, 4096, &a);
    // One MiB plain and with FUA, and two.
    let b = pattern(2, mib);
    assert_eq!(c.write(mib as u64, &b), 0);
    put(&mut expected, mib, &b);
    let f = pattern(3, mib);
    assert_eq!(
        c.call(
            Command::Write,
            cmd_flags::FUA,
            2 * mib as u64,
            mib as u32,
            &f
        ),
        0
    );
    put(&mut expected, 2 * mib, &f);
    let two = pattern(4, 2 * mib);
    assert_eq!(c.write(3 * mib as u64, &two), 0);
    put(&mut expected, 3 * mib, &two);
    // Out of range, and with a flag writes do not take: errors, and the
    // payloads are consumed so the next request parses.
    let end = 64u64 << 20;
    assert_eq!(
        c.call(
            Command::Write,
            0,
            end - 4096,
            128 * 1024,
            &pattern(5, 128 * 1024)
        ),
        errno::ENOSPC
    );
    assert_eq!(
        c.call(
            Command::Write,
            cmd_flags::NO_HOLE,
            0,
            128 * 1024,
            &pattern(5, 128 * 1024)
        ),
        errno::EINVAL
    );
    // A payload that arrives in pieces, with pauses between them.
    let slow = pattern(6, mib);
    let cookie = c.send(Command::Write, 0, 5 * mib as u64, mib as u32, &slow[..1000]);
    for piece in slow[1000..].chunks(300 * 1024) {
        std::thread::sleep(Duration::from_millis(30));
        c.stream.write_all(piece).expect("payload piece");
    }
    let reply = c.recv();
    assert_eq!((reply.cookie, reply.error), (cookie, 0));
    put(&mut expected, 5 * mib, &slow);
    // A payload sent in a thousand small segments.
    let small = pattern(7, mib);
    let cookie = c.send(Command::Write, 0, 6 * mib as u64, mib as u32, &[]);
    for piece in small.chunks(1000) {
        c.stream.write_all(piece).expect("payload piece");
    }
    let reply = c.recv();
    assert_eq!((reply.cookie, reply.error), (cookie, 0));
    put(&mut expected, 6 * mib, &small);
    // Eight in flight at once, answered by cookie.
    let mut cookies = std::collections::HashMap::new();
    for i in 0..8usize {
        let data = pattern(10 + i as u8, 256 * 1024);
        let offset = 8 * mib + i * 256 * 1024;
        let cookie = c.send(Command::Write, 0, offset as u64, data.len() as u32, &data);
        cookies.insert(cookie, ());
        put(&mut expected, offset, &data);
    }
    for _ in 0..8 {
        let reply = c.recv();
        assert_eq!(reply.error, 0);
        assert!(cookies.remove(&reply.cookie).is_some(), "unknown cookie");
    }
    for at in (0..16 * mib).step_by(mib) {
        assert_eq!(
            c.read(at as u64, mib as u32).expect("read"),
            expected[at..at + mib],
            "MiB at {at} differs"
        );
    }
    c.disconnect();
    finish(d);
}
