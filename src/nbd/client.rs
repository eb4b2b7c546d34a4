//! The client side of the fixed-newstyle handshake, as `replctl attach`
//! performs it before handing the connected socket to the kernel: greeting,
//! client flags, `NBD_OPT_GO` for one export, and the export's size and
//! transmission flags out of the `NBD_INFO_EXPORT` reply. A refusal
//! (`NBD_REP_ERR_*`) comes back with the server's message, which for a
//! replblk Secondary names the Primary.

use std::io::{self, Cursor, Read, Write};

use bytes::BytesMut;
use replblk_proto::nbd::{
    client_flags, handshake_flags, opt, rep, ClientFlags, InfoReply, InfoRequest, OptionHeader,
    OptionReplyHeader, ServerGreeting,
};
use thiserror::Error;

/// Option replies longer than this end the handshake (ours are tiny).
pub const MAX_REPLY_DATA: u32 = 64 * 1024;
/// Replies to one `NBD_OPT_GO` before we give up on the server.
pub const MAX_REPLIES: usize = 64;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("i/o during handshake: {0}")]
    Io(#[from] io::Error),
    #[error("server broke the protocol during handshake: {0}")]
    Protocol(String),
    /// The server refused the export; `message` is its text.
    #[error("server refused export {export:?} ({}): {message}", reply_name(*code))]
    Refused {
        export: String,
        code: u32,
        message: String,
    },
}

/// What `NBD_OPT_GO` told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
}

/// The name of an error reply type, for messages.
pub fn reply_name(code: u32) -> &'static str {
    match code {
        rep::ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        rep::ERR_POLICY => "NBD_REP_ERR_POLICY",
        rep::ERR_INVALID => "NBD_REP_ERR_INVALID",
        rep::ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        rep::ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        rep::ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        rep::ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        rep::ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        rep::ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        _ => "error reply",
    }
}

fn protocol(what: impl Into<String>) -> ClientError {
    ClientError::Protocol(what.into())
}

/// Runs the handshake on a fresh connection and selects `export` with
/// `NBD_OPT_GO`. On success the stream is in the transmission phase.
pub fn handshake<S: Read + Write>(stream: &mut S, export: &str) -> Result<ExportInfo, ClientError> {
    let mut raw = [0u8; ServerGreeting::LEN];
    stream.read_exact(&mut raw)?;
    let greeting = ServerGreeting::decode(&mut Cursor::new(&raw[..]))
        .map_err(|e| protocol(e.to_string()))?
        .ok_or_else(|| protocol("short greeting"))?;
    if greeting.flags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(protocol("server does not speak fixed newstyle"));
    }
    let mut ours = client_flags::FIXED_NEWSTYLE;
    if greeting.flags & handshake_flags::NO_ZEROES != 0 {
        ours |= client_flags::NO_ZEROES;
    }
    let mut out = BytesMut::with_capacity(64);
    ClientFlags(ours).encode(&mut out);
    let mut data = BytesMut::new();
    InfoRequest {
        name: export.to_owned(),
        requests: Vec::new(),
    }
    .encode(&mut data);
    OptionHeader {
        option: opt::GO,
        length: data.len() as u32,
    }
    .encode(&mut out);
    out.extend_from_slice(&data);
    stream.write_all(&out)?;

    let mut info = None;
    for _ in 0..MAX_REPLIES {
        let mut raw = [0u8; OptionReplyHeader::LEN];
        stream.read_exact(&mut raw)?;
        let header = OptionReplyHeader::decode(&mut Cursor::new(&raw[..]))
            .map_err(|e| protocol(e.to_string()))?
            .ok_or_else(|| protocol("short option reply"))?;
        if header.option != opt::GO {
            return Err(protocol(format!(
                "reply for option {} while waiting for NBD_OPT_GO",
                header.option
            )));
        }
        if header.length > MAX_REPLY_DATA {
            return Err(protocol(format!(
                "option reply of {} bytes (more than {MAX_REPLY_DATA})",
                header.length
            )));
        }
        let mut data = vec![0u8; header.length as usize];
        stream.read_exact(&mut data)?;
        match header.reply_type {
            rep::ACK => {
                return info
                    .ok_or_else(|| protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"))
            }
            rep::INFO => {
                // Other information types (name, description, block size)
                // are not needed to hand the socket to the kernel.
                if let Ok(InfoReply::Export { size, flags }) = InfoReply::decode_data(&data) {
                    info = Some(ExportInfo { size, flags });
                }
            }
            code if header.is_error() => {
                return Err(ClientError::Refused {
                    export: export.to_owned(),
                    code,
                    message: String::from_utf8_lossy(&data).into_owned(),
                })
            }
            other => {
                return Err(protocol(format!(
                    "unexpected reply type {other} to NBD_OPT_GO"
                )))
            }
        }
    }
    Err(protocol(format!(
        "more than {MAX_REPLIES} replies to NBD_OPT_GO"
    )))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::nbd::handshake::{self, Admission, AdmitAll};
    use crate::nbd::{Export, Exports};
    use crate::store::MemStore;

    fn exports() -> Exports {
        let export = Arc::new(Export {
            name: "r0".into(),
            description: String::new(),
            read_only: false,
            store: Arc::new(MemStore::new(1 << 20)),
            metrics: None,
            access: std::sync::RwLock::new(crate::config::Access::default()),
        });
        Exports::new(vec![export], None)
    }

    struct Refuse;
    impl Admission for Refuse {
        fn check(&self, _: &Export) -> Result<(), String> {
            Err("resource r0 is Secondary on node alpha; connect to the Primary, beta".into())
        }
        fn admit(&self, e: &Export, _: &mut dyn FnMut()) -> Result<(), String> {
            self.check(e)
        }
    }

    fn run(export: &str, admission: Arc<dyn Admission>) -> Result<ExportInfo, ClientError> {
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        a.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let server = std::thread::spawn(move || {
            let ctx = handshake::Context {
                tls: None,
                mode: crate::config::TlsMode::Off,
                client: handshake::Client {
                    addr: None,
                    tls: false,
                    identity: None,
                },
            };
            let _ = handshake::serve(
                &mut crate::net::Stream::Unix(b),
                &exports(),
                admission.as_ref(),
                &mut |_, _| {},
                Duration::from_secs(10),
                ctx,
            );
        });
        let r = handshake(&mut a, export);
        drop(a);
        server.join().expect("server thread");
        r
    }

    #[test]
    fn go_against_our_server_gives_size_and_flags() {
        let info = run("r0", Arc::new(AdmitAll)).expect("handshake");
        assert_eq!(info.size, 1 << 20);
        assert_ne!(info.flags & replblk_proto::nbd::tflags::SEND_FLUSH, 0);
    }

    #[test]
    fn unknown_export_is_refused_with_the_servers_text() {
        match run("nope", Arc::new(AdmitAll)) {
            Err(ClientError::Refused { code, message, .. }) => {
                assert_eq!(code, rep::ERR_UNKNOWN);
                assert!(message.contains("nope"), "{message}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_secondarys_refusal_keeps_its_message() {
        let e = run("r0", Arc::new(Refuse)).expect_err("refused");
        assert!(e.to_string().contains("NBD_REP_ERR_POLICY"), "{e}");
        assert!(
            e.to_string().contains("connect to the Primary, beta"),
            "{e}"
        );
    }

    #[test]
    fn garbage_greeting_is_a_protocol_error() {
        let (mut a, mut b) = UnixStream::pair().expect("socketpair");
        b.write_all(&[0u8; 18]).expect("write");
        drop(b);
        assert!(matches!(
            handshake(&mut a, "r0"),
            Err(ClientError::Protocol(_))
        ));
    }

    #[test]
    fn oversized_reply_is_refused_not_allocated() {
        let (mut a, mut b) = UnixStream::pair().expect("socketpair");
        let mut out = BytesMut::new();
        ServerGreeting {
            flags: handshake_flags::FIXED_NEWSTYLE,
        }
        .encode(&mut out);
        replblk_proto::nbd::OptionReplyHeader {
            option: opt::GO,
            reply_type: rep::INFO,
            length: u32::MAX,
        }
        .encode(&mut out);
        b.write_all(&out).expect("write");
        let e = handshake(&mut a, "r0").expect_err("too big");
        assert!(e.to_string().contains("option reply of"), "{e}");
    }
}
