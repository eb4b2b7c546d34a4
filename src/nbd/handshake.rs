//! The fixed-newstyle handshake: greeting, client flags, then option
//! haggling until the client picks an export (`NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`), aborts, or misbehaves.
//!
//! Every option is read whole (header, then exactly `length` bytes) before
//! it is looked at, so an option we do not support is answered with
//! `NBD_REP_ERR_UNSUP` and the stream stays in step.

use std::io::{self, Cursor, Read, Write};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use replblk_proto::nbd::{
    self, encode_option_reply, handshake_flags, info, opt, rep, ClientFlags, ExportNameReply,
    InfoReply, InfoRequest, OptionHeader, ServerEntry, ServerGreeting,
};
use replblk_proto::DecodeError;
use thiserror::Error;

use super::{Export, Exports, MAX_PAYLOAD, MIN_BLOCK, PREFERRED_BLOCK};
use crate::config::{Access, TlsMode};
use crate::net::Stream;
use crate::tls::{Identity, TlsStream};

/// Option data larger than this ends the connection: no option replblk
/// understands comes close, and skipping megabytes is a denial of service.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Options one client may send before choosing an export.
pub const MAX_OPTIONS: usize = 256;

#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("i/o during handshake: {0}")]
    Io(#[from] io::Error),
    #[error("handshake did not finish within {0:?}")]
    Timeout(Duration),
    #[error("protocol error during handshake: {0}")]
    Protocol(String),
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("client sent more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("client sent NBD_OPT_EXPORT_NAME for {0:?} before STARTTLS, and TLS is required")]
    ExportNameWithoutTls(String),
    #[error("refused NBD_OPT_EXPORT_NAME for {name:?}: {why}")]
    ExportNameRefused { name: String, why: String },
}

/// Who is on the other end of a connection, as far as access control
/// goes.
#[derive(Debug, Clone, Default)]
pub struct Client {
    /// The TCP source address; `None` on the unix socket.
    pub addr: Option<IpAddr>,
    /// TLS was negotiated.
    pub tls: bool,
    /// The client certificate's identity, if it sent one.
    pub identity: Option<Identity>,
}

/// Why an export is not served to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Only over TLS (`NBD_REP_ERR_TLS_REQD`).
    TlsRequired,
    /// Not this client (`NBD_REP_ERR_POLICY`), with the reason.
    Denied(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::TlsRequired => f.write_str("this export is served over TLS only"),
            Refusal::Denied(why) => f.write_str(why),
        }
    }
}

/// Whether `client` may open an export with `access`.
pub fn permit(access: &Access, client: &Client) -> Result<(), Refusal> {
    let Some(addr) = client.addr else {
        // The unix socket is local (its file mode says who may connect),
        // but it cannot carry TLS: exports that need TLS are not on it.
        if access.tls_required {
            return Err(Refusal::Denied(
                "this export is served over TLS only, which the unix socket does not offer".into(),
            ));
        }
        return Ok(());
    };
    if !access.allowed_addresses.is_empty()
        && !access.allowed_addresses.iter().any(|c| c.contains(addr))
    {
        return Err(Refusal::Denied(format!(
            "address {} is not among the allowed addresses",
            addr.to_canonical()
        )));
    }
    if access.tls_required && !client.tls {
        return Err(Refusal::TlsRequired);
    }
    if !access.allowed_clients.is_empty() {
        match &client.identity {
            None => {
                return Err(Refusal::Denied(
                    "a client certificate is required and none was presented".into(),
                ))
            }
            Some(id) if !access.allowed_clients.iter().any(|a| id.matches(a)) => {
                return Err(Refusal::Denied(format!(
                    "client certificate {id} is not among the allowed clients"
                )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// What the listener offers this connection.
pub struct Context<'a> {
    /// The server TLS config, when STARTTLS is offered here.
    pub tls: Option<&'a Arc<rustls::ServerConfig>>,
    /// The listener's mode: `Require` refuses every option but STARTTLS
    /// and ABORT until TLS is up.
    pub mode: TlsMode,
    pub client: Client,
}

impl From<DecodeError> for HandshakeError {
    fn from(e: DecodeError) -> Self {
        HandshakeError::Protocol(e.to_string())
    }
}

/// What the handshake ended with.
pub enum Outcome {
    /// The client chose this export; transmission begins.
    Transmission(Arc<Export>),
    /// The client sent `NBD_OPT_ABORT` (or closed between options).
    Aborted,
}

/// Gatekeeper consulted before an export is handed out, so later layers
/// (roles) can refuse clients with a reason the client will print.
pub trait Admission: Send + Sync {
    /// Whether `export` takes clients now; `Err(why)` is shown as its
    /// description (`NBD_OPT_INFO`, `NBD_OPT_LIST`).
    fn check(&self, export: &Export) -> Result<(), String>;

    /// Admits a client to `export` for transmission, calling `attach` to
    /// count it as attached in the same step as the check, so that a role
    /// change either counts the client or refuses it. `Err(message)`
    /// refuses the client with `NBD_REP_ERR_POLICY`.
    fn admit(&self, export: &Export, attach: &mut dyn FnMut()) -> Result<(), String>;
}

/// Admits every client.
pub struct AdmitAll;

impl Admission for AdmitAll {
    fn check(&self, _export: &Export) -> Result<(), String> {
        Ok(())
    }

    fn admit(&self, _export: &Export, attach: &mut dyn FnMut()) -> Result<(), String> {
        attach();
        Ok(())
    }
}

struct Session<'a, 'c> {
    stream: &'a mut Stream,
    ctx: Context<'c>,
    deadline: Instant,
    timeout: Duration,
    no_zeroes: bool,
    out: BytesMut,
}

impl Session<'_, '_> {
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), HandshakeError> {
        if Instant::now() > self.deadline {
            return Err(HandshakeError::Timeout(self.timeout));
        }
        self.stream.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                HandshakeError::Timeout(self.timeout)
            }
            _ => HandshakeError::Io(e),
        })
    }

    fn send(&mut self) -> Result<(), HandshakeError> {
        self.stream.write_all(&self.out)?;
        self.out.clear();
        Ok(())
    }

    fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) -> Result<(), HandshakeError> {
        encode_option_reply(&mut self.out, option, reply_type, data);
        self.send()
    }

    fn error(&mut self, option: u32, reply_type: u32, message: &str) -> Result<(), HandshakeError> {
        self.reply(option, reply_type, message.as_bytes())
    }
}

/// Runs the server side of the handshake on a fresh connection. `attach`
/// is called (through `admission`) with the export a client is admitted
/// to and who the client is, before its reply is sent. After STARTTLS,
/// `stream` is the TLS stream.
pub fn serve(
    stream: &mut Stream,
    exports: &Exports,
    admission: &dyn Admission,
    attach: &mut dyn FnMut(&Export, &Client),
    timeout: Duration,
    ctx: Context<'_>,
) -> Result<Outcome, HandshakeError> {
    let mut s = Session {
        stream,
        ctx,
        deadline: Instant::now() + timeout,
        timeout,
        no_zeroes: false,
        out: BytesMut::with_capacity(256),
    };
    ServerGreeting {
        flags: handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES,
    }
    .encode(&mut s.out);
    s.send()?;

    let mut raw = [0u8; ClientFlags::LEN];
    s.read_exact(&mut raw)?;
    let flags = ClientFlags::decode(&mut Cursor::new(&raw[..]))?
        .ok_or_else(|| HandshakeError::Protocol("short client flags".into()))?;
    s.no_zeroes = flags.no_zeroes();

    for _ in 0..MAX_OPTIONS {
        let mut raw = [0u8; OptionHeader::LEN];
        match s.read_exact(&mut raw) {
            Ok(()) => {}
            // A client that hangs up between options (qemu-img info, probes)
            // is not an error worth more than a debug line.
            Err(HandshakeError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(Outcome::Aborted)
            }
            Err(e) => return Err(e),
        }
        let header = OptionHeader::decode(&mut Cursor::new(&raw[..]))?
            .ok_or_else(|| HandshakeError::Protocol("short option header".into()))?;
        if header.length > MAX_OPTION_DATA {
            return Err(HandshakeError::Protocol(format!(
                "option {} carries {} bytes, more than the {MAX_OPTION_DATA} allowed",
                header.option, header.length
            )));
        }
        let mut data = vec![0u8; header.length as usize];
        s.read_exact(&mut data)?;
        let outcome = handle_option(&mut s, header.option, &data, exports, admission, attach)?;
        if let Some(outcome) = outcome {
            return Ok(outcome);
        }
    }
    Err(HandshakeError::TooManyOptions)
}

/// Whether the export may be served to this session's client.
fn access(s: &Session<'_, '_>, export: &Export) -> Result<(), Refusal> {
    permit(&export.access(), &s.ctx.client)
}

fn handle_option(
    s: &mut Session<'_, '_>,
    option: u32,
    data: &[u8],
    exports: &Exports,
    admission: &dyn Admission,
    attach: &mut dyn FnMut(&Export, &Client),
) -> Result<Option<Outcome>, HandshakeError> {
    let in_clear = !s.ctx.client.tls;
    if in_clear && s.ctx.mode == TlsMode::Require && option != opt::ABORT && option != opt::STARTTLS
    {
        if option == opt::EXPORT_NAME {
            // No error reply exists for this option: hang up, serving
            // nothing.
            let name = nbd::decode_export_name(data).unwrap_or_default();
            return Err(HandshakeError::ExportNameWithoutTls(name));
        }
        s.error(
            option,
            rep::ERR_TLS_REQD,
            "TLS is required: send NBD_OPT_STARTTLS first",
        )?;
        return Ok(None);
    }
    match option {
        opt::EXPORT_NAME => {
            let name = nbd::decode_export_name(data)?;
            let Some(export) = exports.find(&name) else {
                // This option has no error reply: the spec says hang up.
                return Err(HandshakeError::UnknownExport(name));
            };
            if let Err(why) = access(s, export) {
                return Err(HandshakeError::ExportNameRefused {
                    name,
                    why: why.to_string(),
                });
            }
            let client = s.ctx.client.clone();
            if let Err(why) = admission.admit(export, &mut || attach(export, &client)) {
                return Err(HandshakeError::Protocol(format!(
                    "refused export {name:?} to NBD_OPT_EXPORT_NAME client: {why}"
                )));
            }
            ExportNameReply {
                size: export.size(),
                flags: export.transmission_flags(),
            }
            .encode(&mut s.out, s.no_zeroes);
            s.send()?;
            Ok(Some(Outcome::Transmission(export.clone())))
        }
        opt::ABORT => {
            // Best effort: the client may already have closed.
            let _ = s.reply(option, rep::ACK, &[]);
            Ok(Some(Outcome::Aborted))
        }
        opt::LIST => {
            if !data.is_empty() {
                s.error(option, rep::ERR_INVALID, "NBD_OPT_LIST carries no data")?;
                return Ok(None);
            }
            for export in exports.iter() {
                // Exports this client may never open (address, identity)
                // are not listed; TLS-only ones are, before STARTTLS.
                if matches!(access(s, export), Err(Refusal::Denied(_))) {
                    continue;
                }
                let mut entry = BytesMut::new();
                ServerEntry {
                    name: export.name.clone(),
                    description: describe(export, admission),
                }
                .encode(&mut entry);
                encode_option_reply(&mut s.out, option, rep::SERVER, &entry);
            }
            encode_option_reply(&mut s.out, option, rep::ACK, &[]);
            s.send()?;
            Ok(None)
        }
        opt::INFO | opt::GO => {
            let request = match InfoRequest::decode_data(data) {
                Ok(r) => r,
                Err(e) => {
                    s.error(option, rep::ERR_INVALID, &e.to_string())?;
                    return Ok(None);
                }
            };
            let Some(export) = exports.find(&request.name) else {
                let msg = format!("no export named {:?}", request.name);
                s.error(option, rep::ERR_UNKNOWN, &msg)?;
                return Ok(None);
            };
            match access(s, export) {
                Ok(()) => {}
                Err(Refusal::TlsRequired) => {
                    let msg = format!(
                        "export {:?} is served over TLS only: send NBD_OPT_STARTTLS first",
                        export.name
                    );
                    s.error(option, rep::ERR_TLS_REQD, &msg)?;
                    return Ok(None);
                }
                Err(Refusal::Denied(why)) => {
                    tracing::warn!(
                        client = ?s.ctx.client.addr, export = %export.name,
                        "refused client: {why}"
                    );
                    let msg = format!("export {:?} refused: {why}", export.name);
                    s.error(option, rep::ERR_POLICY, &msg)?;
                    return Ok(None);
                }
            }
            if option == opt::GO {
                let client = s.ctx.client.clone();
                if let Err(why) = admission.admit(export, &mut || attach(export, &client)) {
                    s.error(option, rep::ERR_POLICY, &why)?;
                    return Ok(None);
                }
            }
            // INFO answers even for a refused export, with the reason as
            // its description: clients that never print an error reply's
            // text (`nbdinfo --list`) show that.
            send_info(s, option, export, &request, &describe(export, admission))?;
            if option == opt::GO {
                Ok(Some(Outcome::Transmission(export.clone())))
            } else {
                Ok(None)
            }
        }
        opt::STARTTLS => start_tls(s, data),
        _ => {
            s.error(option, rep::ERR_UNSUP, "option not supported")?;
            Ok(None)
        }
    }
}

/// `NBD_OPT_STARTTLS`: acknowledge, then run the TLS handshake on the
/// socket; from then on the session (and transmission) use TLS.
fn start_tls(s: &mut Session<'_, '_>, data: &[u8]) -> Result<Option<Outcome>, HandshakeError> {
    let option = opt::STARTTLS;
    let Some(config) = s.ctx.tls.cloned() else {
        let why = if s.ctx.client.addr.is_none() {
            "TLS is not offered on the unix socket"
        } else {
            "TLS is not configured on this server"
        };
        s.error(option, rep::ERR_UNSUP, why)?;
        return Ok(None);
    };
    if s.ctx.client.tls {
        s.error(option, rep::ERR_INVALID, "TLS is already negotiated")?;
        return Ok(None);
    }
    if !data.is_empty() {
        s.error(option, rep::ERR_INVALID, "NBD_OPT_STARTTLS carries no data")?;
        return Ok(None);
    }
    let Stream::Tcp(tcp) = &*s.stream else {
        s.error(option, rep::ERR_UNSUP, "TLS is not offered here")?;
        return Ok(None);
    };
    let tcp = tcp.try_clone()?;
    s.reply(option, rep::ACK, &[])?;
    let tls = TlsStream::accept(tcp, config, s.deadline).map_err(HandshakeError::Tls)?;
    s.ctx.client.tls = true;
    s.ctx.client.identity = tls.peer_certificate().map(|c| Identity::of(c));
    tracing::info!(
        client = ?s.ctx.client.addr,
        identity = %s.ctx.client.identity.as_ref().map(|i| i.to_string()).unwrap_or_else(|| "none".into()),
        "TLS established"
    );
    *s.stream = Stream::Tls(tls);
    Ok(None)
}

/// The description clients see: the configured one, or why the export
/// refuses clients now.
fn describe(export: &Export, admission: &dyn Admission) -> String {
    match admission.check(export) {
        Ok(()) => export.description.clone(),
        Err(why) => format!("REFUSING CLIENTS: {why}"),
    }
}

fn send_info(
    s: &mut Session<'_, '_>,
    option: u32,
    export: &Export,
    request: &InfoRequest,
    description: &str,
) -> Result<(), HandshakeError> {
    let mut items = vec![InfoReply::Export {
        size: export.size(),
        flags: export.transmission_flags(),
    }];
    for kind in &request.requests {
        match *kind {
            info::NAME => items.push(InfoReply::Name(export.name.clone())),
            info::DESCRIPTION if !description.is_empty() => {
                items.push(InfoReply::Description(description.to_owned()))
            }
            info::BLOCK_SIZE => items.push(InfoReply::BlockSize {
                minimum: MIN_BLOCK,
                preferred: PREFERRED_BLOCK,
                maximum: MAX_PAYLOAD,
            }),
            _ => {}
        }
    }
    for item in items {
        let mut data = BytesMut::new();
        item.encode(&mut data);
        encode_option_reply(&mut s.out, option, rep::INFO, &data);
    }
    encode_option_reply(&mut s.out, option, rep::ACK, &[]);
    s.send()
}
