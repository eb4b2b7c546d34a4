//! TLS for NBD clients and the peer link (rustls, ring provider).
//!
//! `TlsStream` is one TLS connection that several threads use at once, the
//! way the plain data paths use `try_clone`d sockets: one thread reads
//! (under the caller's reader lock) while others write (under the caller's
//! writer lock). Reading takes the socket bytes without holding the TLS
//! state, then decrypts them under a short lock; writing encrypts under that
//! lock and sends the records with the state released but the send order
//! held (`send` lock), so records leave in sequence-number order.
//!
//! The plain (`tls = "off"`) paths never touch this module: the stream kind
//! is chosen once, at the handshake.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::sync::lock;

/// The crypto provider every TLS config here uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Refuses a file holding a secret (private key, shared secret) that
/// anyone but its owner may read, with the reason.
pub fn check_private(path: &Path, what: &str) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} {} is readable or writable by group or others (mode {mode:03o}); \
             chmod 600 it (or 400)",
            path.display()
        ));
    }
    Ok(())
}

/// Reads a PEM certificate chain (leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let file =
        File::open(path).map_err(|e| format!("cannot read certificate {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_reader_iter(io::BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "certificate {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

/// Reads a PEM private key, refusing it when others may read it. The key
/// itself never appears in an error message.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    check_private(path, "private key")?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("private key {}: {e}", path.display()))
}

/// Reads a secret from a file that only its owner may read; surrounding
/// whitespace (a trailing newline) is not part of it.
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    check_private(path, "secret file")?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
    let secret = text.trim().to_owned();
    if secret.is_empty() {
        return Err(format!("secret file {} is empty", path.display()));
    }
    Ok(secret)
}

/// SHA-256 of a certificate's DER, as `sha256:` and 64 lowercase hex
/// digits.
pub fn fingerprint(cert: &[u8]) -> String {
    let digest = Sha256::digest(cert);
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Normalises a configured fingerprint (`sha256:` prefix optional, case
/// and `:` separators ignored). `None` if it is not 32 bytes of hex.
pub fn parse_fingerprint(text: &str) -> Option<String> {
    let body = text
        .strip_prefix("sha256:")
        .or_else(|| text.strip_prefix("SHA256:"))
        .unwrap_or(text);
    let hex: String = body.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(format!("sha256:{}", hex.to_ascii_lowercase()))
}

/// Who a client certificate says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The subject, as `CN=client1, O=Example` (RFC 4514 order as
    /// written in the certificate).
    pub subject: String,
    /// `sha256:...` of the certificate.
    pub fingerprint: String,
}

impl Identity {
    pub fn of(cert: &[u8]) -> Identity {
        let subject = x509_parser::parse_x509_certificate(cert)
            .map(|(_, c)| c.subject().to_string())
            .unwrap_or_default();
        Identity {
            subject,
            fingerprint: fingerprint(cert),
        }
    }

    /// Whether `allowed` (a subject or a fingerprint, as configured)
    /// names this identity.
    pub fn matches(&self, allowed: &str) -> bool {
        match parse_fingerprint(allowed) {
            Some(fp) => fp == self.fingerprint,
            None => normalize_subject(allowed) == normalize_subject(&self.subject),
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} ({})", self.subject, self.fingerprint)
    }
}

/// Subjects compare without regard to spaces after separators.
fn normalize_subject(s: &str) -> String {
    s.split(',').map(|p| p.trim()).collect::<Vec<_>>().join(",")
}

/// What the NBD listener offers over TLS.
pub struct NbdTls {
    pub config: Arc<rustls::ServerConfig>,
}

/// Builds the NBD server's TLS config: its certificate and key, and, with
/// `client_ca`, client certificates verified against that CA (optional:
/// a client without one is still served exports that list no allowed
/// clients). Without a CA, a client certificate is accepted whatever signed
/// it, so only its fingerprint can identify it.
pub fn nbd_server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<NbdTls, String> {
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let provider = provider();
    let verifier: Arc<dyn ClientCertVerifier> = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| format!("CA certificate {}: {e}", ca.display()))?;
            }
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("client CA {}: {e}", ca.display()))?
        }
        None => Arc::new(AnyClientCert {
            provider: provider.clone(),
        }),
    };
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate {} and its key: {e}", cert.display()))?;
    Ok(NbdTls {
        config: Arc::new(config),
    })
}

/// Accepts any client certificate whose holder proves the key (the TLS
/// signature), leaving the decision to the fingerprint check; a client
/// may also send none.
#[derive(Debug)]
struct AnyClientCert {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The peer link's certificates: ours (with its key) and the one the peer
/// must present, byte for byte (pinned; no CA, no expiry check).
#[derive(Clone)]
pub struct PeerTls {
    pub client: Arc<rustls::ClientConfig>,
    pub server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls(..)")
    }
}

impl PeerTls {
    pub fn new(own_cert: &Path, own_key: &Path, peer_cert: &Path) -> Result<PeerTls, String> {
        let chain = load_certs(own_cert)?;
        let key = load_key(own_key)?;
        let pinned = load_certs(peer_cert)?.remove(0).into_owned();
        if chain[0].as_ref() == pinned.as_ref() {
            return Err(format!(
                "the peer's certificate {} is this node's own ({}): each node needs its own",
                peer_cert.display(),
                own_cert.display()
            ));
        }
        let provider = provider();
        let pin = Arc::new(Pinned {
            cert: pinned,
            provider: provider.clone(),
        });
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(pin.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("certificate {} and its key: {e}", own_cert.display()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(pin)
            .with_single_cert(chain, key)
            .map_err(|e| format!("certificate {} and its key: {e}", own_cert.display()))?;
        Ok(PeerTls {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// Accepts exactly one certificate.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if presented.as_ref() == self.cert.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::General(format!(
                "the peer presented certificate {} {}, not the pinned {}",
                Identity::of(presented).subject,
                fingerprint(presented),
                fingerprint(&self.cert)
            )))
        }
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(self)
    }
}

/// Largest chunk of socket bytes read at once (a little over one TLS
/// record, so one read usually completes a record).
const READ_CHUNK: usize = 64 * 1024;

struct RxState {
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    eof: bool,
}

struct Shared {
    sock: TcpStream,
    conn: Mutex<rustls::Connection>,
    /// Held while encrypted records are sent, so they leave in order.
    send: Mutex<Vec<u8>>,
    rx: Mutex<RxState>,
    /// The peer's certificate (leaf), if it sent one.
    peer_cert: Option<CertificateDer<'static>>,
}

/// One TLS connection, usable from several threads (see the module
/// comment). Clones share the connection.
#[derive(Clone)]
pub struct TlsStream(Arc<Shared>);

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("fd", &self.0.sock.as_raw_fd())
            .finish()
    }
}

fn tls_io_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// Runs the TLS handshake on `sock` (whose timeouts bound it) and
    /// returns the connection. Bytes already read from the socket that
    /// belong to the TLS stream must not exist: call this right after the
    /// plaintext exchange that starts TLS.
    pub fn handshake(
        sock: TcpStream,
        conn: impl Into<rustls::Connection>,
        deadline: Instant,
    ) -> Result<TlsStream, io::Error> {
        let mut conn: rustls::Connection = conn.into();
        let mut s = &sock;
        while conn.is_handshaking() {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake did not finish in time",
                ));
            }
            match conn.complete_io(&mut s) {
                Ok(_) => {}
                Err(e) => {
                    // Send our alert (bad certificate, ...) before closing.
                    let _ = conn.write_tls(&mut s);
                    return Err(e);
                }
            }
        }
        // Whatever the handshake left to send (TLS 1.3 session tickets).
        while conn.wants_write() {
            conn.write_tls(&mut s)?;
        }
        // Encrypted writes are sent as they are produced: no limit on
        // what one write may queue inside rustls.
        conn.set_buffer_limit(None);
        let peer_cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned());
        Ok(TlsStream(Arc::new(Shared {
            sock,
            conn: Mutex::new(conn),
            send: Mutex::new(Vec::new()),
            rx: Mutex::new(RxState {
                buf: vec![0; READ_CHUNK],
                pos: 0,
                len: 0,
                eof: false,
            }),
            peer_cert,
        })))
    }

    /// Server side of a handshake with `config`.
    pub fn accept(
        sock: TcpStream,
        config: Arc<rustls::ServerConfig>,
        deadline: Instant,
    ) -> io::Result<TlsStream> {
        let conn = rustls::ServerConnection::new(config).map_err(tls_io_error)?;
        Self::handshake(sock, conn, deadline)
    }

    /// Client side of a handshake with `config` (the name is not checked
    /// by the pinned verifier; it is sent as SNI only).
    pub fn connect(
        sock: TcpStream,
        config: Arc<rustls::ClientConfig>,
        deadline: Instant,
    ) -> io::Result<TlsStream> {
        let name = ServerName::try_from("replblk-peer")
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let conn = rustls::ClientConnection::new(config, name).map_err(tls_io_error)?;
        Self::handshake(sock, conn, deadline)
    }

    pub fn peer_certificate(&self) -> Option<&CertificateDer<'static>> {
        self.0.peer_cert.as_ref()
    }

    pub fn socket(&self) -> &TcpStream {
        &self.0.sock
    }

    /// Whether decrypted bytes, or received bytes not yet decrypted, are
    /// waiting: then a read returns without touching the socket, so
    /// polling the socket first would wait for nothing.
    pub fn has_buffered(&self) -> bool {
        if let Ok(rx) = self.0.rx.try_lock() {
            if rx.pos < rx.len {
                return true;
            }
        } else {
            // A reader is at work; let the caller read (it will block on
            // the reader lock, not on the socket).
            return true;
        }
        let mut conn = lock(&self.0.conn);
        matches!(conn.process_new_packets(), Ok(st) if st.plaintext_bytes_to_read() > 0)
    }

    /// Sends whatever the TLS state has queued, in order.
    fn flush_records(&self, out: &mut Vec<u8>) -> io::Result<()> {
        {
            let mut conn = lock(&self.0.conn);
            out.clear();
            while conn.wants_write() {
                conn.write_tls(out)?;
            }
        }
        (&self.0.sock).write_all(out)?;
        if out.capacity() > 4 << 20 {
            *out = Vec::new();
        }
        Ok(())
    }

    /// Sends a close_notify if the socket takes it at once (never waits:
    /// a peer that stopped reading must not hold the closer) and shuts the
    /// socket.
    pub fn shutdown(&self, how: Shutdown) {
        if how != Shutdown::Read {
            if let Ok(_turn) = self.0.send.try_lock() {
                let mut out = Vec::new();
                {
                    let mut conn = lock(&self.0.conn);
                    conn.send_close_notify();
                    while conn.wants_write() {
                        if conn.write_tls(&mut out).is_err() {
                            break;
                        }
                    }
                }
                // SAFETY: a non-blocking send from a buffer we own, on
                // our own socket.
                unsafe {
                    libc::send(
                        self.0.sock.as_raw_fd(),
                        out.as_ptr() as *const libc::c_void,
                        out.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
            }
        }
        let _ = self.0.sock.shutdown(how);
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&self.0.rx);
        loop {
            let mut flush = false;
            let mut fed = false;
            {
                let mut conn = lock(&self.0.conn);
                // Records received with the handshake's last flight may
                // still wait to be processed.
                if let Err(e) = conn.process_new_packets() {
                    return Err(tls_io_error(e));
                }
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if rx.pos < rx.len || rx.eof {
                    fed = true;
                    let RxState {
                        buf: b, pos, len, ..
                    } = &mut *rx;
                    let mut pending = &b[*pos..*len];
                    let before = pending.len();
                    let at_end = before == 0;
                    if !at_end {
                        conn.read_tls(&mut pending)?;
                        *pos += before - pending.len();
                    } else {
                        // End of stream: rustls reports a close without
                        // close_notify as UnexpectedEof from `reader`.
                        let _ = conn.read_tls(&mut pending);
                    }
                    conn.process_new_packets().map_err(|e| {
                        // Tell the peer (alert) before the caller closes.
                        let mut out = Vec::new();
                        let _ = conn.write_tls(&mut out);
                        let _ = (&self.0.sock).write_all(&out);
                        tls_io_error(e)
                    })?;
                    flush = conn.wants_write();
                    if at_end && !flush {
                        // Either plaintext or the end is available now.
                        match conn.reader().read(buf) {
                            Ok(n) => return Ok(n),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            if flush {
                let mut out = lock(&self.0.send);
                self.flush_records(&mut out)?;
            }
            if fed {
                // Whatever was fed is processed: look for plaintext again.
                continue;
            }
            let n = loop {
                match (&self.0.sock).read(&mut rx.buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            rx.pos = 0;
            rx.len = n;
            if n == 0 {
                rx.eof = true;
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_all(data)?;
        Ok(data.len())
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let mut out = lock(&self.0.send);
        lock(&self.0.conn).writer().write_all(data)?;
        self.flush_records(&mut out)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut out = lock(&self.0.send);
        let mut total = 0;
        {
            let mut conn = lock(&self.0.conn);
            for b in bufs {
                conn.writer().write_all(b)?;
                total += b.len();
            }
        }
        self.flush_records(&mut out)?;
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for TlsStream {
    fn as_raw_fd(&self) -> RawFd {
        self.0.sock.as_raw_fd()
    }
}

/// Sets both timeouts of a socket.
pub fn set_timeouts(sock: &TcpStream, timeout: Option<Duration>) -> io::Result<()> {
    sock.set_read_timeout(timeout)?;
    sock.set_write_timeout(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_the_usual_spellings() {
        let fp = fingerprint(b"hello");
        assert!(fp.starts_with("sha256:") && fp.len() == 71, "{fp}");
        let upper_colons = fp[7..]
            .to_ascii_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap_or(""))
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_fingerprint(&upper_colons).as_deref(), Some(&*fp));
        assert_eq!(parse_fingerprint(&fp[7..]).as_deref(), Some(&*fp));
        assert_eq!(parse_fingerprint("CN=client"), None);
        assert_eq!(parse_fingerprint("sha256:abcd"), None);
    }

    #[test]
    fn subjects_match_without_regard_to_spaces() {
        let id = Identity {
            subject: "CN=client1, O=Example".into(),
            fingerprint: fingerprint(b"x"),
        };
        assert!(id.matches("CN=client1,O=Example"));
        assert!(id.matches(&fingerprint(b"x")));
        assert!(!id.matches("CN=client2, O=Example"));
        assert!(!id.matches(&fingerprint(b"y")));
    }

    #[test]
    fn private_files_readable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("secret");
        std::fs::write(&p, "s3cret\n").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = read_secret_file(&p).unwrap_err();
        assert!(err.contains("mode 644") && !err.contains("s3cret"), "{err}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(read_secret_file(&p).as_deref(), Ok("s3cret"));
    }
}
