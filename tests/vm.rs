//! The Linux kernel's NBD client against a replicated pair, in the small
//! VM of tools/vm (Debian's stock kernel under qemu's TCG; the host here
//! has no nbd module). Ignored by plain `cargo test` (they need
//! qemu-system-x86 and a few seconds per boot); tools/test.sh runs them
//! with `cargo test --test vm -- --ignored --test-threads=1`.
//!
//! - `nbd_client_ext4_on_the_primary`: Debian's nbd-client attaches
//!   /dev/nbd0 to the Primary; ext4 made, files written, fsck clean, files
//!   verify after a remount, both backing copies identical.
//! - `nbd_client_over_tls_with_a_client_certificate`: the same over TLS
//!   (`tls = "require"`, a client-certificate allow-list on the resource);
//!   in the same boot, a client in clear, one without a certificate and
//!   one whose certificate is not on the list are refused and nothing is
//!   attached.
//! - `attach_follows_the_primary`: `replctl attach` in the guest, a loop
//!   writing fsync'ed files through ext4 while the Primary is switched over
//!   (demote/promote) and then SIGKILLed (the other node promoted): zero I/O
//!   errors, fsck clean, every file verifies, copies identical after the
//!   killed node resyncs; a silent failure (no FIN) likewise; between the
//!   events the attach process is killed and restarted, and adopts the
//!   device. The I/O pauses are measured and printed.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::forward::Forwarder;
use common::pair::{read_disk, Pair, ALPHA, BETA};
use common::vm::{field, host_addr, Vm};

const DISK: u64 = 128 << 20;
const BOOT_AND_RUN: Duration = Duration::from_secs(300);

fn replctl() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_replctl"))
}

/// Waits until both nodes are connected and UpToDate with nothing out of
/// sync, then compares the backing files.
fn assert_copies_identical(pair: &Pair) {
    for node in [ALPHA, BETA] {
        pair.ok(node, &["wait-sync", "r0", "--timeout", "60"]);
    }
    let a = read_disk(&pair.alpha().disk);
    let b = read_disk(&pair.beta().disk);
    assert!(a == b, "the backing files of alpha and beta differ");
}

/// Guest shell functions: `now` (uptime in centiseconds), the file writer
/// and the checks after it.
const GUEST_LIB: &str = r#"
R=/usr/local/sbin
now() { cut -d' ' -f1 /proc/uptime | tr -d .; }
wait_size() {
    i=0
    while [ "$(cat /sys/block/nbd0/size 2>/dev/null)" = 0 ] && [ $i -lt 300 ]; do
        sleep 0.1; i=$((i+1))
    done
    echo "G nbd0 sectors=$(cat /sys/block/nbd0/size)"
}
# Writes 32 KiB files with fsync until /tmp/stop exists or $1 files are
# written; their checksums go to /tmp/sums. Reports every write error and
# every pause over 0.2 s between two completed files.
writer() {
    limit=$1; i=0; errors=0; maxgap=0; last=$(now)
    while [ ! -e /tmp/stop ] && [ $i -lt $limit ]; do
        dd if=/dev/urandom of=/tmp/buf bs=4096 count=8 2>/dev/null
        sum=$(sha256sum < /tmp/buf | cut -c1-64)
        if dd if=/tmp/buf of=/mnt/f$i bs=4096 conv=fsync 2>/tmp/dd.err; then
            echo "$sum  /mnt/f$i" >> /tmp/sums
        else
            errors=$((errors+1)); echo "G write-error file=$i $(cat /tmp/dd.err)"
        fi
        t=$(now); gap=$((t-last)); last=$t
        [ $gap -gt $maxgap ] && maxgap=$gap
        [ $gap -gt 20 ] && echo "G pause file=$i gap_cs=$gap"
        i=$((i+1))
        [ $((i % 10)) -eq 0 ] && echo "G progress files=$i"
    done
    echo "G writer files=$i errors=$errors max_gap_cs=$maxgap"
}
# Rewrites 1 MiB at a time of /mnt/stream with O_DIRECT until /tmp/stop,
# so that requests are in flight whenever the Primary goes away; counts
# failed writes and reports (on the console) every write over 0.2 s.
streamer() {
    n=0; errors=0
    while [ ! -e /tmp/stop ] && [ $n -lt 100000 ]; do
        t0=$(now)
        dd if=/dev/zero of=/mnt/stream bs=1M count=1 seek=$((n % 8)) oflag=direct conv=notrunc 2>/tmp/st.err ||
            { errors=$((errors+1)); echo "G stream-error $(cat /tmp/st.err)"; }
        took=$(( $(now) - t0 ))
        [ $took -gt 20 ] && echo "G spause write=$n gap_cs=$took" > /dev/console
        n=$((n+1))
    done
    echo "G streamer writes=$n errors=$errors"
}
check_fs() {
    sync
    umount /mnt || echo "G umount failed"
    $R/e2fsck -fn /dev/nbd0 > /tmp/fsck.log 2>&1
    echo "G fsck status=$?"
    tail -n 3 /tmp/fsck.log
    mount -t ext4 -o ro /dev/nbd0 /mnt || echo "G remount failed"
    bad=$(sha256sum -c /tmp/sums 2>&1 | grep -vc ': OK$')
    echo "G verify files=$(wc -l < /tmp/sums) bad=$bad"
    umount /mnt
    echo "G dmesg io_errors=$(dmesg | grep -ci 'i/o error')"
}
"#;

#[test]
#[ignore = "boots a VM (tools/test.sh runs it)"]
fn nbd_client_ext4_on_the_primary() {
    let pair = Pair::builder().disk_size(DISK).start();
    let port = pair.alpha().nbd_port;
    let script = format!(
        r#"{GUEST_LIB}
$R/nbd-client {addr} {port} /dev/nbd0 -N r0 -b 4096 || {{ echo "G nbd-client failed"; exit 1; }}
wait_size
$R/mke2fs -q -t ext4 -F /dev/nbd0 || {{ echo "G mkfs failed"; exit 1; }}
mount -t ext4 /dev/nbd0 /mnt || {{ echo "G mount failed"; exit 1; }}
writer 40
check_fs
$R/nbd-client -d /dev/nbd0
echo "G detach status=$?"
"#,
        addr = host_addr(port).split(':').next().expect("host"),
    );
    let boot = Instant::now();
    let mut vm = Vm::boot(&script, &[]);
    let ready = vm.wait_line("VM-READY", BOOT_AND_RUN, |l| l.contains("VM-READY"));
    println!(
        "boot: {:.1} s on the host clock ({ready})",
        boot.elapsed().as_secs_f64()
    );
    let writer = vm.wait_line("writer", BOOT_AND_RUN, |l| l.starts_with("G writer "));
    assert_eq!(field(&writer, "files"), 40, "{writer}");
    assert_eq!(field(&writer, "errors"), 0, "{writer}");
    let fsck = vm.wait_line("fsck", BOOT_AND_RUN, |l| l.starts_with("G fsck "));
    assert_eq!(field(&fsck, "status"), 0, "e2fsck found problems: {fsck}");
    let verify = vm.wait_line("verify", BOOT_AND_RUN, |l| l.starts_with("G verify "));
    assert_eq!(field(&verify, "files"), 40, "{verify}");
    assert_eq!(field(&verify, "bad"), 0, "{verify}");
    let dmesg = vm.wait_line("dmesg", BOOT_AND_RUN, |l| l.starts_with("G dmesg "));
    assert_eq!(field(&dmesg, "io_errors"), 0, "{dmesg}");
    assert_eq!(vm.finish(BOOT_AND_RUN), 0);
    println!("whole VM run: {:.1} s", boot.elapsed().as_secs_f64());
    assert_copies_identical(&pair);
    pair.assert_no_panic();
}

/// The kernel client over TLS: Debian's nbd-client (built with GnuTLS:
/// `-certfile`, `-keyfile`, `-cacertfile`, `-tlshostname`) attaches
/// /dev/nbd0 to the Primary, whose listener requires TLS and whose
/// resource admits one client certificate. In the same boot, first the
/// clients that must get nothing: one in clear, one over TLS without a
/// certificate, one with a certificate of the same CA that is not on the
/// list; each is refused (nbd-client fails, /dev/nbd1 stays unattached)
/// and the Primary's log says why. Then the admitted client: ext4 made,
/// files written and verified after a remount, fsck clean, copies
/// identical.
#[test]
#[ignore = "boots a VM (tools/test.sh runs it)"]
fn nbd_client_over_tls_with_a_client_certificate() {
    use common::certs::{self, Ca};
    let ca = Ca::new("replblk VM test CA");
    let pki = tempfile::tempdir().expect("tempdir");
    let (cert, key) = certs::save(pki.path(), "server", &ca.server());
    let ca_path = pki.path().join("ca.crt");
    certs::write(&ca_path, &ca.pem(), 0o644);
    let pair = Pair::builder()
        .disk_size(DISK)
        .nbd_keys(&format!(
            "tls = \"require\"\ntls_cert = {cert:?}\ntls_key = {key:?}\ntls_ca = {ca_path:?}\n"
        ))
        .resource_keys("tls = \"require\"\nallowed_clients = [\"CN=client1\"]\n")
        .start();
    let client1 = ca.client("client1");
    let client2 = ca.client("client2");
    let ca_pem = ca.pem();
    let files: [(&str, &[u8]); 5] = [
        ("/etc/tls/ca.crt", ca_pem.as_bytes()),
        ("/etc/tls/client1.crt", client1.cert.as_bytes()),
        ("/etc/tls/client1.key", client1.key.as_bytes()),
        ("/etc/tls/client2.crt", client2.cert.as_bytes()),
        ("/etc/tls/client2.key", client2.key.as_bytes()),
    ];
    let port = pair.alpha().nbd_port;
    // The server certificate names localhost and 127.0.0.1; the guest
    // reaches the host's 127.0.0.1 as 10.0.2.2, so it checks the name
    // `localhost` (-tlshostname) against the certificate.
    let script = format!(
        r#"{GUEST_LIB}
NBD="$R/nbd-client {host} {port}"
CA="-cacertfile /etc/tls/ca.crt -tlshostname localhost"
refused() {{
    what=$1; shift
    $NBD /dev/nbd1 -N r0 -b 4096 "$@" > /tmp/refused.log 2>&1
    st=$?
    sleep 1
    pid=0; [ -e /sys/block/nbd1/pid ] && pid=1
    echo "G refused what=$what status=$st sectors=$(cat /sys/block/nbd1/size) pid=$pid"
    sed 's/^/G   /' /tmp/refused.log
}}
refused clear
refused nocert -enable-tls $CA
refused client2 -certfile /etc/tls/client2.crt -keyfile /etc/tls/client2.key $CA
$NBD /dev/nbd0 -N r0 -b 4096 -certfile /etc/tls/client1.crt -keyfile /etc/tls/client1.key $CA \
    > /tmp/attach.log 2>&1 || {{ cat /tmp/attach.log; echo "G nbd-client failed"; exit 1; }}
cat /tmp/attach.log
wait_size
$R/mke2fs -q -t ext4 -F /dev/nbd0 || {{ echo "G mkfs failed"; exit 1; }}
mount -t ext4 /dev/nbd0 /mnt || {{ echo "G mount failed"; exit 1; }}
writer 40
check_fs
$R/nbd-client -d /dev/nbd0
echo "G detach status=$?"
"#,
        host = host_addr(port).split(':').next().expect("host"),
    );
    let boot = Instant::now();
    let mut vm = Vm::boot_with_files(&script, &[], &files);
    vm.wait_line("VM-READY", BOOT_AND_RUN, |l| l.contains("VM-READY"));
    // nbd-client prints the server's reason ("Server said: ...").
    for (what, reason) in [
        ("clear", "TLS is required: send NBD_OPT_STARTTLS first"),
        (
            "nocert",
            "a client certificate is required and none was presented",
        ),
        ("client2", "refused: client certificate \"CN=client2\""),
    ] {
        let line = vm.wait_line("a refusal", BOOT_AND_RUN, |l| {
            l.starts_with("G refused ") && l.contains(&format!("what={what} "))
        });
        let said = vm.wait_line("the server's reason", BOOT_AND_RUN, |l| {
            l.starts_with("G   ") && l.contains("Server said")
        });
        println!("{line}\n{said}");
        assert_ne!(field(&line, "status"), 0, "{what} was attached: {line}");
        assert_eq!(
            field(&line, "sectors"),
            0,
            "{what}: /dev/nbd1 has a size: {line}"
        );
        assert_eq!(
            field(&line, "pid"),
            0,
            "{what}: /dev/nbd1 is connected: {line}"
        );
        assert!(
            said.contains(reason),
            "{what}: expected {reason:?}, got {said}"
        );
    }
    let writer = vm.wait_line("writer", BOOT_AND_RUN, |l| l.starts_with("G writer "));
    assert_eq!(field(&writer, "files"), 40, "{writer}");
    assert_eq!(field(&writer, "errors"), 0, "{writer}");
    let fsck = vm.wait_line("fsck", BOOT_AND_RUN, |l| l.starts_with("G fsck "));
    assert_eq!(field(&fsck, "status"), 0, "e2fsck found problems: {fsck}");
    let verify = vm.wait_line("verify", BOOT_AND_RUN, |l| l.starts_with("G verify "));
    assert_eq!(field(&verify, "files"), 40, "{verify}");
    assert_eq!(field(&verify, "bad"), 0, "{verify}");
    let dmesg = vm.wait_line("dmesg", BOOT_AND_RUN, |l| l.starts_with("G dmesg "));
    assert_eq!(field(&dmesg, "io_errors"), 0, "{dmesg}");
    let detach = vm.wait_line("detach", BOOT_AND_RUN, |l| l.starts_with("G detach "));
    assert_eq!(field(&detach, "status"), 0, "{detach}");
    assert_eq!(vm.finish(BOOT_AND_RUN), 0);
    println!("whole VM run: {:.1} s", boot.elapsed().as_secs_f64());

    // The Primary says why each refused client got nothing, and that the
    // admitted one came over TLS as client1.
    let log = pair.log(ALPHA);
    for reason in [
        "a client certificate is required and none was presented",
        "client certificate \"CN=client2\"",
        "is not among the allowed clients",
        "TLS established",
        "CN=client1",
    ] {
        assert!(log.contains(reason), "no {reason:?} in alpha's log:\n{log}");
    }
    assert_copies_identical(&pair);
    pair.assert_no_panic();
}

/// Waits until the writer has completed `more` files past the last
/// progress line seen; returns the new count.
fn wait_progress(vm: &mut Vm, from: i64, more: i64) -> i64 {
    let line = vm.wait_line("writer progress", Duration::from_secs(180), |l| {
        l.starts_with("G progress ") && field(l, "files") >= from + more
    });
    field(&line, "files")
}

/// How long the attach tool says the link was down ("... N ms after the
/// link died").
fn link_down_ms(line: &str) -> u64 {
    line.split(" ms after the link died")
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {line:?}"))
}

/// The largest pause the writer reported among console lines from index
/// `from` on, in seconds.
fn max_pause(vm: &Vm, from: usize, prefix: &str) -> f64 {
    vm.seen[from..]
        .iter()
        .filter(|l| l.starts_with(prefix))
        .map(|l| field(l, "gap_cs") as f64 / 100.0)
        .fold(0.0, f64::max)
}

#[test]
#[ignore = "boots a VM (tools/test.sh runs it)"]
fn attach_follows_the_primary() {
    let mut pair = Pair::builder().disk_size(DISK).start();
    // The guest reaches each node through a forwarder, which can follow a
    // restarted node to its new port and can fall silent like a node
    // that lost power.
    let nbd = |pair: &Pair, node: &str| -> SocketAddr {
        format!("127.0.0.1:{}", pair.node(node).nbd_port)
            .parse()
            .expect("addr")
    };
    let proxy_a = Forwarder::start(nbd(&pair, ALPHA));
    let proxy_b = Forwarder::start(nbd(&pair, BETA));
    let script = format!(
        r#"{GUEST_LIB}
# beta alone is Secondary: refused, with the reason.
$R/replctl attach nbd://{b}/r0 /dev/nbd1 2>/tmp/refused.log
echo "G refused status=$? named=$(grep -c 'connect to the Primary, alpha' /tmp/refused.log)"
cat /tmp/refused.log
ATTACH="$R/replctl attach nbd://{a},{b}/r0 /dev/nbd0 --timeout 3 --connect-timeout 2 --dead-conn-timeout 120"
$ATTACH &
wait_size
$R/mke2fs -q -t ext4 -F /dev/nbd0 || {{ echo "G mkfs failed"; exit 1; }}
mount -t ext4 /dev/nbd0 /mnt || {{ echo "G mount failed"; exit 1; }}
# Console commands from the test: "restart" SIGKILLs the attach process
# and starts a new one (which must adopt the device), "stop" ends the run.
(
    while read line < /dev/console; do
        case "$line" in
        restart) kill -9 "$(cat /run/replblk/attach-nbd0.pid)"; $ATTACH & ;;
        stop) touch /tmp/stop; break ;;
        esac
    done
) &
streamer > /tmp/streamer.out 2>&1 &
writer 5000
wait $!
cat /tmp/streamer.out
check_fs
$R/replctl detach /dev/nbd0
echo "G detach status=$?"
i=0
while [ -e /run/replblk/attach-nbd0.pid ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "G attach-exited=$([ -e /run/replblk/attach-nbd0.pid ] && echo 0 || echo 1)"
"#,
        a = host_addr(proxy_a.port),
        b = host_addr(proxy_b.port),
    );
    let test_start = Instant::now();
    let mut vm = Vm::boot(&script, &[(replctl(), "/usr/local/sbin/replctl")]);
    vm.wait_line("VM-READY", BOOT_AND_RUN, |l| l.contains("VM-READY"));
    println!("boot: {:.1} s", test_start.elapsed().as_secs_f64());
    let refused = vm.wait_line("refusal", BOOT_AND_RUN, |l| l.starts_with("G refused "));
    assert_ne!(field(&refused, "status"), 0, "{refused}");
    assert_eq!(field(&refused, "named"), 1, "{refused}");
    let mark = vm.seen.len();
    let mut files = wait_progress(&mut vm, 0, 30);
    let mut report = vec![format!(
        "no failover: longest gap between two completed files {:.2} s, longest 1 MiB write {:.2} s",
        max_pause(&vm, mark, "G pause "),
        max_pause(&vm, mark, "G spause ")
    )];
    let mut reconnected = |vm: &mut Vm, what: &str, mark: usize, files: &mut i64| {
        let line = vm.wait_line("reconnect", Duration::from_secs(120), |l| {
            l.contains("reconnected to")
        });
        let link = link_down_ms(&line);
        *files = wait_progress(vm, *files, 20);
        report.push(format!(
            "{what}: link down {link} ms (attach tool), longest gap between two completed \
             files {:.2} s, longest 1 MiB write {:.2} s",
            max_pause(vm, mark, "G pause "),
            max_pause(vm, mark, "G spause ")
        ));
    };

    // 1. Planned switchover: alpha hands over to beta.
    let mark = vm.seen.len();
    pair.ok(ALPHA, &["demote", "r0", "--force"]);
    pair.ok(BETA, &["promote", "r0"]);
    reconnected(
        &mut vm,
        "switchover (demote alpha, promote beta)",
        mark,
        &mut files,
    );

    // The attach process dies (SIGKILL) and is started again: the new one
    // adopts the attached device and follows it from then on.
    vm.send("restart");
    vm.wait_line("adoption", Duration::from_secs(60), |l| {
        l.contains("is already attached to replblk:r0; adopting it")
    });

    // 2. Failover: beta, now Primary, is SIGKILLed; alpha takes over.
    let mark = vm.seen.len();
    pair.kill(BETA);
    pair.wait_status(ALPHA, "losing beta", |s| !s.connected());
    pair.ok(ALPHA, &["promote", "r0"]);
    reconnected(
        &mut vm,
        "failover (SIGKILL beta, promote alpha)",
        mark,
        &mut files,
    );

    // 3. Silent failure: beta comes back and resyncs; then alpha goes
    //    silent towards the client (no FIN, no RST: power loss), is
    //    killed, and beta takes over. The kernel notices through its
    //    request timeout, the attach tool skips the silent address after
    //    its connect timeout.
    pair.start(BETA);
    proxy_b.set_upstream(nbd(&pair, BETA));
    for node in [ALPHA, BETA] {
        pair.ok(node, &["wait-sync", "r0", "--timeout", "120"]);
    }
    let mark = vm.seen.len();
    proxy_a.blackhole(true);
    pair.kill(ALPHA);
    pair.wait_status(BETA, "losing alpha", |s| !s.connected());
    pair.ok(BETA, &["promote", "r0"]);
    reconnected(
        &mut vm,
        "silent failure (alpha silenced and killed, promote beta)",
        mark,
        &mut files,
    );
    let timed_out = vm.seen[mark..]
        .iter()
        .any(|l| l.contains("timed out") || l.contains("link dead"));
    assert!(timed_out, "the kernel never gave up on the silent link");

    vm.send("stop");
    let writer = vm.wait_line("writer", BOOT_AND_RUN, |l| l.starts_with("G writer "));
    let streamer = vm.wait_line("streamer", BOOT_AND_RUN, |l| l.starts_with("G streamer "));
    let fsck = vm.wait_line("fsck", BOOT_AND_RUN, |l| l.starts_with("G fsck "));
    let verify = vm.wait_line("verify", BOOT_AND_RUN, |l| l.starts_with("G verify "));
    let dmesg = vm.wait_line("dmesg", BOOT_AND_RUN, |l| l.starts_with("G dmesg "));
    let detach = vm.wait_line("detach", BOOT_AND_RUN, |l| l.starts_with("G detach "));
    let exited = vm.wait_line("attach exit", BOOT_AND_RUN, |l| {
        l.starts_with("G attach-exited")
    });
    assert_eq!(vm.finish(BOOT_AND_RUN), 0);
    println!("I/O pauses (gaps under 0.2 s show as 0; they include the load of a TCG guest):");
    for line in &report {
        println!("  {line}");
    }
    println!(
        "{writer}; {streamer}; VM test {:.1} s",
        test_start.elapsed().as_secs_f64()
    );
    assert_eq!(field(&writer, "errors"), 0, "{writer}");
    assert_eq!(field(&streamer, "errors"), 0, "{streamer}");
    assert_eq!(field(&dmesg, "io_errors"), 0, "{dmesg}");
    assert_eq!(field(&fsck, "status"), 0, "e2fsck found problems: {fsck}");
    assert_eq!(field(&verify, "files"), field(&writer, "files"), "{verify}");
    assert_eq!(field(&verify, "bad"), 0, "{verify}");
    assert_eq!(field(&detach, "status"), 0, "{detach}");
    assert_eq!(field(&exited, "attach-exited"), 1, "{exited}");

    // The killed node comes back as Secondary and resyncs.
    pair.start(ALPHA);
    assert_copies_identical(&pair);
    pair.assert_no_panic();
}
