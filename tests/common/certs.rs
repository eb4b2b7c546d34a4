//! Test certificates, made fresh for each test (nothing secret is kept in
//! the repository): a CA, certificates it signs, and files laid out the
//! way the real clients look for them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

pub struct Ca {
    key: KeyPair,
    cert: rcgen::Certificate,
}

/// A certificate and its key, both PEM.
pub struct Issued {
    pub cert: String,
    pub key: String,
}

/// Writes `text` to `path` with `mode`.
pub fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).expect("writing a test file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).expect("CA certificate");
        Ca { key, cert }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    fn issue(&self, p: CertificateParams) -> Issued {
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.cert, &self.key).expect("sign");
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self) -> Issued {
        let mut p =
            CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).expect("params");
        p.distinguished_name.push(DnType::CommonName, "localhost");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(p)
    }

    /// A client certificate with subject `CN=cn`.
    pub fn client(&self, cn: &str) -> Issued {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(p)
    }

    /// A client certificate that expired in 2021.
    pub fn expired_client(&self, cn: &str) -> Issued {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = date_time_ymd(2021, 1, 1);
        self.issue(p)
    }
}

/// A self-signed certificate (the peer link pins these).
pub fn self_signed(cn: &str) -> Issued {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(vec![cn.to_owned()]).expect("params");
    p.distinguished_name.push(DnType::CommonName, cn);
    let cert = p.self_signed(&key).expect("self-signed");
    Issued {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// Writes `issued` as NAME.crt and NAME.key (0600) in `dir`; returns the
/// two paths.
pub fn save(dir: &Path, name: &str, issued: &Issued) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    write(&cert, &issued.cert, 0o644);
    write(&key, &issued.key, 0o600);
    (cert, key)
}

/// A client certificate directory as libnbd (`tls-certificates=`) and
/// qemu (`tls-creds-x509,dir=`) read it: ca-cert.pem, client-cert.pem,
/// client-key.pem.
pub fn client_dir(dir: &Path, name: &str, ca_pem: &str, client: Option<&Issued>) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).expect("cert dir");
    write(&d.join("ca-cert.pem"), ca_pem, 0o644);
    if let Some(c) = client {
        write(&d.join("client-cert.pem"), &c.cert, 0o644);
        write(&d.join("client-key.pem"), &c.key, 0o600);
    }
    d
}
