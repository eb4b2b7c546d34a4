//! End-to-end tests with the real NBD clients Debian ships (libnbd-bin,
//! qemu-utils, fio, fuse3, e2fsprogs) against the real `repld` binary.
//!
//! Every test starts its own daemon (OS-chosen port, own temporary
//! directory), drives it with one or more client tools, checks what the
//! clients saw and, where it matters, what reached the backing file, and
//! finally stops the daemon with SIGTERM and checks it exited cleanly
//! without a panic in its log.

mod common;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use replblk_proto::nbd::{errno, Command as NbdCommand};

use common::client::Client;
use common::{run_ok, run_tool, Daemon, WAIT};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Stops the daemon with SIGTERM; it must exit 0 with no panic or error in
/// its log. Returns the log.
fn stop_cleanly(daemon: &mut Daemon) -> String {
    let status = daemon.stop();
    let log = daemon.log_text();
    assert!(
        status.success(),
        "repld exited with {status} after SIGTERM; log:\n{log}"
    );
    assert!(!log.contains("panicked"), "repld panicked; log:\n{log}");
    assert!(
        !log.contains(" ERROR "),
        "repld logged an error; log:\n{log}"
    );
    log
}

fn connections_opened(daemon: &Daemon) -> usize {
    daemon.log_text().matches("connection opened").count()
}

/// The directory temporary files outside a daemon's own directory go in,
/// the same one the harness uses.
fn test_base_dir() -> PathBuf {
    std::env::var_os("REPLBLK_TEST_DIR")
        .unwrap_or_else(|| "/var/tmp".into())
        .into()
}

/// Deterministic pseudo-random bytes (xorshift64*, seeded from StdRng:
/// fast even in the unoptimised test build).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = StdRng::seed_from_u64(seed).next_u64() | 1;
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        data.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    data.truncate(len);
    data
}

/// Length of the run of `byte` at the start of `data` (memcmp-fast).
fn run_length(data: &[u8], byte: u8) -> usize {
    let block = [byte; 4096];
    let mut n = 0;
    for chunk in data.chunks(block.len()) {
        if chunk == &block[..chunk.len()] {
            n += chunk.len();
        } else {
            return n + chunk.iter().take_while(|&&b| b == byte).count();
        }
    }
    n
}

/// Panics with the first differing offset if `actual != expected`.
fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: length {} instead of {}",
        actual.len(),
        expected.len()
    );
    if actual == expected {
        return;
    }
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        let end = (at + 16).min(actual.len());
        panic!(
            "{what}: first difference at byte {at} ({at:#x}): got {:02x?}, expected {:02x?}",
            &actual[at..end],
            &expected[at..end]
        );
    }
}

fn read_file(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Builds a raw image of `len` bytes: random content with runs of zeroes,
/// some written as zero bytes and some left as holes in the sparse file.
/// Returns the content.
fn write_image_with_zero_runs(path: &Path, len: u64, seed: u64) -> Vec<u8> {
    let mut data = random_bytes(len as usize, seed);
    // (offset, length, written as a hole)
    let zero_runs: [(u64, u64, bool); 6] = [
        (0, 4096, true),
        (5 * MIB, MIB, true),
        (7 * MIB + 3, 4097, false),
        (10 * MIB + 1, 65536 + 5, false),
        (16 * MIB, 2 * MIB, false),
        (len - 2 * MIB - 1, 2 * MIB + 1, true),
    ];
    for &(off, n, _) in &zero_runs {
        data[off as usize..(off + n) as usize].fill(0);
    }
    let file = File::create(path).expect("create image");
    file.set_len(len).expect("size image");
    let mut pos = 0u64;
    let mut holes: Vec<(u64, u64)> = zero_runs
        .iter()
        .filter(|r| r.2)
        .map(|r| (r.0, r.0 + r.1))
        .collect();
    holes.sort_unstable();
    holes.push((len, len));
    for (start, end) in holes {
        if start > pos {
            file.write_all_at(&data[pos as usize..start as usize], pos)
                .expect("write image");
        }
        pos = pos.max(end);
    }
    file.sync_all().expect("sync image");
    data
}

/// Runs a command without panicking, bounded in time (killed by PID when
/// over). Returns (success, stdout) or None if it could not run or timed
/// out. For cleanup paths, where a panic would abort the test binary.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Option<(bool, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut out = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let status = wait_child(&mut child, limit).or_else(|| {
        // SAFETY: kill(2) on the PID of our own unreaped child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        None
    })?;
    Some((status.success(), reader.join().unwrap_or_default()))
}

fn run_quiet(cmd: &mut Command) -> bool {
    matches!(run_bounded(cmd, WAIT), Some((true, _)))
}

/// Waits (bounded) for a child to exit.
fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

// ---------------------------------------------------------------------------
// A small JSON reader for nbdinfo, qemu-img and fio output (the crate has no
// JSON dependency, and these tests must not add one).
// ---------------------------------------------------------------------------

/// JSON printed by the tools, with accessors that fail the test loudly.
#[derive(Debug, Clone, PartialEq)]
struct Json(serde_json::Value);

impl Json {
    /// Parses the first JSON value in `text`; what follows it is ignored.
    fn parse(text: &str) -> Json {
        let first = serde_json::Deserializer::from_str(text)
            .into_iter::<serde_json::Value>()
            .next();
        match first {
            Some(Ok(v)) => Json(v),
            other => panic!("no JSON value in {text:?}: {other:?}"),
        }
    }

    fn get(&self, key: &str) -> Json {
        match self.0.get(key) {
            Some(v) => Json(v.clone()),
            None => panic!("no {key:?} in JSON {}", self.0),
        }
    }

    fn items(&self) -> Vec<Json> {
        match self.0.as_array() {
            Some(items) => items.iter().cloned().map(Json).collect(),
            None => panic!("expected a JSON array, got {}", self.0),
        }
    }

    fn u64(&self) -> u64 {
        self.0
            .as_u64()
            .unwrap_or_else(|| panic!("expected a JSON non-negative integer, got {}", self.0))
    }

    fn bool(&self) -> bool {
        self.0
            .as_bool()
            .unwrap_or_else(|| panic!("expected a JSON boolean, got {}", self.0))
    }

    fn str(&self) -> String {
        self.0
            .as_str()
            .unwrap_or_else(|| panic!("expected a JSON string, got {}", self.0))
            .to_owned()
    }
}

#[test]
fn the_json_reader_takes_the_first_value_and_ignores_what_follows() {
    let v = Json::parse("{\"a\": [1, true], \"b\": \"x\"}trailing");
    assert_eq!(v.get("a").items().len(), 2);
    assert!(v.get("a").items()[1].bool());
    assert_eq!(v.get("b").str(), "x");
}

// ---------------------------------------------------------------------------
// nbdinfo
// ---------------------------------------------------------------------------

fn nbdinfo_json(args: &[&str], uri: &str) -> Json {
    let out = run_ok(Command::new("nbdinfo").arg("--json").args(args).arg(uri));
    Json::parse(&out)
}

/// A second backing file outside the daemon's directory (which only exists
/// once the daemon has started), filled with `fill`.
fn second_disk(len: u64, fill: u8) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("replblk-clients-")
        .tempdir_in(test_base_dir())
        .expect("temp dir");
    let path = dir.path().join("r1.img");
    fs::write(&path, vec![fill; len as usize]).expect("second disk");
    (dir, path)
}

#[test]
fn nbdinfo_reports_the_size_flags_and_block_sizes_of_a_writable_export() {
    let mut daemon = Daemon::start();
    let info = nbdinfo_json(&[], &daemon.uri());
    assert_eq!(info.get("protocol").str(), "newstyle-fixed");
    let exports = info.get("exports").items();
    assert_eq!(exports.len(), 1, "{info:?}");
    let e = &exports[0];
    assert_eq!(e.get("export-name").str(), "r0");
    assert_eq!(e.get("description").str(), "test volume");
    assert_eq!(e.get("export-size").u64(), 64 * MIB);
    assert!(!e.get("is_read_only").bool(), "{e:?}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_cache",
    ] {
        assert!(e.get(flag).bool(), "{flag} should be true: {e:?}");
    }
    assert_eq!(e.get("block_size_minimum").u64(), 1);
    assert_eq!(e.get("block_size_preferred").u64(), 4096);
    assert_eq!(e.get("block_size_maximum").u64(), 32 * MIB);
    stop_cleanly(&mut daemon);
}

#[test]
fn nbdinfo_list_shows_every_export_with_its_description_and_size() {
    let (_keep, disk) = second_disk(16 * MIB, 0);
    let mut daemon = Daemon::builder()
        .config_extra(&format!(
            "\n[[resource]]\nname = \"second\"\ndisk = {:?}\nsize = {}\ndefault = true\n\
             description = \"second \\\"volume\\\" – größer\"\n",
            disk.display().to_string(),
            8 * MIB
        ))
        .start();
    let list = nbdinfo_json(&["--list"], &format!("nbd://127.0.0.1:{}", daemon.port));
    let exports = list.get("exports").items();
    let mut seen: Vec<(String, String, u64)> = exports
        .iter()
        .map(|e| {
            (
                e.get("export-name").str().to_owned(),
                e.get("description").str().to_owned(),
                e.get("export-size").u64(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("r0".to_owned(), "test volume".to_owned(), 64 * MIB),
            (
                "second".to_owned(),
                "second \"volume\" – größer".to_owned(),
                8 * MIB
            ),
        ],
        "{list:?}"
    );
    // The empty export name reaches the resource marked default.
    let default = nbdinfo_json(&[], &format!("nbd://127.0.0.1:{}", daemon.port));
    let e = &default.get("exports").items()[0];
    assert_eq!(e.get("export-size").u64(), 8 * MIB, "{default:?}");
    // An unknown name is refused, and the daemon carries on.
    let (ok, _, err) = run_tool(Command::new("nbdinfo").arg(daemon.uri_for("no-such-export")));
    assert!(!ok, "nbdinfo of an unknown export succeeded");
    assert!(err.contains("no-such-export"), "{err}");
    assert!(daemon.is_running());
    stop_cleanly(&mut daemon);
}

#[test]
fn a_read_only_export_is_shown_read_only_and_refuses_writes_from_every_client() {
    let (_keep, disk) = second_disk(16 * MIB, 0x5a);
    let mut daemon = Daemon::builder()
        .config_extra(&format!(
            "\n[[resource]]\nname = \"ro\"\ndisk = {:?}\nread_only = true\ndescription = \"read-only volume\"\n",
            disk.display().to_string()
        ))
        .start();
    let dir = daemon.dir.path().to_owned();
    let ro = daemon.uri_for("ro");

    let info = nbdinfo_json(&[], &ro);
    let e = &info.get("exports").items()[0];
    assert!(e.get("is_read_only").bool(), "{e:?}");
    assert!(!e.get("can_trim").bool(), "{e:?}");
    assert!(!e.get("can_zero").bool(), "{e:?}");
    assert_eq!(e.get("export-size").u64(), 16 * MIB);
    let list = nbdinfo_json(&["--list"], &format!("nbd://127.0.0.1:{}", daemon.port));
    let listed: Vec<(String, bool)> = list
        .get("exports")
        .items()
        .iter()
        .map(|e| (e.get("export-name").str(), e.get("is_read_only").bool()))
        .collect();
    assert!(listed.contains(&("ro".into(), true)), "{listed:?}");
    assert!(listed.contains(&("r0".into(), false)), "{listed:?}");

    // qemu-io refuses to open it for writing.
    let (ok, out, err) = run_tool(
        Command::new("qemu-io")
            .current_dir(&dir)
            .args(["-f", "raw", "-c", "write -P 0x11 0 4096"])
            .arg(&ro),
    );
    assert!(!ok, "qemu-io write to a read-only export succeeded:\n{out}");
    let text = format!("{out}{err}").to_lowercase();
    assert!(
        text.contains("permission denied")
            || text.contains("read-only")
            || text.contains("read only"),
        "{out}{err}"
    );
    // ...but reads it fine.
    qemu_io(&dir, &ro, &["-r"], &["read -P 0x5a 0 16M".to_owned()]);

    // nbdcopy will not write to it either.
    let src = dir.join("src.img");
    fs::write(&src, vec![0x11u8; MIB as usize]).expect("src");
    let (ok, _, err) = run_tool(Command::new("nbdcopy").arg(&src).arg(&ro));
    assert!(!ok, "nbdcopy to a read-only export succeeded");
    assert!(err.contains("read-only"), "{err}");

    // A client that ignores the flag gets EPERM for every kind of write.
    let mut c = Client::connect(&daemon.addr(), "ro");
    assert_eq!(c.write(0, &[1u8; 512]), errno::EPERM);
    assert_eq!(
        c.call(NbdCommand::WriteZeroes, 0, 0, 4096, &[]),
        errno::EPERM
    );
    assert_eq!(c.call(NbdCommand::Trim, 0, 4096, 4096, &[]), errno::EPERM);
    assert_eq!(c.read(0, 4096), Ok(vec![0x5a; 4096]));
    c.disconnect();

    // The writable export next to it still takes writes.
    qemu_io(
        &dir,
        &daemon.uri(),
        &[],
        &[
            "write -P 0x77 0 64k".to_owned(),
            "read -P 0x77 0 64k".to_owned(),
        ],
    );

    stop_cleanly(&mut daemon);
    assert_same_bytes(
        &read_file(&disk),
        &vec![0x5a; 16 * MIB as usize],
        "read-only backing file",
    );
}

#[test]
fn clients_reach_the_same_export_over_the_unix_socket() {
    let mut daemon = Daemon::builder().unix_socket().start();
    let dir = daemon.dir.path().to_owned();
    let unix = format!("nbd+unix:///r0?socket={}", daemon.socket.display());
    let info = nbdinfo_json(&[], &unix);
    let e = &info.get("exports").items()[0];
    assert_eq!(e.get("export-size").u64(), 64 * MIB, "{info:?}");
    assert!(!e.get("is_read_only").bool(), "{info:?}");
    // Written over the socket, read over TCP, and the other way round.
    qemu_io(
        &dir,
        &unix,
        &[],
        &[format!("write -P 0x3c {} 65541", MIB + 1)],
    );
    qemu_io(
        &dir,
        &daemon.uri(),
        &[],
        &[
            format!("read -P 0x3c {} 65541", MIB + 1),
            "write -P 0x4d 7 4096".to_owned(),
        ],
    );
    qemu_io(&dir, &unix, &[], &["read -P 0x4d 7 4096".to_owned()]);
    stop_cleanly(&mut daemon);
    assert!(
        !daemon.socket.exists(),
        "the unix socket is left behind after a clean stop"
    );
}

// ---------------------------------------------------------------------------
// qemu-io
// ---------------------------------------------------------------------------

/// Runs one qemu-io process with `cmds` against `uri`. Every command must
/// succeed (and every read -P must match).
fn qemu_io(dir: &Path, uri: &str, opts: &[&str], cmds: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.current_dir(dir).args(["-f", "raw"]).args(opts);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri);
    let (ok, out, err) = run_tool(&mut cmd);
    let shown = || format!("qemu-io {cmds:?}\nstdout:\n{out}\nstderr:\n{err}");
    assert!(ok, "qemu-io failed: {}", shown());
    assert!(
        !out.contains("verification failed") && !err.contains("verification failed"),
        "{}",
        shown()
    );
    let done = out
        .lines()
        .filter(|l| l.starts_with("wrote ") || l.starts_with("read ") || l.starts_with("discard "))
        .count();
    let expected = cmds
        .iter()
        .filter(|c| !c.starts_with("flush") && !c.starts_with("aio_flush"))
        .count();
    assert_eq!(
        done,
        expected,
        "not every command reported success: {}",
        shown()
    );
    out
}

/// What the device should hold: one byte per device byte.
struct Model(Vec<u8>);

impl Model {
    fn fill(&mut self, off: u64, len: u64, byte: u8) {
        self.0[off as usize..(off + len) as usize].fill(byte);
    }

    /// `read -P` commands covering the whole device, one per run of equal
    /// bytes, so overlaps are checked byte for byte.
    fn verify_commands(&self) -> Vec<String> {
        let mut cmds = Vec::new();
        let mut start = 0;
        while start < self.0.len() {
            let byte = self.0[start];
            let len = run_length(&self.0[start..], byte);
            cmds.push(format!("read -P {byte:#04x} {start} {len}"));
            start += len;
        }
        cmds
    }
}

#[test]
fn qemu_io_pattern_writes_at_unaligned_offsets_read_back_the_last_written_bytes() {
    let mut daemon = Daemon::start();
    let dir = daemon.dir.path().to_owned();
    let uri = daemon.uri();
    let size = 64 * MIB;
    let mut model = Model(vec![0; size as usize]);

    // (offset, length); later writes overlap earlier ones on purpose.
    let writes: [(u64, u64); 20] = [
        (0, 4097),
        (1, 7),
        (511, 512),
        (4095, 4096),
        (4097, 65536 + 5),
        (65535, 1),
        (65535 + 2, 7),
        (MIB + 3, MIB),
        (2 * MIB - 5, 4 * MIB + 1),
        (3 * MIB + 1, 512),
        (10 * MIB + 4095, 4 * MIB + 1),
        (12 * MIB, MIB),
        (20 * MIB + 1, 4096),
        (20 * MIB + 4097, 4097),
        (size - 4 * MIB - 1, 4 * MIB + 1),
        (size - 4097, 4097),
        (size - 512 - 3, 512),
        (size - 7, 7),
        (size - 1, 1),
        (30 * MIB + 3, 1),
    ];
    let patterns: Vec<u8> = (0..writes.len())
        .map(|i| 0x11u8.wrapping_add((i as u8).wrapping_mul(0x1d)))
        .collect();
    assert!(patterns.iter().all(|&p| p != 0));
    let mut cmds: Vec<String> = Vec::new();
    for (&(off, len), &p) in writes.iter().zip(&patterns) {
        cmds.push(format!("write -P {p:#04x} {off} {len}"));
        model.fill(off, len, p);
    }
    // Two processes (two connections) for the writes, then a third reads
    // everything back.
    let (first, second) = cmds.split_at(cmds.len() / 2);
    qemu_io(&dir, &uri, &[], first);
    let mut second = second.to_vec();
    second.push("flush".into());
    qemu_io(&dir, &uri, &[], &second);
    // Many requests in flight on one connection (some with FUA), replies
    // in any order; the ranges do not overlap, so the result is defined.
    let mut aio = Vec::new();
    for i in 0..12u64 {
        let (off, len) = (40 * MIB + i * MIB + i * 3, MIB - 7 - i * 4093);
        let p = 0x80 + i as u8;
        let fua = if i % 2 == 1 { "-f " } else { "" };
        aio.push(format!("aio_write {fua}-P {p:#04x} {off} {len}"));
        model.fill(off, len, p);
    }
    aio.push("aio_flush".into());
    for i in 0..12u64 {
        let (off, len) = (40 * MIB + i * MIB + i * 3, MIB - 7 - i * 4093);
        aio.push(format!("aio_read -P {:#04x} {off} {len}", 0x80 + i as u8));
    }
    aio.push("aio_flush".into());
    qemu_io(&dir, &uri, &[], &aio);

    let verify = model.verify_commands();
    assert!(verify.len() > writes.len(), "{verify:?}");
    qemu_io(&dir, &uri, &[], &verify);

    // A wrong pattern must be noticed, or the reads above prove nothing.
    let (ok, out, _) = run_tool(
        Command::new("qemu-io")
            .current_dir(&dir)
            .args([
                "-f",
                "raw",
                "-c",
                &format!("read -P {:#04x} 0 4097", patterns[1]),
            ])
            .arg(&uri),
    );
    assert!(!ok && out.contains("verification failed"), "{out}");

    // Zeroing, with and without permission to unmap, aligned or not, and
    // discards of aligned ranges (which punch holes in the backing file).
    let zeroing: [(&str, u64, u64); 7] = [
        ("write -z", 1000, 5000),
        ("write -z", 10 * MIB + 4095 - 100, 300),
        ("write -z -u", 12 * MIB, MIB),
        ("write -z -u", 20 * MIB + 3, 4096 + 7),
        ("discard", 4 * MIB, MIB),
        ("discard", size - 64 * 1024, 64 * 1024),
        ("write -z", size - 3, 3),
    ];
    let mut cmds = Vec::new();
    for &(op, off, len) in &zeroing {
        cmds.push(format!("{op} {off} {len}"));
        model.fill(off, len, 0);
    }
    qemu_io(&dir, &uri, &[], &cmds);
    let zero_reads: Vec<String> = zeroing
        .iter()
        .map(|&(_, off, len)| format!("read -P 0 {off} {len}"))
        .collect();
    qemu_io(&dir, &uri, &[], &zero_reads);
    qemu_io(&dir, &uri, &[], &model.verify_commands());

    stop_cleanly(&mut daemon);
    assert_same_bytes(&read_file(&daemon.disk), &model.0, "backing file");
}

// ---------------------------------------------------------------------------
// qemu-img
// ---------------------------------------------------------------------------

#[test]
fn qemu_img_convert_writes_an_image_that_compares_equal_and_converts_back_out() {
    let mut daemon = Daemon::start();
    let dir = daemon.dir.path().to_owned();
    let uri = daemon.uri();
    let len = 32 * MIB;
    // Dirty the target so the image's zero runs must really be written.
    qemu_io(&dir, &uri, &[], &[format!("write -P 0xee 0 {len}")]);

    let src = dir.join("src.img");
    let data = write_image_with_zero_runs(&src, len, 1);
    let info = Json::parse(&run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "raw"])
            .arg(&uri),
    ));
    assert_eq!(info.get("virtual-size").u64(), 64 * MIB, "{info:?}");

    run_ok(
        Command::new("qemu-img")
            .current_dir(&dir)
            .args(["convert", "-n", "-W", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    run_ok(
        Command::new("qemu-img")
            .current_dir(&dir)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );

    let out = dir.join("out.img");
    run_ok(
        Command::new("qemu-img")
            .current_dir(&dir)
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&out),
    );
    let mut expected = data.clone();
    expected.resize(64 * MIB as usize, 0);
    assert_same_bytes(&read_file(&out), &expected, "image converted back out");

    // compare must notice a one-byte change, or its success means nothing.
    qemu_io(
        &dir,
        &uri,
        &[],
        &[format!("write -P 0x01 {} 1", 20 * MIB + 7)],
    );
    let (ok, stdout, _) = run_tool(
        Command::new("qemu-img")
            .current_dir(&dir)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    assert!(!ok, "qemu-img compare missed a changed byte: {stdout}");
    // It reports the start of the first differing 512-byte sector.
    assert!(
        stdout.contains(&format!("Content mismatch at offset {}", 20 * MIB)),
        "{stdout}"
    );
    expected[(20 * MIB + 7) as usize] = 0x01;

    stop_cleanly(&mut daemon);
    assert_same_bytes(&read_file(&daemon.disk), &expected, "backing file");
}

// ---------------------------------------------------------------------------
// nbdcopy
// ---------------------------------------------------------------------------

#[test]
fn nbdcopy_over_four_connections_copies_an_image_in_and_back_out() {
    let mut daemon = Daemon::start();
    let dir = daemon.dir.path().to_owned();
    let uri = daemon.uri();
    let len = 32 * MIB;
    qemu_io(&dir, &uri, &[], &[format!("write -P 0xee 0 {len}")]);
    let src = dir.join("src.img");
    let data = write_image_with_zero_runs(&src, len, 2);

    let before = connections_opened(&daemon);
    run_ok(
        Command::new("nbdcopy")
            .current_dir(&dir)
            // nbdcopy opens no more connections than it has threads, and
            // defaults to one thread per core.
            .args(["--connections=4", "--threads=4", "--requests=16", "--flush"])
            .arg(&src)
            .arg(&uri),
    );
    let writing = connections_opened(&daemon) - before;
    assert!(
        writing >= 4,
        "nbdcopy opened {writing} connection(s) to write"
    );

    let out = dir.join("out.img");
    let before = connections_opened(&daemon);
    run_ok(
        Command::new("nbdcopy")
            .current_dir(&dir)
            .args(["--connections=4", "--threads=4"])
            .arg(&uri)
            .arg(&out),
    );
    let reading = connections_opened(&daemon) - before;
    assert!(
        reading >= 4,
        "nbdcopy opened {reading} connection(s) to read"
    );

    let mut expected = data;
    expected.resize(64 * MIB as usize, 0);
    assert_same_bytes(&read_file(&out), &expected, "image copied back out");

    let log = stop_cleanly(&mut daemon);
    assert!(log.matches("connection opened").count() >= 9, "{log}");
    assert_same_bytes(&read_file(&daemon.disk), &expected, "backing file");
}

// ---------------------------------------------------------------------------
// fio
// ---------------------------------------------------------------------------

/// Runs fio's nbd engine against the daemon; returns (success, jobs, all
/// output).
fn fio(daemon: &Daemon, args: &[&str]) -> (bool, Vec<Json>, String) {
    let (ok, out, err) = run_tool(
        Command::new("fio")
            .current_dir(daemon.dir.path())
            .args(["--name=v", "--ioengine=nbd", "--output-format=json"])
            .arg(format!("--uri={}", daemon.uri()))
            .args(args),
    );
    let text = format!("stdout:\n{out}\nstderr:\n{err}");
    // fio may print lines such as "fio: connected to NBD server" first.
    let start = out
        .find("\n{")
        .map(|i| i + 1)
        .or_else(|| out.starts_with('{').then_some(0))
        .unwrap_or_else(|| panic!("no JSON in fio's output: {text}"));
    let report = Json::parse(&out[start..]);
    let jobs = report.get("jobs").items().to_vec();
    assert!(!jobs.is_empty(), "{text}");
    (ok, jobs, text)
}

/// Runs write-then-verify fio jobs; each must finish without an error,
/// having written `per_job` bytes and read back and verified all of them.
fn fio_verified(daemon: &Daemon, args: &[&str], jobs: usize, per_job: u64) {
    let (ok, report, text) = fio(daemon, args);
    assert!(ok, "fio failed: {text}");
    assert!(!text.contains("verify failed"), "{text}");
    assert_eq!(report.len(), jobs, "{text}");
    for job in &report {
        assert_eq!(job.get("error").u64(), 0, "{text}");
        let written = job.get("write").get("io_bytes").u64();
        let verified = job.get("read").get("io_bytes").u64();
        assert_eq!(written, per_job, "{text}");
        assert_eq!(
            verified, written,
            "fio did not read back what it wrote: {text}"
        );
    }
}

const FIO_VERIFY: [&str; 5] = [
    "--size=32m",
    "--verify=crc32c",
    "--do_verify=1",
    "--verify_fatal=1",
    "--randrepeat=1",
];

#[test]
fn fio_random_4k_writes_at_queue_depth_16_verify_with_crc32c() {
    let mut daemon = Daemon::start();
    let mut args = vec!["--rw=randwrite", "--bs=4k", "--iodepth=16"];
    args.extend(FIO_VERIFY);
    fio_verified(&daemon, &args, 1, 32 * MIB);
    stop_cleanly(&mut daemon);
}

#[test]
fn fio_random_writes_of_mixed_sizes_from_512_bytes_to_64k_verify_with_crc32c() {
    let mut daemon = Daemon::start();
    let mut args = vec!["--rw=randwrite", "--bsrange=512-64k", "--iodepth=16"];
    args.extend(FIO_VERIFY);
    fio_verified(&daemon, &args, 1, 32 * MIB);
    stop_cleanly(&mut daemon);
}

#[test]
fn fio_sequential_1m_writes_verify_and_a_later_verify_only_run_catches_corruption() {
    let mut daemon = Daemon::start();
    let mut args = vec!["--rw=write", "--bs=1M", "--iodepth=8"];
    args.extend(FIO_VERIFY);
    fio_verified(&daemon, &args, 1, 32 * MIB);

    // A new process (new connection) verifies what the first one left.
    let mut verify_only = args.clone();
    verify_only.push("--verify_only=1");
    let (ok, jobs, text) = fio(&daemon, &verify_only);
    assert!(ok && jobs[0].get("error").u64() == 0, "{text}");
    assert_eq!(
        jobs[0].get("read").get("io_bytes").u64(),
        32 * MIB,
        "{text}"
    );

    // Overwrite 100 bytes in the third block: verification must now fail.
    qemu_io(
        daemon.dir.path(),
        &daemon.uri(),
        &[],
        &["write -P 0x5a 3000000 100".to_owned()],
    );
    let (ok, jobs, text) = fio(&daemon, &verify_only);
    assert!(!ok, "fio verified corrupted data: {text}");
    assert_ne!(jobs[0].get("error").u64(), 0, "{text}");
    assert!(text.contains("verify failed"), "{text}");

    stop_cleanly(&mut daemon);
}

#[test]
fn fio_four_jobs_on_four_connections_each_write_and_verify_their_own_region() {
    let mut daemon = Daemon::start();
    let before = connections_opened(&daemon);
    fio_verified(
        &daemon,
        &[
            "--rw=randwrite",
            "--bsrange=4k-128k",
            "--iodepth=32",
            "--numjobs=4",
            "--size=16m",
            "--offset_increment=16m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
        4,
        16 * MIB,
    );
    let opened = connections_opened(&daemon) - before;
    assert!(opened >= 4, "fio opened {opened} connection(s)");
    stop_cleanly(&mut daemon);
}

// ---------------------------------------------------------------------------
// nbdfuse + loop device + ext4
// ---------------------------------------------------------------------------

/// True if `path` (canonical) is a mount point.
fn is_mounted(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mount_point| mount_point == want)
}

/// Loop devices whose backing file is `image` (canonical path).
fn loop_devices_backed_by(image: &Path) -> Vec<PathBuf> {
    let mut devices = Vec::new();
    let want = image.to_string_lossy();
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return devices;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(backing) = fs::read_to_string(entry.path().join("loop/backing_file")) {
            let backing = backing.trim_end();
            if backing == want || backing.strip_suffix(" (deleted)") == Some(&*want) {
                devices.push(Path::new("/dev").join(&name));
            }
        }
    }
    devices
}

/// nbdfuse exposing the export as `fuse_dir/nbd`, and `mnt` where a file
/// system on it is loop-mounted. Dropping it undoes whatever is still set
/// up, in order: the loop mount, any loop device left on the FUSE file, the
/// FUSE mount, nbdfuse itself (by PID), then the directories.
struct FuseStack {
    root: PathBuf,
    fuse_dir: PathBuf,
    image: PathBuf,
    mnt: PathBuf,
    nbdfuse: Option<Child>,
}

impl FuseStack {
    fn new() -> FuseStack {
        let root = tempfile::Builder::new()
            .prefix("replblk-fuse-")
            .tempdir_in(test_base_dir())
            .expect("temp dir")
            .keep();
        let root = fs::canonicalize(&root).expect("canonical temp dir");
        let fuse_dir = root.join("fuse");
        let mnt = root.join("mnt");
        fs::create_dir(&fuse_dir).expect("fuse dir");
        fs::create_dir(&mnt).expect("mount dir");
        FuseStack {
            image: fuse_dir.join("nbd"),
            root,
            fuse_dir,
            mnt,
            nbdfuse: None,
        }
    }

    /// Starts nbdfuse in the foreground as our child and waits (bounded)
    /// until the virtual file is there with the export's size.
    fn start_nbdfuse(&mut self, uri: &str, size: u64) {
        let pidfile = self.root.join("nbdfuse.pid");
        let log = self.root.join("nbdfuse.log");
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&self.fuse_dir)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("nbdfuse log"))
            .spawn()
            .expect("spawn nbdfuse");
        self.nbdfuse = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            let ready = fs::read_to_string(&pidfile).is_ok_and(|p| !p.trim().is_empty())
                && is_mounted(&self.fuse_dir)
                && fs::metadata(&self.image).is_ok_and(|m| m.len() == size);
            if ready {
                return;
            }
            if let Some(Ok(Some(status))) = self.nbdfuse.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "nbdfuse exited with {status}: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nbdfuse did not expose {} within {WAIT:?}",
                self.image.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for nbdfuse to exit after its mount went away.
    fn wait_nbdfuse(&mut self) -> ExitStatus {
        let child = self.nbdfuse.as_mut().expect("nbdfuse was started");
        let status = wait_child(child, WAIT).expect("nbdfuse exits after fusermount3 -u");
        self.nbdfuse = None;
        status
    }

    fn mount(&self) {
        run_ok(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&self.image)
                .arg(&self.mnt),
        );
    }

    fn umount(&self) {
        run_ok(Command::new("umount").arg(&self.mnt));
        assert!(!is_mounted(&self.mnt));
    }
}

impl Drop for FuseStack {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) && !run_quiet(Command::new("umount").arg(&self.mnt)) {
            run_quiet(Command::new("umount").arg("-l").arg(&self.mnt));
        }
        for device in loop_devices_backed_by(&self.image) {
            run_quiet(Command::new("losetup").arg("-d").arg(&device));
        }
        if is_mounted(&self.fuse_dir)
            && !run_quiet(Command::new("fusermount3").arg("-u").arg(&self.fuse_dir))
        {
            run_quiet(Command::new("fusermount3").arg("-uz").arg(&self.fuse_dir));
        }
        if let Some(mut child) = self.nbdfuse.take() {
            if wait_child(&mut child, Duration::from_secs(5)).is_none() {
                // SAFETY: kill(2) on the PID of our own unreaped child.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                if wait_child(&mut child, Duration::from_secs(2)).is_none() {
                    // SAFETY: as above.
                    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                    let _ = child.wait();
                }
            }
        }
        if is_mounted(&self.mnt) || is_mounted(&self.fuse_dir) {
            eprintln!(
                "warning: leaving {} in place: something is still mounted there",
                self.root.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

#[test]
fn ext4_on_an_nbdfuse_file_survives_loop_mount_fsck_and_remount() {
    let size = 256 * MIB;
    let mut daemon = Daemon::builder().disk_size(size).start();
    // Declared after the daemon, so it is torn down first.
    let mut stack = FuseStack::new();
    stack.start_nbdfuse(&daemon.uri(), size);

    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&stack.image),
    );
    stack.mount();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("one-byte", vec![0x42]),
        ("hello.txt", b"hello from replblk\n".to_vec()),
        ("random-3M+17", random_bytes(3 * MIB as usize + 17, 10)),
        ("random-8M", random_bytes(8 * MIB as usize, 11)),
        (
            "counter-5M",
            (0..5 * MIB as usize / 4)
                .flat_map(|i| (i as u32).to_le_bytes())
                .collect(),
        ),
        ("dir/nested/random-100k", random_bytes(100 * 1024, 12)),
    ];
    for (name, content) in &files {
        let path = stack.mnt.join(name);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, content).unwrap_or_else(|e| panic!("write {name}: {e}"));
    }
    run_ok(&mut Command::new("sync"));
    stack.umount();
    run_ok(Command::new("e2fsck").arg("-fn").arg(&stack.image));

    stack.mount();
    for (name, content) in &files {
        assert_same_bytes(&read_file(&stack.mnt.join(name)), content, name);
    }
    stack.umount();
    assert!(
        loop_devices_backed_by(&stack.image).is_empty(),
        "a loop device stayed attached after umount"
    );
    run_ok(Command::new("fusermount3").arg("-u").arg(&stack.fuse_dir));
    let status = stack.wait_nbdfuse();
    assert!(status.success(), "nbdfuse exited with {status}");
    drop(stack);

    stop_cleanly(&mut daemon);
    // What reached the backing file is a clean file system with the files.
    run_ok(Command::new("e2fsck").arg("-fn").arg(&daemon.disk));
    for (name, content) in &files {
        let dumped = daemon.dir.path().join("dumped");
        let _ = fs::remove_file(&dumped);
        run_ok(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("dump /{name} {}", dumped.display()))
                .arg(&daemon.disk),
        );
        assert_same_bytes(
            &read_file(&dumped),
            content,
            &format!("{name} in the backing file"),
        );
    }
}
