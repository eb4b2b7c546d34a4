//! qemu's own NBD client riding through a failover behind an address that
//! moves from node to node (what a cluster manager's floating IP, e.g.
//! Pacemaker's IPaddr2, does). Three network namespaces the test creates:
//! alpha and beta, each running repld, and a client namespace holding a
//! bridge both nodes are plugged into. The floating address starts on
//! alpha; `qemu-io` with `reconnect-delay` writes through it while alpha's
//! repld is SIGKILLed, the address moves to beta (with the client's ARP
//! cache entry dropped, as a gratuitous ARP would update it) and beta is
//! promoted. Every write must complete without error and read back from
//! beta; after alpha returns and resyncs both copies are identical.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pair::{free_port, read_disk, Pair, ALPHA, BETA};
use common::run_tool;

/// Writes in the run; each is 4 KiB at its own offset with its own pattern.
const WRITES: usize = 4000;
/// The failover starts once this many writes were acknowledged.
const KILL_AFTER: usize = 1000;
const BLOCK: u64 = 4096;

fn ip(args: &[&str]) {
    let (ok, out, err) = run_tool(Command::new("ip").args(args));
    assert!(ok, "`ip {}` failed: {out}{err}", args.join(" "));
}

/// alpha, beta and a client namespace with a bridge; deleted when dropped.
struct Lan {
    ns: [String; 3],
    subnet: u8,
    created: Vec<String>,
}

impl Lan {
    fn create() -> Lan {
        let pid = std::process::id();
        let mut lan = Lan {
            ns: [
                format!("rbfA-{pid}"),
                format!("rbfB-{pid}"),
                format!("rbfC-{pid}"),
            ],
            subnet: (pid % 250 + 1) as u8,
            created: Vec::new(),
        };
        for ns in lan.ns.clone() {
            ip(&["netns", "add", &ns]);
            lan.created.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        let c = lan.ns[2].clone();
        ip(&["-n", &c, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &c, "link", "set", "br0", "up"]);
        ip(&[
            "-n",
            &c,
            "addr",
            "add",
            &format!("{}/24", lan.addr(3)),
            "dev",
            "br0",
        ]);
        for i in 0..2 {
            let (node, port) = (format!("rbfn{pid}{i}"), format!("rbfp{pid}{i}"));
            ip(&["link", "add", &node, "type", "veth", "peer", "name", &port]);
            ip(&["link", "set", &node, "netns", &lan.ns[i]]);
            ip(&["link", "set", &port, "netns", &c]);
            ip(&["-n", &c, "link", "set", &port, "master", "br0", "up"]);
            let addr = format!("{}/24", lan.addr(i as u8 + 1));
            ip(&["-n", &lan.ns[i], "addr", "add", &addr, "dev", &node]);
            ip(&["-n", &lan.ns[i], "link", "set", &node, "up"]);
        }
        lan
    }

    fn addr(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 198, self.subnet, host))
    }

    fn floating(&self) -> IpAddr {
        self.addr(100)
    }

    fn dev(&self, i: usize) -> String {
        format!("rbfn{}{i}", std::process::id())
    }

    /// Puts the floating address on node `i` (0 alpha, 1 beta).
    fn float_to(&self, i: usize) {
        let a = format!("{}/24", self.floating());
        ip(&["-n", &self.ns[i], "addr", "add", &a, "dev", &self.dev(i)]);
    }

    fn unfloat(&self, i: usize) {
        let a = format!("{}/24", self.floating());
        ip(&["-n", &self.ns[i], "addr", "del", &a, "dev", &self.dev(i)]);
    }

    fn exec(&self, i: usize) -> Vec<&str> {
        vec!["ip", "netns", "exec", &self.ns[i]]
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in &self.created {
            let _ = run_tool(Command::new("ip").args(["netns", "del", ns]));
        }
    }
}

fn pattern(i: usize) -> u8 {
    (i % 250) as u8 + 1
}

#[test]
fn qemu_client_rides_through_failover_behind_a_floating_address() {
    // Declared first, dropped last: the daemons die before their namespaces.
    let lan = Lan::create();
    let port = free_port();
    let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
    let mut pair = Pair::builder()
        .disk_size(64 << 20)
        .wrapper_on(ALPHA, &lan.exec(0))
        .ip_on(ALPHA, lan.addr(1))
        .nbd_listen_on(ALPHA, any)
        .wrapper_on(BETA, &lan.exec(1))
        .ip_on(BETA, lan.addr(2))
        .nbd_listen_on(BETA, any)
        .start();
    lan.float_to(0);

    let mut cmds = Vec::new();
    for i in 0..WRITES {
        cmds.push("-c".to_owned());
        cmds.push(format!(
            "write -P {} {} {BLOCK}",
            pattern(i),
            i as u64 * 2 * BLOCK
        ));
        // A little time between writes, so the failover lands mid-run.
        cmds.push("-c".to_owned());
        cmds.push("sleep 2".to_owned());
    }
    let opts = format!(
        "driver=nbd,server.type=inet,server.host={},server.port={port},export=r0,\
         reconnect-delay=30,open-timeout=10",
        lan.floating()
    );
    let client = Command::new("ip")
        // Line-buffered, so each write's line arrives when it completes.
        .args([
            "netns",
            "exec",
            &lan.ns[2],
            "stdbuf",
            "-oL",
            "qemu-io",
            "--image-opts",
            &opts,
        ])
        .args(&cmds)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io (package qemu-utils)");
    // Stopped by PID on every way out of this test (unless already reaped).
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                // SAFETY: kill(2) on our own child, not yet reaped.
                unsafe { libc::kill(self.0.id() as i32, libc::SIGKILL) };
                let _ = self.0.wait();
            }
        }
    }
    let mut client = Reap(client);
    let stderr = client.0.stderr.take().expect("stderr");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            s.push_str(&line);
            s.push('\n');
        }
        s
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = client.0.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + Duration::from_secs(240);
    let mut wrote = 0usize;
    let mut failed = Vec::new();
    let mut failover_at = None;
    let mut last_wrote = Instant::now();
    let mut max_gap = Duration::ZERO;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("qemu-io did not finish within 240 s ({e}); {wrote} writes done"),
        };
        if line.starts_with("wrote ") {
            wrote += 1;
            if failover_at.is_some() {
                max_gap = max_gap.max(last_wrote.elapsed());
            }
            last_wrote = Instant::now();
        } else if line.contains("failed") || line.contains("error") {
            failed.push(line);
        }
        if wrote == KILL_AFTER && failover_at.is_none() {
            // What a cluster manager does when the Primary's node dies.
            let t = Instant::now();
            failover_at = Some(t);
            pair.kill(ALPHA);
            lan.unfloat(0);
            lan.float_to(1);
            // Gratuitous ARP's effect on the client: forget alpha's MAC.
            ip(&["-n", &lan.ns[2], "neigh", "flush", "dev", "br0"]);
            pair.wait_status(BETA, "losing alpha", |s| !s.connected());
            pair.ok(BETA, &["promote", "r0"]);
            println!(
                "failover (kill, move address, promote) took {:.2} s",
                t.elapsed().as_secs_f64()
            );
        }
    }
    let status = client.0.wait().expect("qemu-io exit");
    let errors = err_thread.join().unwrap_or_default();
    println!(
        "qemu-io: {wrote} of {WRITES} writes; longest gap between two completed writes \
         from the failover on: {:.2} s (the I/O pause)",
        max_gap.as_secs_f64()
    );
    assert!(
        failover_at.is_some(),
        "qemu-io finished before the failover ({wrote} writes)"
    );
    assert!(status.success(), "qemu-io exited with {status}: {errors}");
    assert!(failed.is_empty(), "failed writes: {failed:?}\n{errors}");
    assert_eq!(wrote, WRITES, "stderr: {errors}");

    // Every write reads back from beta, through the floating address.
    let mut reads = Vec::new();
    for i in 0..WRITES {
        reads.push("-c".to_owned());
        reads.push(format!(
            "read -P {} {} {BLOCK}",
            pattern(i),
            i as u64 * 2 * BLOCK
        ));
    }
    let uri = format!("nbd://{}:{port}/r0", lan.floating());
    let (ok, out, err) = run_tool(
        Command::new("ip")
            .args(["netns", "exec", &lan.ns[2], "qemu-io", "-f", "raw", &uri])
            .args(&reads),
    );
    assert!(ok, "read-back failed: {err}");
    let verified = out.lines().filter(|l| l.starts_with("read ")).count();
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(verified, WRITES, "{err}");

    // alpha comes back as Secondary, resyncs; the copies are identical.
    pair.start(ALPHA);
    for node in [ALPHA, BETA] {
        pair.ok(node, &["wait-sync", "r0", "--timeout", "60"]);
    }
    assert!(
        read_disk(&pair.alpha().disk) == read_disk(&pair.beta().disk),
        "backing files differ after resync"
    );
    pair.assert_no_panic();
}
