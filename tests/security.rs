//! Security end to end: NBD over TLS with the real clients (nbdinfo,
//! nbdcopy, qemu-io, fio), client certificates as access control, address
//! allow-lists, secrets kept out of the config, the peer link over TLS
//! with pinned certificates, and hostile parties that must get nothing.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use common::certs::{self, Ca, Issued};
use common::client::{connect_raw, go, greet, read_option_reply, send_option};
use common::pair::{read_disk, Pair};
use common::{run_ok, run_tool, Daemon, WAIT};
use replblk_proto::nbd::{opt, rep};

/// A CA, the server's certificate, and a directory for it all.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().expect("tempdir"),
            ca: Ca::new("replblk test CA"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `[nbd]` keys for TLS in `mode`, with client certificates verified
    /// against this CA.
    fn nbd_keys(&self, mode: &str) -> String {
        let (cert, key) = certs::save(self.path(), "server", &self.ca.server());
        let ca = self.path().join("ca.crt");
        certs::write(&ca, &self.ca.pem(), 0o644);
        format!("tls = \"{mode}\"\ntls_cert = {cert:?}\ntls_key = {key:?}\ntls_ca = {ca:?}\n")
    }

    /// A libnbd / qemu certificate directory holding `client` (if any).
    fn client_dir(&self, name: &str, client: Option<&Issued>) -> String {
        certs::client_dir(self.path(), name, &self.ca.pem(), client)
            .display()
            .to_string()
    }
}

fn nbds(d: &Daemon, export: &str, certdir: &str) -> String {
    format!(
        "nbds://127.0.0.1:{}/{export}?tls-certificates={certdir}",
        d.port
    )
}

/// nbdinfo on `uri`: (success, stdout + stderr).
fn nbdinfo(uri: &str) -> (bool, String) {
    let (ok, out, err) = run_tool(Command::new("nbdinfo").arg(uri));
    (ok, format!("{out}{err}"))
}

/// Waits (bounded) until the daemon's log contains `what`.
fn wait_log(d: &Daemon, what: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = d.log_text();
        if log.contains(what) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "log never showed {what:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A qemu-io process kept open on an export over TLS, fed commands on
/// stdin; killed by PID when dropped.
struct QemuIo {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl QemuIo {
    fn open(d: &Daemon, export: &str, certdir: &str, out: &Path) -> QemuIo {
        let file = std::fs::File::create(out).expect("qemu-io output file");
        let mut child = Command::new("qemu-io")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={certdir}"
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,host=127.0.0.1,port={},export={export},tls-creds=tls0",
                d.port
            ))
            .stdin(Stdio::piped())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("qemu-io (tools/test.sh installs qemu-utils)");
        let stdin = child.stdin.take();
        QemuIo { child, stdin }
    }

    fn command(&mut self, cmd: &str) {
        if let Some(s) = &mut self.stdin {
            // A closed pipe means qemu-io exited; the output tells why.
            let _ = writeln!(s, "{cmd}");
            let _ = s.flush();
        }
    }

    /// Ends the session (`quit`) and waits (bounded) for the exit.
    fn finish(&mut self) {
        self.command("quit");
        self.stdin = None;
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        self.stdin = None;
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's PID.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until `path` contains `what` `count` times.
fn wait_output(path: &Path, what: &str, count: usize) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.matches(what).count() >= count {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never showed {what:?} {count} times:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn real_clients_over_tls_with_client_certificates() {
    let pki = Pki::new();
    let d = Daemon::builder()
        .nbd_extra(&pki.nbd_keys("require"))
        .resource(
            "secure",
            vec![0; 4 << 20],
            "allowed_clients = [\"CN=client1\"]",
        )
        .start();
    let client1 = pki.client_dir("client1", Some(&pki.ca.client("client1")));
    let client2 = pki.client_dir("client2", Some(&pki.ca.client("client2")));
    let anonymous = pki.client_dir("anon", None);

    // nbdcopy in and out of the restricted export, as client1.
    let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    let src = pki.path().join("src.bin");
    std::fs::write(&src, &data).expect("source");
    run_ok(
        Command::new("nbdcopy")
            .arg(&src)
            .arg(nbds(&d, "secure", &client1)),
    );
    let back = pki.path().join("back.bin");
    run_ok(
        Command::new("nbdcopy")
            .arg(nbds(&d, "secure", &client1))
            .arg(&back),
    );
    assert_eq!(std::fs::read(&back).expect("copy")[..data.len()], data[..]);
    assert_eq!(
        read_disk(&d.dir.path().join("secure.img"))[..data.len()],
        data[..]
    );
    let log = d.log_text();
    assert!(
        log.contains("TLS established") && log.contains("CN=client1"),
        "{log}"
    );

    // qemu-io with tls-creds-x509 on r0 (TLS required, any client).
    let out = pki.path().join("qemu-io.out");
    let mut q = QemuIo::open(&d, "r0", &client2, &out);
    q.command("write -P 0x5a 1M 64k");
    wait_output(&out, "64 KiB, 1 ops", 1);
    q.command("read -P 0x5a 1M 64k");
    wait_output(&out, "64 KiB, 1 ops", 2);
    q.finish();
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        text.matches("64 KiB, 1 ops").count() == 2 && !text.contains("Pattern verification failed"),
        "{text}"
    );
    assert!(read_disk(&d.disk)[1 << 20..(1 << 20) + (64 << 10)]
        .iter()
        .all(|b| *b == 0x5a));

    // fio's nbd engine: libnbd takes the CA from $HOME/.pki/libnbd (fio's
    // URI may not name local files); no client certificate, so r0 only.
    let home = pki.path().join("home");
    certs::client_dir(&home.join(".pki"), "libnbd", &pki.ca.pem(), None);
    let (ok, fio_out, fio_err) = run_tool(
        Command::new("fio")
            .env("HOME", &home)
            .args(["--name=tls", "--ioengine=nbd", "--rw=randwrite", "--bs=4k"])
            .args(["--iodepth=8", "--size=2M", "--offset=8M"])
            .arg(format!("--uri=nbds://127.0.0.1:{}/r0", d.port)),
    );
    assert!(
        ok && fio_out.contains("IOPS"),
        "fio over TLS:\n{fio_out}\n{fio_err}"
    );

    // In clear: nothing (TLS is required on the listener).
    let (ok, text) = nbdinfo(&d.uri());
    assert!(!ok, "a client in clear was served:\n{text}");
    // client2 is not on the list of `secure`; a client without a
    // certificate neither. Both are told why in the log, and r0 still
    // serves client2.
    let (ok, text) = nbdinfo(&nbds(&d, "secure", &client2));
    assert!(!ok, "client2 was served the restricted export:\n{text}");
    wait_log(&d, "client certificate \"CN=client2\"");
    let log = wait_log(&d, "is not among the allowed clients");
    assert!(log.contains("export=secure"), "{log}");
    let (ok, text) = nbdinfo(&nbds(&d, "secure", &anonymous));
    assert!(!ok, "a client without certificate was served:\n{text}");
    wait_log(
        &d,
        "a client certificate is required and none was presented",
    );
    let (ok, text) = nbdinfo(&nbds(&d, "r0", &client2));
    assert!(ok, "client2 refused r0:\n{text}");
    // The restricted export is not even listed to client2.
    let (_, text, _) = run_tool(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(nbds(&d, "", &client2)),
    );
    assert!(text.contains("r0") && !text.contains("secure"), "{text}");
    assert!(!d.log_text().contains("panicked"));
}

/// STARTTLS, a TLS handshake (rustls) presenting `client`, then
/// `NBD_OPT_GO` for r0: the first reply type, or what went wrong.
fn tls_go(addr: &str, ca_pem: &str, client: &Issued) -> Result<u32, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut s = connect_raw(addr);
    greet(&mut s);
    send_option(&mut s, opt::STARTTLS, &[]);
    assert_eq!(read_option_reply(&mut s).header.reply_type, rep::ACK);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("CA pem")).expect("root");
    }
    let chain = CertificateDer::pem_slice_iter(client.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("client pem");
    let key = PrivateKeyDer::from_pem_slice(client.key.as_bytes()).expect("key pem");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client config");
    let name = "localhost".try_into().expect("name");
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, s);
    let mut data = bytes::BytesMut::new();
    replblk_proto::nbd::InfoRequest {
        name: "r0".into(),
        requests: vec![],
    }
    .encode(&mut data);
    let mut out = bytes::BytesMut::new();
    replblk_proto::nbd::OptionHeader {
        option: opt::GO,
        length: data.len() as u32,
    }
    .encode(&mut out);
    out.extend_from_slice(&data);
    tls.write_all(&out).map_err(|e| e.to_string())?;
    let mut raw = [0u8; replblk_proto::nbd::OptionReplyHeader::LEN];
    tls.read_exact(&mut raw).map_err(|e| e.to_string())?;
    let header = replblk_proto::nbd::OptionReplyHeader::decode(&mut std::io::Cursor::new(&raw[..]))
        .map_err(|e| e.to_string())?
        .ok_or("short reply")?;
    Ok(header.reply_type)
}

#[test]
fn hostile_clients_get_nothing_and_others_carry_on() {
    let pki = Pki::new();
    let d = Daemon::builder()
        .nbd_extra(&pki.nbd_keys("require"))
        .start();
    let good = pki.client_dir("good", Some(&pki.ca.client("client1")));
    // A client kept connected (and writing) through every attack.
    let out = pki.path().join("bystander.out");
    let mut bystander = QemuIo::open(&d, "r0", &good, &out);
    bystander.command("write -P 0x11 0 4k");
    wait_output(&out, "4 KiB, 1 ops", 1);

    // Export options in clear under `require`: TLS_REQD, nothing served.
    let mut s = connect_raw(&d.addr());
    greet(&mut s);
    for option in [opt::INFO, opt::GO] {
        let replies = go(&mut s, option, "r0", &[]);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].header.reply_type, rep::ERR_TLS_REQD);
    }
    send_option(&mut s, opt::LIST, &[]);
    assert_eq!(
        read_option_reply(&mut s).header.reply_type,
        rep::ERR_TLS_REQD
    );
    // EXPORT_NAME has no error reply: the connection ends, no export data.
    send_option(&mut s, opt::EXPORT_NAME, b"r0");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "got {} bytes after EXPORT_NAME in clear",
        rest.len()
    );
    wait_log(&d, "before STARTTLS, and TLS is required");

    // STARTTLS, then garbage instead of a ClientHello.
    let mut s = connect_raw(&d.addr());
    greet(&mut s);
    send_option(&mut s, opt::STARTTLS, &[]);
    assert_eq!(read_option_reply(&mut s).header.reply_type, rep::ACK);
    let garbage: Vec<u8> = (0..300u32).map(|i| (i * 37 + 11) as u8).collect();
    let _ = s.write_all(&garbage);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    wait_log(&d, "TLS handshake failed");

    // A certificate from another CA, and an expired one from ours, sent
    // by a client that presents them whatever the server asks for (GnuTLS
    // clients withhold a certificate the server's CA list does not name;
    // an attacker would not).
    let rogue = Ca::new("rogue CA");
    let refused = tls_go(&d.addr(), &pki.ca.pem(), &rogue.client("client1"));
    assert!(
        refused.is_err(),
        "a certificate from another CA was served: {refused:?}"
    );
    wait_log(&d, "UnknownIssuer");
    let refused = tls_go(&d.addr(), &pki.ca.pem(), &pki.ca.expired_client("client1"));
    assert!(
        refused.is_err(),
        "an expired certificate was served: {refused:?}"
    );
    wait_log(&d, "certificate expired");
    // The same client code with a good certificate is served (so the two
    // refusals above are the certificates', not the test client's).
    let served = tls_go(&d.addr(), &pki.ca.pem(), &pki.ca.client("client1"));
    assert_eq!(served, Ok(rep::INFO), "a good certificate was refused");

    // The bystander's session is intact and its data untouched.
    // (One command at a time: qemu-io reads its next line only when more
    // input arrives.)
    bystander.command("read -P 0x11 0 4k");
    wait_output(&out, "4 KiB, 1 ops", 2);
    bystander.command("write -P 0x22 4k 4k");
    let text = wait_output(&out, "4 KiB, 1 ops", 3);
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "{text}"
    );
    bystander.finish();
    let disk = read_disk(&d.disk);
    assert!(disk[..4096].iter().all(|b| *b == 0x11));
    assert!(disk[4096..8192].iter().all(|b| *b == 0x22));
    assert!(disk[8192..].iter().all(|b| *b == 0));
    assert!(!d.log_text().contains("panicked"));
}

#[test]
fn a_revoked_identity_is_dropped_on_reload() {
    let pki = Pki::new();
    let d = Daemon::builder()
        .nbd_extra(&pki.nbd_keys("allow"))
        .resource(
            "secure",
            vec![0; 4 << 20],
            "allowed_clients = [\"CN=keep\", \"CN=revoke\"]",
        )
        .start();
    let keep = pki.client_dir("keep", Some(&pki.ca.client("keep")));
    let revoke = pki.client_dir("revoke", Some(&pki.ca.client("revoke")));
    let (out_keep, out_revoke) = (pki.path().join("keep.out"), pki.path().join("revoke.out"));
    let mut q_keep = QemuIo::open(&d, "secure", &keep, &out_keep);
    let mut q_revoke = QemuIo::open(&d, "secure", &revoke, &out_revoke);
    q_keep.command("write -P 0x33 0 4k");
    q_revoke.command("write -P 0x44 4k 4k");
    wait_output(&out_keep, "4 KiB, 1 ops", 1);
    wait_output(&out_revoke, "4 KiB, 1 ops", 1);

    // Remove "revoke" from the list and reload.
    let config = std::fs::read_to_string(&d.config).expect("config");
    let changed = config.replace(
        "allowed_clients = [\"CN=keep\", \"CN=revoke\"]",
        "allowed_clients = [\"CN=keep\"]",
    );
    assert_ne!(config, changed);
    std::fs::write(&d.config, changed).expect("rewrite config");
    d.signal(libc::SIGHUP);
    wait_log(&d, "closing client: no longer allowed");
    wait_log(&d, "reloaded access rules");

    q_revoke.command("write -P 0x55 8k 4k");
    q_keep.command("write -P 0x66 12k 4k");
    wait_output(&out_keep, "4 KiB, 1 ops", 2);
    q_keep.finish();
    q_revoke.finish();
    let disk = read_disk(&d.dir.path().join("secure.img"));
    assert!(disk[..4096].iter().all(|b| *b == 0x33));
    assert!(disk[4096..8192].iter().all(|b| *b == 0x44));
    assert!(
        disk[8192..12288].iter().all(|b| *b == 0),
        "the revoked client wrote after its removal"
    );
    assert!(disk[12288..16384].iter().all(|b| *b == 0x66));
    // And it cannot come back.
    let (ok, text) = nbdinfo(&nbds(&d, "secure", &revoke));
    assert!(!ok, "the revoked client was served again:\n{text}");
}

#[test]
fn address_allow_lists_are_checked_before_the_handshake() {
    // The only export admits 10.9.9.0/24: a loopback client is closed
    // before the greeting.
    let d = Daemon::builder()
        .config_extra("allowed_addresses = [\"10.9.9.0/24\"]\n")
        .start();
    let mut s = connect_raw(&d.addr());
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "got {} bytes (a greeting?)", rest.len());
    wait_log(
        &d,
        "refusing connection: address not allowed for any export",
    );
    let (ok, text) = nbdinfo(&d.uri());
    assert!(!ok, "{text}");

    // Two exports, one for loopback: the other is neither listed nor
    // served, with the reason.
    let d = Daemon::builder()
        .resource(
            "lan",
            vec![0; 1 << 20],
            "allowed_addresses = [\"10.0.0.0/8\"]",
        )
        .resource(
            "local",
            vec![0; 1 << 20],
            "allowed_addresses = [\"127.0.0.1\", \"::1\"]",
        )
        .start();
    let (_, text, _) = run_tool(Command::new("nbdinfo").arg("--list").arg(d.uri_for("")));
    assert!(text.contains("local") && !text.contains("lan"), "{text}");
    let (ok, _) = nbdinfo(&d.uri_for("local"));
    assert!(ok);
    let (ok, text) = nbdinfo(&d.uri_for("lan"));
    assert!(!ok, "{text}");
    wait_log(&d, "address 127.0.0.1 is not among the allowed addresses");
}

#[test]
fn under_allow_only_exports_that_require_tls_answer_tls_reqd_in_clear() {
    let pki = Pki::new();
    let d = Daemon::builder()
        .nbd_extra(&pki.nbd_keys("allow"))
        .resource("secure", vec![0; 1 << 20], "tls = \"require\"")
        .start();
    let mut s = connect_raw(&d.addr());
    greet(&mut s);
    let replies = go(&mut s, opt::INFO, "secure", &[]);
    assert_eq!(replies[0].header.reply_type, rep::ERR_TLS_REQD);
    let replies = go(&mut s, opt::GO, "secure", &[]);
    assert_eq!(replies[0].header.reply_type, rep::ERR_TLS_REQD);
    let replies = go(&mut s, opt::GO, "r0", &[]);
    assert_eq!(replies.last().map(|r| r.header.reply_type), Some(rep::ACK));
    // The real clients: r0 in clear, `secure` over TLS only.
    assert!(nbdinfo(&d.uri()).0);
    assert!(!nbdinfo(&d.uri_for("secure")).0);
    let anon = pki.client_dir("anon", None);
    let (ok, text) = nbdinfo(&nbds(&d, "secure", &anon));
    assert!(ok, "{text}");
}

#[test]
fn the_unix_socket_serves_local_clients_but_not_exports_that_need_tls() {
    let pki = Pki::new();
    let d = Daemon::builder()
        .unix_socket()
        .nbd_extra(&pki.nbd_keys("require"))
        .resource("secure", vec![0; 1 << 20], "tls = \"require\"")
        .start();
    let unix = |export: &str| format!("nbd+unix:///{export}?socket={}", d.socket.display());
    let (ok, text) = nbdinfo(&unix("r0"));
    assert!(ok, "{text}");
    let (ok, text) = nbdinfo(&unix("secure"));
    assert!(!ok, "{text}");
    wait_log(&d, "which the unix socket does not offer");
    // TCP in clear: nothing.
    let (ok, text) = nbdinfo(&d.uri());
    assert!(!ok, "{text}");
}

#[test]
fn secrets_and_keys_readable_by_others_are_refused() {
    let pki = Pki::new();
    let keys = pki.nbd_keys("allow");
    let key = pki.path().join("server.key");
    certs::write(&key, &std::fs::read_to_string(&key).expect("key"), 0o640);
    let config = pki.path().join("c.toml");
    let disk = pki.path().join("d.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    std::fs::write(
        &config,
        format!("[nbd]\nlisten = \"127.0.0.1:0\"\n{keys}\n[[resource]]\nname = \"r0\"\ndisk = {disk:?}\n"),
    )
    .expect("config");
    let (ok, out, err) = run_tool(
        Command::new(env!("CARGO_BIN_EXE_repld"))
            .arg("--config")
            .arg(&config),
    );
    assert!(!ok, "started with a group-readable key:\n{out}{err}");
    assert!(
        err.contains("group or others") && err.contains("mode 640"),
        "{err}"
    );
    assert!(!err.contains("PRIVATE KEY"), "{err}");
}

/// The peer link over TLS (pinned self-signed certificates) with the
/// secret in a file; writes replicate, and neither the secret nor a key
/// shows in logs or status.
#[test]
fn peer_link_over_tls_with_pinned_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a_cert, a_key) = certs::save(dir.path(), "alpha", &certs::self_signed("alpha"));
    let (b_cert, b_key) = certs::save(dir.path(), "beta", &certs::self_signed("beta"));
    let secret_file = dir.path().join("secret");
    let secret = "peer-secret-kept-in-a-file-1234";
    certs::write(&secret_file, &format!("{secret}\n"), 0o600);
    let pair = Pair::builder()
        .no_inline_secret()
        .resource_keys(&format!("secret_file = {secret_file:?}\n"))
        .on_keys(
            None,
            "alpha",
            &format!("tls_cert = {a_cert:?}\ntls_key = {a_key:?}\n"),
        )
        .on_keys(
            None,
            "beta",
            &format!("tls_cert = {b_cert:?}\ntls_key = {b_key:?}\n"),
        )
        .start();
    assert!(
        pair.log("alpha").contains("tls=true"),
        "{}",
        pair.log("alpha")
    );
    let out = dir.path().join("q.out");
    let data: Vec<u8> = (0..256 << 10).map(|i| (i % 251) as u8).collect();
    let src = dir.path().join("src.bin");
    std::fs::write(&src, &data).expect("src");
    run_ok(Command::new("nbdcopy").arg(&src).arg(pair.primary_uri()));
    let _ = out;
    // Synchronous replication: the Secondary's disk has it once the copy
    // returned.
    assert_eq!(read_disk(&pair.beta().disk)[..data.len()], data[..]);
    for node in ["alpha", "beta"] {
        let status = pair.ok(node, &["status", "--json"]);
        assert!(!status.contains(secret), "{status}");
        let log = pair.log(node);
        assert!(
            !log.contains(secret) && !log.contains("PRIVATE KEY"),
            "{log}"
        );
    }
    pair.assert_no_panic();
}

/// A peer presenting the other node's certificate (beta's daemon holding
/// alpha's certificate and key) is refused by alpha with the reason, and
/// nothing is replicated to it.
#[test]
fn a_peer_presenting_the_other_nodes_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a_cert, a_key) = certs::save(dir.path(), "alpha", &certs::self_signed("alpha"));
    let (b_cert, b_key) = certs::save(dir.path(), "beta", &certs::self_signed("beta"));
    let pair = Pair::builder()
        .on_keys(
            Some("alpha"),
            "alpha",
            &format!("tls_cert = {a_cert:?}\ntls_key = {a_key:?}\n"),
        )
        .on_keys(
            Some("alpha"),
            "beta",
            &format!("tls_cert = {b_cert:?}\ntls_key = {b_key:?}\n"),
        )
        // Beta's file: it presents alpha's certificate (and pins beta's
        // for its peer, so it starts).
        .on_keys(
            Some("beta"),
            "beta",
            &format!("tls_cert = {a_cert:?}\ntls_key = {a_key:?}\n"),
        )
        .on_keys(
            Some("beta"),
            "alpha",
            &format!("tls_cert = {b_cert:?}\ntls_key = {b_key:?}\n"),
        )
        .start_unconnected();
    let deadline = Instant::now() + WAIT;
    loop {
        let log = pair.log("alpha") + &pair.log("beta");
        if log.contains("not the pinned") {
            break;
        }
        assert!(Instant::now() < deadline, "no refusal logged:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!pair.status("alpha").connected());
    let log = pair.log("alpha");
    assert!(!log.contains("peer connected"), "{log}");
    // One line per distinct failure, not one per retry.
    assert!(log.matches("not the pinned").count() <= 2, "{log}");
    pair.assert_no_panic();
}
