//! The Linux kernel NBD driver's generic netlink interface (family `nbd`,
//! uapi `linux/nbd-netlink.h`), spoken over a raw `AF_NETLINK` socket:
//! message encoding and decoding (pure, unit-tested), and `NbdNetlink`,
//! which connects, reconfigures, disconnects and queries `/dev/nbdX`, and
//! `EventSocket`, which receives the driver's `NBD_CMD_LINK_DEAD`
//! multicast events.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use thiserror::Error;

// ---- netlink and generic netlink constants (linux/netlink.h, genetlink.h)

const NETLINK_GENERIC: i32 = 16;
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(1 << 15 | 1 << 14);

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NLMSGERR_ATTR_MSG: u16 = 1;

const SOL_NETLINK: i32 = 270;
const NETLINK_ADD_MEMBERSHIP: i32 = 1;
const NETLINK_CAP_ACK: i32 = 10;
const NETLINK_EXT_ACK: i32 = 11;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

// ---- the nbd family (linux/nbd-netlink.h)

pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
pub const NBD_GENL_VERSION: u8 = 1;
pub const NBD_GENL_MCAST_GROUP_NAME: &str = "nbd_mc_group";

pub mod attr {
    pub const INDEX: u16 = 1;
    pub const SIZE_BYTES: u16 = 2;
    pub const BLOCK_SIZE_BYTES: u16 = 3;
    pub const TIMEOUT: u16 = 4;
    pub const SERVER_FLAGS: u16 = 5;
    pub const CLIENT_FLAGS: u16 = 6;
    pub const SOCKETS: u16 = 7;
    pub const DEAD_CONN_TIMEOUT: u16 = 8;
    pub const DEVICE_LIST: u16 = 9;
    pub const BACKEND_IDENTIFIER: u16 = 10;
    /// Nested in `DEVICE_LIST`.
    pub const DEVICE_ITEM: u16 = 1;
    /// Nested in `DEVICE_ITEM`.
    pub const DEVICE_INDEX: u16 = 1;
    pub const DEVICE_CONNECTED: u16 = 2;
    /// Nested in `SOCKETS`.
    pub const SOCK_ITEM: u16 = 1;
    /// Nested in `SOCK_ITEM`.
    pub const SOCK_FD: u16 = 1;
}

pub mod cmd {
    pub const CONNECT: u8 = 1;
    pub const DISCONNECT: u8 = 2;
    pub const RECONFIGURE: u8 = 3;
    pub const LINK_DEAD: u8 = 4;
    pub const STATUS: u8 = 5;
}

/// `NBD_CFLAG_DESTROY_ON_DISCONNECT`: the device goes away on disconnect.
pub const CFLAG_DESTROY_ON_DISCONNECT: u64 = 1;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error(
        "the kernel has no generic netlink family {0:?} (is the nbd module loaded? `modprobe nbd`)"
    )]
    NoFamily(String),
    #[error("{what}: {err}{}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Kernel {
        what: &'static str,
        err: io::Error,
        detail: Option<String>,
    },
    #[error("malformed netlink message: {0}")]
    Malformed(String),
    #[error("no answer from the kernel within {0:?}")]
    Timeout(Duration),
}

fn malformed(what: impl Into<String>) -> NetlinkError {
    NetlinkError::Malformed(what.into())
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// One generic netlink message being built: header, genl header, then
/// attributes (nested ones through `nest_start`/`nest_end`).
pub struct MsgBuilder {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl MsgBuilder {
    pub fn new(family: u16, flags: u16, seq: u32, command: u8, version: u8) -> MsgBuilder {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills ours
        buf.extend_from_slice(&[command, version, 0, 0]);
        MsgBuilder {
            buf,
            nests: Vec::new(),
        }
    }

    pub fn put(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = NLA_HDRLEN + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn put_u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    pub fn put_u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    pub fn put_str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.put(kind, &v)
    }

    pub fn nest_start(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn nest_end(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("nest_end without nest_start");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        assert!(self.nests.is_empty(), "unclosed nested attribute");
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// One netlink message out of a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// Splits a datagram into its netlink messages.
pub fn messages(mut buf: &[u8]) -> Result<Vec<Message<'_>>, NetlinkError> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(malformed(format!(
                "message length {len} in a datagram of {} bytes",
                buf.len()
            )));
        }
        out.push(Message {
            kind: u16::from_ne_bytes([buf[4], buf[5]]),
            flags: u16::from_ne_bytes([buf[6], buf[7]]),
            seq: u32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes")),
            payload: &buf[NLMSG_HDRLEN..len],
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// Attributes as (type with the flag bits masked off, data).
pub type Attrs<'a> = Vec<(u16, &'a [u8])>;

/// The attributes of a payload.
pub fn attrs(mut buf: &[u8]) -> Result<Attrs<'_>, NetlinkError> {
    let mut out = Vec::new();
    while buf.len() >= NLA_HDRLEN {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            return Err(malformed(format!(
                "attribute {kind} of length {len} in {} bytes",
                buf.len()
            )));
        }
        out.push((kind, &buf[NLA_HDRLEN..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

fn find<'a>(list: &[(u16, &'a [u8])], kind: u16) -> Option<&'a [u8]> {
    list.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
}

fn get_u32(list: &[(u16, &[u8])], kind: u16) -> Option<u32> {
    find(list, kind)
        .and_then(|v| v.get(..4))
        .map(|v| u32::from_ne_bytes(v.try_into().expect("4 bytes")))
}

/// A generic netlink message's command and attributes.
pub fn genl(payload: &[u8]) -> Result<(u8, Attrs<'_>), NetlinkError> {
    if payload.len() < GENL_HDRLEN {
        return Err(malformed("generic netlink header cut short"));
    }
    Ok((payload[0], attrs(&payload[GENL_HDRLEN..])?))
}

/// An `NLMSG_ERROR` payload: the errno (0 for an acknowledgement) and the
/// extended-ack message if the kernel sent one.
pub fn error_payload(flags: u16, payload: &[u8]) -> Result<(i32, Option<String>), NetlinkError> {
    if payload.len() < 4 + NLMSG_HDRLEN {
        return Err(malformed("NLMSG_ERROR cut short"));
    }
    let errno = i32::from_ne_bytes(payload[0..4].try_into().expect("4 bytes"));
    let mut detail = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        // The request is echoed whole, or as its header only when the
        // kernel says it capped it (acks, or NETLINK_CAP_ACK).
        let echoed = u32::from_ne_bytes(payload[4..8].try_into().expect("4 bytes")) as usize;
        let skip = if flags & NLM_F_CAPPED != 0 {
            4 + NLMSG_HDRLEN
        } else {
            4 + align4(echoed.max(NLMSG_HDRLEN))
        };
        let skip = skip.min(payload.len());
        if let Ok(list) = attrs(&payload[skip..]) {
            detail = find(&list, NLMSGERR_ATTR_MSG)
                .map(|m| String::from_utf8_lossy(m).trim_end_matches('\0').to_owned());
        }
    }
    Ok((-errno, detail))
}

/// The family id and multicast groups out of a `CTRL_CMD_GETFAMILY` reply.
pub fn parse_family(payload: &[u8]) -> Result<(u16, Vec<(String, u32)>), NetlinkError> {
    let (_, list) = genl(payload)?;
    let id = find(&list, CTRL_ATTR_FAMILY_ID)
        .and_then(|v| v.get(..2))
        .map(|v| u16::from_ne_bytes([v[0], v[1]]))
        .ok_or_else(|| malformed("family reply without CTRL_ATTR_FAMILY_ID"))?;
    let mut groups = Vec::new();
    if let Some(nested) = find(&list, CTRL_ATTR_MCAST_GROUPS) {
        for (_, group) in attrs(nested)? {
            let g = attrs(group)?;
            if let (Some(name), Some(gid)) = (
                find(&g, CTRL_ATTR_MCAST_GRP_NAME),
                get_u32(&g, CTRL_ATTR_MCAST_GRP_ID),
            ) {
                let name = String::from_utf8_lossy(name)
                    .trim_end_matches('\0')
                    .to_owned();
                groups.push((name, gid));
            }
        }
    }
    Ok((id, groups))
}

/// Parameters of `NBD_CMD_CONNECT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// `/dev/nbdINDEX`.
    pub index: u32,
    pub size: u64,
    pub block_size: u64,
    /// Transmission flags from the handshake.
    pub server_flags: u64,
    pub client_flags: u64,
    /// Per-request timeout: a request unanswered this long on a dead
    /// connection is requeued (0 = never).
    pub timeout: Duration,
    /// How long I/O waits for a new socket after the connection died.
    pub dead_conn_timeout: Duration,
    /// Identifies the backend (shown in sysfs `backend`).
    pub backend: String,
}

fn put_sockets(m: &mut MsgBuilder, fds: &[RawFd]) {
    m.nest_start(attr::SOCKETS);
    for fd in fds {
        m.nest_start(attr::SOCK_ITEM);
        m.put_u32(attr::SOCK_FD, *fd as u32);
        m.nest_end();
    }
    m.nest_end();
}

/// The `NBD_CMD_CONNECT` request.
pub fn connect_msg(family: u16, seq: u32, p: &ConnectParams, fds: &[RawFd]) -> Vec<u8> {
    let mut m = MsgBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        cmd::CONNECT,
        NBD_GENL_VERSION,
    );
    m.put_u32(attr::INDEX, p.index)
        .put_u64(attr::SIZE_BYTES, p.size)
        .put_u64(attr::BLOCK_SIZE_BYTES, p.block_size)
        .put_u64(attr::SERVER_FLAGS, p.server_flags)
        .put_u64(attr::CLIENT_FLAGS, p.client_flags)
        .put_u64(attr::TIMEOUT, p.timeout.as_secs())
        .put_u64(attr::DEAD_CONN_TIMEOUT, p.dead_conn_timeout.as_secs());
    if !p.backend.is_empty() {
        m.put_str(attr::BACKEND_IDENTIFIER, &p.backend);
    }
    put_sockets(&mut m, fds);
    m.finish()
}

/// The `NBD_CMD_RECONFIGURE` request handing the kernel new sockets. A
/// device connected with a backend identifier must be given the same one.
pub fn reconfigure_msg(family: u16, seq: u32, index: u32, backend: &str, fds: &[RawFd]) -> Vec<u8> {
    let mut m = MsgBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        cmd::RECONFIGURE,
        NBD_GENL_VERSION,
    );
    m.put_u32(attr::INDEX, index);
    if !backend.is_empty() {
        m.put_str(attr::BACKEND_IDENTIFIER, backend);
    }
    put_sockets(&mut m, fds);
    m.finish()
}

/// A request carrying only the device index (`DISCONNECT`, `STATUS`).
pub fn index_msg(family: u16, seq: u32, command: u8, index: u32) -> Vec<u8> {
    let mut m = MsgBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        command,
        NBD_GENL_VERSION,
    );
    m.put_u32(attr::INDEX, index);
    m.finish()
}

/// The devices listed in an `NBD_CMD_STATUS` reply: (index, connected).
pub fn parse_status(payload: &[u8]) -> Result<Vec<(u32, bool)>, NetlinkError> {
    let (_, list) = genl(payload)?;
    let mut out = Vec::new();
    let Some(devices) = find(&list, attr::DEVICE_LIST) else {
        return Ok(out);
    };
    for (kind, item) in attrs(devices)? {
        if kind != attr::DEVICE_ITEM {
            continue;
        }
        let a = attrs(item)?;
        let index = get_u32(&a, attr::DEVICE_INDEX)
            .ok_or_else(|| malformed("device item without NBD_DEVICE_INDEX"))?;
        let connected = find(&a, attr::DEVICE_CONNECTED)
            .and_then(|v| v.first())
            .is_some_and(|b| *b != 0);
        out.push((index, connected));
    }
    Ok(out)
}

/// A multicast event of the nbd family: (command, device index).
pub fn parse_event(payload: &[u8]) -> Result<(u8, Option<u32>), NetlinkError> {
    let (command, list) = genl(payload)?;
    Ok((command, get_u32(&list, attr::INDEX)))
}

// ---------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------

/// A bound `NETLINK_GENERIC` socket.
struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: a valid fd and a pointer to an int of the size passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

impl GenlSocket {
    fn open() -> io::Result<GenlSocket> {
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_GENERIC,
            )
        })?;
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: binding with a properly sized sockaddr_nl.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        // Error messages from the kernel where it gives them; best effort.
        let _ = setsockopt_int(fd.as_raw_fd(), SOL_NETLINK, NETLINK_CAP_ACK, 1);
        let _ = setsockopt_int(fd.as_raw_fd(), SOL_NETLINK, NETLINK_EXT_ACK, 1);
        Ok(GenlSocket {
            fd,
            seq: 1,
            buf: vec![0u8; 64 * 1024],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: a valid fd and a timeval of the size passed.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        Ok(())
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl is plain data; zero is the kernel's address.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: the buffer and address outlive the call; sizes match.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one datagram into the socket's buffer; `Ok(0)` on timeout.
    fn recv(&mut self) -> io::Result<usize> {
        loop {
            // SAFETY: the buffer is valid for its whole length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return Ok(0),
                _ => return Err(e),
            }
        }
    }

    /// Sends a request (built with `seq`) and collects the payloads of its
    /// replies until the kernel's acknowledgement.
    fn request(
        &mut self,
        what: &'static str,
        seq: u32,
        msg: &[u8],
    ) -> Result<Vec<Vec<u8>>, NetlinkError> {
        const WAIT: Duration = Duration::from_secs(30);
        self.set_timeout(WAIT)?;
        self.send(msg)?;
        let mut replies = Vec::new();
        loop {
            let n = self.recv()?;
            if n == 0 {
                return Err(NetlinkError::Timeout(WAIT));
            }
            for m in messages(&self.buf[..n])? {
                if m.seq != seq {
                    continue;
                }
                match m.kind {
                    NLMSG_ERROR => {
                        let (errno, detail) = error_payload(m.flags, m.payload)?;
                        if errno == 0 {
                            return Ok(replies);
                        }
                        return Err(NetlinkError::Kernel {
                            what,
                            err: io::Error::from_raw_os_error(errno),
                            detail,
                        });
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(m.payload.to_vec()),
                }
            }
        }
    }
}

/// The kernel's NBD driver, through generic netlink.
pub struct NbdNetlink {
    sock: GenlSocket,
    family: u16,
    group: Option<u32>,
}

impl NbdNetlink {
    /// Opens a socket and looks the `nbd` family up.
    pub fn open() -> Result<NbdNetlink, NetlinkError> {
        let mut sock = GenlSocket::open()?;
        let seq = sock.next_seq();
        let mut m = MsgBuilder::new(
            GENL_ID_CTRL,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            CTRL_CMD_GETFAMILY,
            1,
        );
        m.put_str(CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME);
        let replies = match sock.request("looking up the nbd family", seq, &m.finish()) {
            Err(NetlinkError::Kernel { err, .. }) if err.raw_os_error() == Some(libc::ENOENT) => {
                return Err(NetlinkError::NoFamily(NBD_GENL_FAMILY_NAME.into()))
            }
            other => other?,
        };
        let reply = replies
            .first()
            .ok_or_else(|| malformed("no answer to CTRL_CMD_GETFAMILY"))?;
        let (family, groups) = parse_family(reply)?;
        let group = groups
            .iter()
            .find(|(name, _)| name == NBD_GENL_MCAST_GROUP_NAME)
            .map(|(_, id)| *id);
        Ok(NbdNetlink {
            sock,
            family,
            group,
        })
    }

    /// `NBD_CMD_CONNECT`: configures `/dev/nbdINDEX` with the connected,
    /// handshaken sockets. Returns the index the kernel used.
    pub fn connect(&mut self, p: &ConnectParams, fds: &[RawFd]) -> Result<u32, NetlinkError> {
        let seq = self.sock.next_seq();
        let msg = connect_msg(self.family, seq, p, fds);
        let replies = self.sock.request("NBD_CMD_CONNECT", seq, &msg)?;
        for r in &replies {
            if let Ok((_, Some(index))) = parse_event(r) {
                return Ok(index);
            }
        }
        Ok(p.index)
    }

    /// `NBD_CMD_RECONFIGURE`: gives the device new sockets in place of
    /// dead ones; queued I/O goes out on them.
    pub fn reconfigure(
        &mut self,
        index: u32,
        backend: &str,
        fds: &[RawFd],
    ) -> Result<(), NetlinkError> {
        let seq = self.sock.next_seq();
        let msg = reconfigure_msg(self.family, seq, index, backend, fds);
        self.sock.request("NBD_CMD_RECONFIGURE", seq, &msg)?;
        Ok(())
    }

    /// `NBD_CMD_DISCONNECT`.
    pub fn disconnect(&mut self, index: u32) -> Result<(), NetlinkError> {
        let seq = self.sock.next_seq();
        let msg = index_msg(self.family, seq, cmd::DISCONNECT, index);
        self.sock.request("NBD_CMD_DISCONNECT", seq, &msg)?;
        Ok(())
    }

    /// `NBD_CMD_STATUS`: whether `/dev/nbdINDEX` is connected (`None`
    /// if the kernel does not list the device).
    pub fn status(&mut self, index: u32) -> Result<Option<bool>, NetlinkError> {
        let seq = self.sock.next_seq();
        let msg = index_msg(self.family, seq, cmd::STATUS, index);
        let replies = self.sock.request("NBD_CMD_STATUS", seq, &msg)?;
        for r in &replies {
            for (i, connected) in parse_status(r)? {
                if i == index {
                    return Ok(Some(connected));
                }
            }
        }
        Ok(None)
    }

    /// A second socket subscribed to the family's multicast group, for
    /// `NBD_CMD_LINK_DEAD`.
    pub fn subscribe(&self) -> Result<EventSocket, NetlinkError> {
        let group = self
            .group
            .ok_or_else(|| malformed("the nbd family has no multicast group"))?;
        let sock = GenlSocket::open()?;
        setsockopt_int(
            sock.fd.as_raw_fd(),
            SOL_NETLINK,
            NETLINK_ADD_MEMBERSHIP,
            group as i32,
        )?;
        Ok(EventSocket {
            sock,
            family: self.family,
        })
    }
}

/// Receives the nbd family's multicast events.
pub struct EventSocket {
    sock: GenlSocket,
    family: u16,
}

impl EventSocket {
    /// Waits up to `timeout` for events: (command, device index) each.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<(u8, Option<u32>)>, NetlinkError> {
        self.sock.set_timeout(timeout)?;
        let n = self.sock.recv()?;
        let mut out = Vec::new();
        for m in messages(&self.sock.buf[..n])? {
            if m.kind == self.family {
                out.push(parse_event(m.payload)?);
            }
        }
        Ok(out)
    }
}

/// The index N of `/dev/nbdN` (also accepts `nbdN`).
pub fn device_index(device: &str) -> Option<u32> {
    let name = device.strip_prefix("/dev/").unwrap_or(device);
    let digits = name.strip_prefix("nbd")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ConnectParams {
        ConnectParams {
            index: 0,
            size: 1 << 30,
            block_size: 4096,
            server_flags: 0x1ed,
            client_flags: 0,
            timeout: Duration::from_secs(5),
            dead_conn_timeout: Duration::from_secs(120),
            backend: String::new(),
        }
    }

    #[test]
    fn connect_message_layout() {
        let msg = connect_msg(0x22, 7, &params(), &[9]);
        // nlmsghdr
        assert_eq!(
            u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize,
            msg.len()
        );
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), 0x22);
        assert_eq!(
            u16::from_ne_bytes([msg[6], msg[7]]),
            NLM_F_REQUEST | NLM_F_ACK
        );
        assert_eq!(u32::from_ne_bytes(msg[8..12].try_into().unwrap()), 7);
        // genlmsghdr
        assert_eq!(&msg[16..20], &[cmd::CONNECT, 1, 0, 0]);
        // INDEX is a u32 attribute: 8 bytes in all.
        assert_eq!(u16::from_ne_bytes([msg[20], msg[21]]), 8);
        assert_eq!(u16::from_ne_bytes([msg[22], msg[23]]), attr::INDEX);
        // SIZE_BYTES is a u64: 12 bytes.
        assert_eq!(u16::from_ne_bytes([msg[28], msg[29]]), 12);
        assert_eq!(u16::from_ne_bytes([msg[30], msg[31]]), attr::SIZE_BYTES);
        assert_eq!(u64::from_ne_bytes(msg[32..40].try_into().unwrap()), 1 << 30);
        assert_eq!(msg.len() % 4, 0);
    }

    #[test]
    fn connect_message_round_trips_through_the_decoder() {
        let msg = connect_msg(0x22, 7, &params(), &[9, 11]);
        let m = messages(&msg).unwrap();
        assert_eq!(m.len(), 1);
        let (command, list) = genl(m[0].payload).unwrap();
        assert_eq!(command, cmd::CONNECT);
        assert_eq!(get_u32(&list, attr::INDEX), Some(0));
        let u64_of = |k| u64::from_ne_bytes(find(&list, k).unwrap().try_into().unwrap());
        assert_eq!(u64_of(attr::BLOCK_SIZE_BYTES), 4096);
        assert_eq!(u64_of(attr::SERVER_FLAGS), 0x1ed);
        assert_eq!(u64_of(attr::TIMEOUT), 5);
        assert_eq!(u64_of(attr::DEAD_CONN_TIMEOUT), 120);
        // SOCKETS is nested (the flag bit set on the wire, masked here),
        // holding one SOCK_ITEM per fd, each with a SOCK_FD.
        let raw_kind = {
            let pos = msg.len() - (4 + 2 * 12);
            u16::from_ne_bytes([msg[pos + 2], msg[pos + 3]])
        };
        assert_eq!(raw_kind, attr::SOCKETS | NLA_F_NESTED);
        let socks = attrs(find(&list, attr::SOCKETS).unwrap()).unwrap();
        let fds: Vec<u32> = socks
            .iter()
            .map(|(k, item)| {
                assert_eq!(*k, attr::SOCK_ITEM);
                get_u32(&attrs(item).unwrap(), attr::SOCK_FD).unwrap()
            })
            .collect();
        assert_eq!(fds, vec![9, 11]);
    }

    #[test]
    fn reconfigure_names_the_backend_it_was_connected_with() {
        let msg = reconfigure_msg(0x22, 8, 2, "replblk:r0", &[5]);
        let m = messages(&msg).unwrap();
        let (command, list) = genl(m[0].payload).unwrap();
        assert_eq!(command, cmd::RECONFIGURE);
        assert_eq!(get_u32(&list, attr::INDEX), Some(2));
        assert_eq!(
            find(&list, attr::BACKEND_IDENTIFIER),
            Some(&b"replblk:r0\0"[..])
        );
        let without = reconfigure_msg(0x22, 8, 2, "", &[5]);
        let (_, list) = genl(messages(&without).unwrap()[0].payload).unwrap();
        assert_eq!(find(&list, attr::BACKEND_IDENTIFIER), None);
    }

    #[test]
    fn strings_are_nul_terminated_and_padded() {
        let mut m = MsgBuilder::new(GENL_ID_CTRL, NLM_F_REQUEST, 1, CTRL_CMD_GETFAMILY, 1);
        m.put_str(CTRL_ATTR_FAMILY_NAME, "nbd");
        let msg = m.finish();
        assert_eq!(msg.len(), 16 + 4 + 8);
        assert_eq!(&msg[20..28], &[8, 0, 2, 0, b'n', b'b', b'd', 0]);
    }

    fn kernel_reply(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn family_reply_gives_id_and_multicast_group() {
        let mut m = MsgBuilder::new(GENL_ID_CTRL, 0, 1, 1, 1);
        m.put(CTRL_ATTR_FAMILY_ID, &0x1fu16.to_ne_bytes());
        m.put_str(CTRL_ATTR_FAMILY_NAME, "nbd");
        m.nest_start(CTRL_ATTR_MCAST_GROUPS);
        m.nest_start(1);
        m.put_u32(CTRL_ATTR_MCAST_GRP_ID, 5);
        m.put_str(CTRL_ATTR_MCAST_GRP_NAME, "nbd_mc_group");
        m.nest_end();
        m.nest_end();
        let msg = m.finish();
        let (id, groups) = parse_family(messages(&msg).unwrap()[0].payload).unwrap();
        assert_eq!(id, 0x1f);
        assert_eq!(groups, vec![("nbd_mc_group".to_owned(), 5)]);
    }

    #[test]
    fn status_reply_lists_devices() {
        let mut m = MsgBuilder::new(0x22, 0, 3, cmd::STATUS, 1);
        m.nest_start(attr::DEVICE_LIST);
        for (i, c) in [(0u32, 1u8), (1, 0)] {
            m.nest_start(attr::DEVICE_ITEM);
            m.put_u32(attr::DEVICE_INDEX, i);
            m.put(attr::DEVICE_CONNECTED, &[c]);
            m.nest_end();
        }
        m.nest_end();
        let msg = m.finish();
        let list = parse_status(messages(&msg).unwrap()[0].payload).unwrap();
        assert_eq!(list, vec![(0, true), (1, false)]);
    }

    #[test]
    fn link_dead_event_names_the_device() {
        let mut m = MsgBuilder::new(0x22, 0, 0, cmd::LINK_DEAD, 1);
        m.put_u32(attr::INDEX, 3);
        let msg = m.finish();
        let ev = parse_event(messages(&msg).unwrap()[0].payload).unwrap();
        assert_eq!(ev, (cmd::LINK_DEAD, Some(3)));
    }

    #[test]
    fn error_with_extended_ack_message() {
        let mut body = Vec::new();
        body.extend_from_slice(&(-libc::EBUSY).to_ne_bytes());
        body.extend_from_slice(&kernel_reply(0x22, 5, 9, &[])); // echoed header
        let mut tlv = MsgBuilder::new(0, 0, 0, 0, 0);
        tlv.put_str(NLMSGERR_ATTR_MSG, "device busy");
        let tlv = tlv.finish();
        body.extend_from_slice(&tlv[20..]);
        let msg = kernel_reply(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 9, &body);
        let m = messages(&msg).unwrap();
        let (errno, detail) = error_payload(m[0].flags, m[0].payload).unwrap();
        assert_eq!(errno, libc::EBUSY);
        assert_eq!(detail.as_deref(), Some("device busy"));
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let msg = connect_msg(0x22, 7, &params(), &[9]);
        for cut in 0..msg.len() {
            let _ = messages(&msg[..cut]).map(|ms| {
                for m in ms {
                    let _ = genl(m.payload);
                }
            });
        }
        // An attribute claiming more than there is.
        assert!(attrs(&[200, 0, 1, 0, 0, 0, 0, 0]).is_err());
        assert!(messages(&[100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(error_payload(0, &[0, 0]).is_err());
    }

    #[test]
    fn device_names() {
        assert_eq!(device_index("/dev/nbd0"), Some(0));
        assert_eq!(device_index("nbd12"), Some(12));
        assert_eq!(device_index("/dev/sda"), None);
        assert_eq!(device_index("/dev/nbd"), None);
        assert_eq!(device_index("/dev/nbd1p1"), None);
    }
}
