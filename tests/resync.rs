//! The resync engine end to end: two real `repld` processes, a Primary
//! written to while its peer is away, then the resync: bytes moved
//! against bytes dirtied (from `status --json`), interrupted syncs that
//! resume from the bitmap, application writes during a sync, zero runs
//! sent as write-zeroes, checksum-based resync and the rate at run time.
//!
//! Every wait is bounded; daemons are stopped by PID (also on failure, by
//! `Pair`'s Drop) and temporary files removed.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

use common::client::Client;
use common::pair::{read_disk, Pair, ALPHA, BETA};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

fn resync(pair: &Pair, node: &str) -> Value {
    pair.status(node).raw["resources"][0]["resync"].clone()
}

fn field(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("no integer {k} in {v}"))
}

/// Writes `count` distinct random 4 KiB blocks of random data within
/// `[0, span)` through the Primary; returns the blocks.
fn scatter(pair: &Pair, seed: u64, count: usize, span: u64) -> BTreeSet<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut blocks = BTreeSet::new();
    while blocks.len() < count {
        blocks.insert(rng.gen_range(0..span / BLOCK));
    }
    let mut client = Client::connect(&pair.primary_addr(), "r0");
    let mut buf = vec![0u8; BLOCK as usize];
    for &b in &blocks {
        rng.fill_bytes(&mut buf);
        assert_eq!(client.write(b * BLOCK, &buf), 0, "write at block {b}");
    }
    assert_eq!(client.flush(), 0);
    client.disconnect();
    blocks
}

/// Everything `child` prints on stdout until it exits (killed by PID
/// after `limit`); panics if it fails.
fn wait_output(mut child: std::process::Child, limit: Duration) -> String {
    use std::io::Read;
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{child:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = reader.join().unwrap_or_default();
    assert!(status.success(), "{status}: {out}");
    out
}

fn stop_both(pair: &mut Pair) {
    pair.stop(ALPHA);
    pair.stop(BETA);
    pair.assert_no_panic();
}

fn assert_disks_identical(pair: &Pair) {
    let a = read_disk(&pair.alpha().disk);
    let b = read_disk(&pair.beta().disk);
    assert_eq!(a.len(), b.len(), "backing files differ in size");
    if let Some(i) = a
        .chunks(BLOCK as usize)
        .zip(b.chunks(BLOCK as usize))
        .position(|(x, y)| x != y)
    {
        let n = a
            .chunks(BLOCK as usize)
            .zip(b.chunks(BLOCK as usize))
            .filter(|(x, y)| x != y)
            .count();
        panic!(
            "the backing files differ in {n} 4 KiB blocks, first at {}",
            i as u64 * BLOCK
        );
    }
}

/// Disconnects alpha (the Primary) from its peer and waits until both
/// see it.
fn cut(pair: &Pair) {
    pair.ok(ALPHA, &["disconnect", "r0"]);
    pair.wait_status(BETA, "losing alpha", |s| !s.connected());
}

fn wait_sync(pair: &Pair, secs: u64) {
    pair.ok(ALPHA, &["wait-sync", "r0", "--timeout", &secs.to_string()]);
}

#[test]
fn scattered_writes_while_disconnected_resync_moving_what_was_dirtied_and_copies_end_identical() {
    let mut pair = Pair::builder().disk_size(128 * MIB).start();
    cut(&pair);
    let blocks = scatter(&pair, 1, 2048, 128 * MIB);
    let dirtied = blocks.len() as u64 * BLOCK;
    let s = pair.status(ALPHA);
    assert_eq!(s.out_of_sync_bytes, dirtied, "{s:?}");
    pair.ok(ALPHA, &["connect", "r0"]);
    wait_sync(&pair, 60);
    let r = resync(&pair, ALPHA);
    let moved = field(&r, "moved_bytes");
    assert!(
        moved >= dirtied && moved as f64 <= dirtied as f64 * 1.05,
        "moved {moved} for {dirtied} dirtied: {r}"
    );
    assert_eq!(field(&r, "done_bytes"), dirtied, "{r}");
    assert_eq!(field(&r, "total_bytes"), dirtied, "{r}");
    assert_eq!(field(&r, "finished"), 1, "{r}");
    assert_eq!(r["active"], Value::Bool(false), "{r}");
    assert_eq!(pair.status(ALPHA).out_of_sync_bytes, 0);
    stop_both(&mut pair);
    assert_disks_identical(&pair);
}

/// Which 4 KiB pages of `path` the page cache holds (`mincore` on a
/// mapping of it, which does not read anything in).
fn cached_pages(path: &std::path::Path) -> Vec<bool> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(path).expect("open for mincore");
    let len = f.metadata().expect("stat").len() as usize;
    let pages = len.div_ceil(BLOCK as usize);
    // SAFETY: a read-only shared mapping of a file we hold open, never
    // dereferenced; mincore writes one byte per page into `vec`, which
    // has that many; the mapping is removed before returning.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            map,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let mut vec = vec![0u8; pages];
        let rc = libc::mincore(map, len, vec.as_mut_ptr());
        let err = std::io::Error::last_os_error();
        libc::munmap(map, len);
        assert_eq!(rc, 0, "mincore: {err}");
        vec.iter().map(|b| b & 1 == 1).collect()
    }
}

/// Writes back and drops `path` from the page cache.
fn drop_cached(path: &std::path::Path) {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(path).expect("open to drop");
    f.sync_data().expect("fdatasync");
    // SAFETY: advisory syscall on a descriptor we hold.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
}

/// The resync reads its source without the kernel's readahead, which
/// caches what it reads ahead in large folios: 4 KiB writes into a range
/// cached that way cost several times their usual CPU and latency (a
/// pair's small writes ran about 4x slower after a full sync, until the
/// pages left the cache). Afterwards the source caches what the sync
/// sent, and not the clean blocks after it.
#[test]
fn a_resync_reads_its_source_without_readahead() {
    let mut pair = Pair::builder().disk_size(64 * MIB).start();
    cut(&pair);
    let (from, to) = (16 * MIB, 24 * MIB);
    let mut client = Client::connect(&pair.primary_addr(), "r0");
    let data = vec![0x5a; MIB as usize];
    for at in (from..to).step_by(MIB as usize) {
        assert_eq!(client.write(at, &data), 0, "write at {at}");
    }
    assert_eq!(client.flush(), 0);
    client.disconnect();
    let disk = pair.alpha().disk.clone();
    drop_cached(&disk);
    if cached_pages(&disk).iter().any(|&c| c) {
        eprintln!(
            "skipped: {} stays cached after POSIX_FADV_DONTNEED (tmpfs?)",
            disk.display()
        );
        stop_both(&mut pair);
        return;
    }
    pair.ok(ALPHA, &["connect", "r0"]);
    wait_sync(&pair, 60);
    assert_eq!(field(&resync(&pair, ALPHA), "done_bytes"), to - from);
    let outside: Vec<u64> = cached_pages(&disk)
        .iter()
        .enumerate()
        .filter(|&(i, &c)| c && !(from..to).contains(&(i as u64 * BLOCK)))
        .map(|(i, _)| i as u64 * BLOCK)
        .collect();
    assert!(
        outside.is_empty(),
        "the resync left {} pages outside the {from}..{to} it sent cached on the source, from {} to {}",
        outside.len(),
        outside[0],
        outside[outside.len() - 1]
    );
    stop_both(&mut pair);
    assert_disks_identical(&pair);
}

/// How a sync in progress is cut off.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Interruption {
    /// The link is cut (`disconnect`), then connected again.
    LinkCut,
    /// The target (beta) is SIGKILLed, then started again.
    TargetKilled,
    /// The source (alpha, demoted to Secondary before the sync) is stopped
    /// with SIGTERM, then started again: its bitmap on disk must hold the
    /// progress.
    SourceRestarted,
    /// The source (alpha, Secondary) is SIGKILLed, then started again: its
    /// bitmap as last written during the sync must hold the progress.
    SourceKilled,
}

/// A sync cut off part way: the next one sends what was left, not
/// everything again.
fn interrupted(how: Interruption) {
    use Interruption::*;
    let mut pair = Pair::builder()
        .disk_size(256 * MIB)
        .resync("c_max_rate_mib", "8")
        .resync("c_min_rate_mib", "4")
        .start();
    cut(&pair);
    let blocks = scatter(&pair, 2, 6144, 256 * MIB);
    let dirtied = blocks.len() as u64 * BLOCK;
    let source_stops = matches!(how, SourceRestarted | SourceKilled);
    if source_stops {
        // A Secondary source: a Primary's crash would also mark its
        // activity log's extents, which is another test's business.
        pair.ok(ALPHA, &["demote", "r0"]);
    }
    pair.ok(ALPHA, &["connect", "r0"]);
    // Until a good part (not all) of it is done.
    pair.wait_status(ALPHA, "a third of the sync done", |s| {
        s.raw["resources"][0]["resync"]["done_bytes"]
            .as_u64()
            .is_some_and(|d| d >= dirtied / 3)
    });
    let first;
    let left;
    match how {
        LinkCut | TargetKilled => {
            if how == TargetKilled {
                pair.kill(BETA);
                pair.wait_status(ALPHA, "losing beta", |s| !s.connected());
            } else {
                cut(&pair);
            }
            first = resync(&pair, ALPHA);
            left = pair.status(ALPHA).out_of_sync_bytes;
        }
        SourceRestarted | SourceKilled => {
            if how == SourceKilled {
                pair.kill(ALPHA);
            } else {
                pair.stop(ALPHA);
            }
            // What beta still lacks, as far as beta knows.
            let s = pair.wait_status(BETA, "losing alpha", |s| !s.connected());
            first = Value::String(format!("(alpha stopped; beta: {})", s.raw));
            left = s.out_of_sync_bytes;
        }
    }
    assert!(
        left > 0 && left < dirtied,
        "the cut came too late or too early: {left} of {dirtied} left: {first}"
    );
    match how {
        LinkCut => {
            pair.ok(ALPHA, &["connect", "r0"]);
        }
        TargetKilled => pair.start(BETA),
        SourceRestarted | SourceKilled => pair.start(ALPHA),
    }
    pair.ok(ALPHA, &["resync-rate", "r0", "--max", "0"]);
    wait_sync(&pair, 120);
    let r = resync(&pair, ALPHA);
    let second = field(&r, "moved_bytes");
    // The source counts what it moved over its lifetime: a restarted one
    // only the second attempt, so bound that one by itself.
    let total = if source_stops {
        second
    } else {
        field(&r, "moved_bytes_total")
    };
    let bound = if source_stops { left } else { dirtied };
    // Resent at most what no barrier had made durable yet: a barrier goes
    // every 500 ms (4 MiB at 8 MiB/s) and may take as long again to be
    // flushed on a busy machine; a killed source's bitmap is up to a
    // second older than its progress (8 MiB at most); plus the 5 % margin.
    assert!(
        total as f64 <= bound as f64 * 1.05 + 8.0 * MIB as f64,
        "moved {total} for {bound} left of {dirtied} dirtied: first {first}, then {r}"
    );
    assert!(
        second < dirtied,
        "the second attempt started from zero: {second} of {dirtied}: {r}"
    );
    stop_both(&mut pair);
    assert_disks_identical(&pair);
}

#[test]
fn a_sync_whose_link_is_cut_resumes_where_it_was() {
    interrupted(Interruption::LinkCut);
}

#[test]
fn a_sync_whose_target_is_killed_resumes_where_it_was_after_the_restart() {
    interrupted(Interruption::TargetKilled);
}

#[test]
fn a_sync_whose_source_is_restarted_resumes_where_it_was() {
    interrupted(Interruption::SourceRestarted);
}

#[test]
fn a_sync_whose_source_is_killed_resumes_from_its_bitmap_on_disk() {
    interrupted(Interruption::SourceKilled);
}

#[test]
fn application_writes_during_a_sync_leave_identical_copies() {
    let mut pair = Pair::builder()
        .disk_size(64 * MIB)
        .resync("c_max_rate_mib", "4")
        .resync("c_min_rate_mib", "2")
        .start();
    cut(&pair);
    scatter(&pair, 3, 4096, 64 * MIB);
    pair.ok(ALPHA, &["connect", "r0"]);
    pair.wait_status(ALPHA, "syncing", |s| {
        s.raw["resources"][0]["resync"]["active"] == Value::Bool(true)
    });
    // Overlapping writes of various sizes while the sync runs: each
    // must win over the resync's older copy of its range.
    let mut rng = StdRng::seed_from_u64(4);
    let mut client = Client::connect(&pair.primary_addr(), "r0");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut writes = 0;
    while Instant::now() < deadline && writes < 3000 {
        let len = BLOCK * rng.gen_range(1..64u64);
        let off = rng.gen_range(0..(64 * MIB - len) / 512) * 512;
        let mut buf = vec![0u8; len as usize];
        rng.fill_bytes(&mut buf);
        assert_eq!(client.write(off, &buf), 0);
        writes += 1;
    }
    assert_eq!(client.flush(), 0);
    client.disconnect();
    assert!(
        resync(&pair, ALPHA)["active"] == Value::Bool(true),
        "the sync ended before the writes did; make it slower"
    );
    // On a terminal (a pty from script(1)), wait-sync redraws a progress
    // line until the sync ends, then prints its answer.
    let replctl = format!(
        "{} --socket {} wait-sync r0 --timeout 60",
        env!("CARGO_BIN_EXE_replctl"),
        pair.alpha().ctl.display()
    );
    let waiter = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &replctl, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script(1)");
    std::thread::sleep(Duration::from_millis(2500));
    pair.ok(ALPHA, &["resync-rate", "r0", "--max", "0"]);
    let out = wait_output(waiter, Duration::from_secs(60));
    assert!(
        out.contains("sync ") && out.contains(" eta ") && out.contains("r0 is in sync"),
        "wait-sync on a terminal printed: {out:?}"
    );
    wait_sync(&pair, 60);
    stop_both(&mut pair);
    assert_disks_identical(&pair);
}

#[test]
fn runs_that_read_as_zeroes_go_as_write_zeroes() {
    let mut pair = Pair::builder().disk_size(64 * MIB).start();
    let mut client = Client::connect(&pair.primary_addr(), "r0");
    assert_eq!(client.write(0, &vec![0xab; 4 * MIB as usize]), 0);
    assert_eq!(client.flush(), 0);
    client.disconnect();
    cut(&pair);
    let mut client = Client::connect(&pair.primary_addr(), "r0");
    // Zeroes written as data: 2 MiB at 0, then 1 MiB of data after it.
    assert_eq!(client.write(0, &vec![0; 2 * MIB as usize]), 0);
    assert_eq!(client.write(2 * MIB, &vec![0xcd; MIB as usize]), 0);
    assert_eq!(client.flush(), 0);
    client.disconnect();
    pair.ok(ALPHA, &["connect", "r0"]);
    wait_sync(&pair, 60);
    let r = resync(&pair, ALPHA);
    assert_eq!(field(&r, "zeroed_bytes"), 2 * MIB, "{r}");
    assert_eq!(field(&r, "moved_bytes"), MIB, "{r}");
    stop_both(&mut pair);
    assert_disks_identical(&pair);
    let b = read_disk(&pair.beta().disk);
    assert!(b[..2 * MIB as usize].iter().all(|&x| x == 0));
    assert!(b[3 * MIB as usize..4 * MIB as usize]
        .iter()
        .all(|&x| x == 0xab));
}

/// Writes `len` bytes of random data (from `seed`) at `at` into alpha's
/// backing file, creates metadata on both fresh nodes, connects them and
/// forces alpha Primary: a full sync starts. Returns the random stream,
/// to go on with.
fn fill_alpha_and_force_full_sync(pair: &mut Pair, seed: u64, at: u64, len: u64) -> StdRng {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len as usize];
    rng.fill_bytes(&mut data);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&pair.alpha().disk)
            .expect("alpha disk");
        f.write_all_at(&data, at).expect("fill");
    }
    for node in [ALPHA, BETA] {
        pair.ok(node, &["create-md", "r0"]);
        pair.ok(node, &["up", "r0"]);
    }
    pair.wait_connected();
    pair.ok(ALPHA, &["promote", "r0", "--force"]);
    rng
}

#[test]
fn a_full_initial_sync_copies_data_and_zeroes_and_reports_progress() {
    // Fresh metadata on both, alpha forced Primary: a full sync.
    let mut pair = Pair::builder()
        .disk_size(64 * MIB)
        .fresh()
        .start_unconnected();
    // Alpha's disk: 24 MiB of data, then zeroes (a sparse file).
    fill_alpha_and_force_full_sync(&mut pair, 5, 8 * MIB, 24 * MIB);
    wait_sync(&pair, 60);
    let r = resync(&pair, ALPHA);
    let size = pair.status(ALPHA).raw["resources"][0]["size"]
        .as_u64()
        .expect("size");
    assert_eq!(field(&r, "done_bytes"), size, "{r}");
    assert_eq!(field(&r, "moved_bytes"), 24 * MIB, "{r}");
    assert_eq!(field(&r, "zeroed_bytes"), size - 24 * MIB, "{r}");
    stop_both(&mut pair);
    assert_disks_identical(&pair);
}

/// A full sync of data streams 1 MiB writes, which the target writes
/// past its page cache from a thread of its own; application writes
/// (large and aligned ones, which take that path too, overlapping each
/// other and the sync's; small and unaligned ones, which do not) must
/// still land in wire order.
#[test]
fn application_writes_during_a_full_sync_of_data_leave_identical_copies() {
    let mut pair = Pair::builder()
        .disk_size(64 * MIB)
        .fresh()
        .resync("c_max_rate_mib", "8")
        .resync("c_min_rate_mib", "4")
        .start_unconnected();
    let mut rng = fill_alpha_and_force_full_sync(&mut pair, 6, 0, 64 * MIB);
    pair.wait_status(ALPHA, "syncing", |s| {
        s.raw["resources"][0]["resync"]["active"] == Value::Bool(true)
    });
    let mut client = Client::connect(&pair.primary_addr(), "r0");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut writes = 0;
    while Instant::now() < deadline && writes < 400 {
        let (len, align) = match writes % 3 {
            0 => (MIB * rng.gen_range(1..3u64), BLOCK),
            1 => (BLOCK * rng.gen_range(16..64u64), BLOCK),
            _ => (BLOCK * rng.gen_range(16..32u64), 512),
        };
        let off = rng.gen_range(0..(64 * MIB - len) / align) * align;
        let mut buf = vec![0u8; len as usize];
        rng.fill_bytes(&mut buf);
        assert_eq!(client.write(off, &buf), 0);
        writes += 1;
    }
    assert_eq!(client.flush(), 0);
    client.disconnect();
    assert!(
        resync(&pair, ALPHA)["active"] == Value::Bool(true),
        "the sync ended before the writes did; make it slower"
    );
    pair.ok(ALPHA, &["resync-rate", "r0", "--max", "0"]);
    wait_sync(&pair, 60);
    // The target did write past its page cache: its backing file is
    // open with O_DIRECT too (where the file system allows it).
    let pid = pair.beta().pid().expect("beta runs");
    let direct = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| {
            let flags = t.lines().find_map(|l| l.strip_prefix("flags:"))?;
            u32::from_str_radix(flags.trim(), 8).ok()
        })
        .any(|f| f & libc::O_DIRECT as u32 != 0);
    let tmpfs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(&pair.beta().disk)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("tmpfs"))
        .unwrap_or(false);
    assert!(direct || tmpfs, "beta has no O_DIRECT descriptor");
    stop_both(&mut pair);
    assert_disks_identical(&pair);
}

#[test]
fn the_rate_can_be_lowered_and_raised_at_run_time() {
    let mut pair = Pair::builder().disk_size(128 * MIB).start();
    pair.ok(ALPHA, &["resync-rate", "r0", "--max", "2", "--min", "1"]);
    let shown = pair.status(ALPHA).raw["resources"][0]["resync_rate"].clone();
    assert_eq!(field(&shown, "max_rate"), 2 * MIB, "{shown}");
    // Refused: a maximum below the minimum.
    let err = pair
        .ctl(ALPHA, &["resync-rate", "r0", "--max", "1", "--min", "4"])
        .unwrap_err();
    assert!(err.contains("below"), "{err}");
    cut(&pair);
    let blocks = scatter(&pair, 6, 4096, 128 * MIB);
    let dirtied = blocks.len() as u64 * BLOCK;
    pair.ok(ALPHA, &["connect", "r0"]);
    pair.wait_status(ALPHA, "syncing", |s| {
        s.raw["resources"][0]["resync"]["active"] == Value::Bool(true)
    });
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let done = field(&resync(&pair, ALPHA), "done_bytes");
    let secs = t0.elapsed().as_secs_f64() + 1.0;
    // At most 2 MiB/s (plus the bucket's depth), however fast the machine.
    assert!(
        (done as f64) < 2.0 * MIB as f64 * secs + 2.0 * MIB as f64,
        "{done} bytes in {secs:.1} s at a 2 MiB/s limit"
    );
    assert!(done < dirtied);
    let answer = pair.ok(ALPHA, &["resync-rate", "r0", "--max", "0"]);
    assert!(answer.contains("unlimited"), "{answer}");
    wait_sync(&pair, 60);
    let r = resync(&pair, ALPHA);
    assert_eq!(field(&r, "done_bytes"), dirtied, "{r}");
    let text = pair.ok(ALPHA, &["status", "r0"]);
    assert!(text.contains("resync: sent"), "{text}");
    stop_both(&mut pair);
    assert_disks_identical(&pair);
}

#[test]
fn events_report_progress_while_syncing() {
    let mut pair = Pair::builder()
        .disk_size(128 * MIB)
        .resync("c_max_rate_mib", "4")
        .resync("c_min_rate_mib", "1")
        .start();
    cut(&pair);
    scatter(&pair, 7, 4096, 128 * MIB);
    let mut watch = common::pair::EventWatch::start(&pair, ALPHA);
    pair.ok(ALPHA, &["connect", "r0"]);
    let ev = watch.wait_for("a progress event while syncing", |v| {
        v["type"] == "progress"
            && v["resync"]["active"] == Value::Bool(true)
            && v["resync"]["done_bytes"].as_u64().is_some_and(|d| d > 0)
            && v["resync"]["rate_bytes_per_sec"]
                .as_u64()
                .is_some_and(|r| r > 0)
            && v["resync"]["eta_secs"].as_u64().is_some()
    });
    assert!(field(&ev["resync"], "total_bytes") >= 16 * MIB, "{ev}");
    let text = pair.ok(ALPHA, &["status", "r0"]);
    assert!(text.contains("sync ") && text.contains("eta"), "{text}");
    pair.ok(ALPHA, &["resync-rate", "r0", "--max", "0"]);
    wait_sync(&pair, 60);
    stop_both(&mut pair);
    assert_disks_identical(&pair);
}

/// Block `b`'s contents in generation `g`.
fn block_data(b: u64, g: u8) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(b * 256 + u64::from(g));
    let mut buf = vec![0u8; BLOCK as usize];
    rng.fill_bytes(&mut buf);
    buf
}

#[test]
fn checksum_based_resync_sends_only_the_blocks_that_differ() {
    let mut pair = Pair::builder()
        .disk_size(64 * MIB)
        .resync("csums_alg", "\"xxh3-128\"")
        .start();
    let blocks: Vec<u64> = (0..2048u64).map(|i| i * 7).collect();
    let mut client = Client::connect(&pair.primary_addr(), "r0");
    for &b in &blocks {
        assert_eq!(client.write(b * BLOCK, &block_data(b, 1)), 0);
    }
    assert_eq!(client.flush(), 0);
    client.disconnect();
    cut(&pair);
    // Every block rewritten while away (all out of sync), but only every
    // third one with new contents.
    let mut client = Client::connect(&pair.primary_addr(), "r0");
    let mut changed = 0u64;
    for (i, &b) in blocks.iter().enumerate() {
        let g = if i % 3 == 0 { 2 } else { 1 };
        changed += u64::from(g == 2);
        assert_eq!(client.write(b * BLOCK, &block_data(b, g)), 0);
    }
    assert_eq!(client.flush(), 0);
    client.disconnect();
    let dirtied = blocks.len() as u64 * BLOCK;
    assert_eq!(pair.status(ALPHA).out_of_sync_bytes, dirtied);
    pair.ok(ALPHA, &["connect", "r0"]);
    wait_sync(&pair, 60);
    let r = resync(&pair, ALPHA);
    assert_eq!(field(&r, "moved_bytes"), changed * BLOCK, "{r}");
    assert_eq!(field(&r, "same_bytes"), dirtied - changed * BLOCK, "{r}");
    assert_eq!(field(&r, "done_bytes"), dirtied, "{r}");
    stop_both(&mut pair);
    assert_disks_identical(&pair);
}
