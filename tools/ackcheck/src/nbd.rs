//! A small blocking NBD client: fixed newstyle handshake with
//! `NBD_OPT_GO`, simple replies, requests pipelined by cookie.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use replblk_proto::nbd::{
    client_flags, cmd, handshake_flags, info, opt, rep, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC,
    REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

/// `nbd://HOST:PORT/EXPORT`, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    pub addr: String,
    pub export: String,
}

pub fn parse_uri(uri: &str) -> Result<Uri> {
    let rest = uri
        .strip_prefix("nbd://")
        .ok_or_else(|| anyhow!("{uri}: only nbd://HOST:PORT/EXPORT is supported"))?;
    let (addr, export) = rest.split_once('/').unwrap_or((rest, ""));
    if addr.is_empty() {
        bail!("{uri}: no host");
    }
    let addr = if addr.contains(':') {
        addr.to_owned()
    } else {
        format!("{addr}:10809")
    };
    Ok(Uri {
        addr,
        export: export.to_owned(),
    })
}

pub struct Conn {
    pub stream: TcpStream,
    pub size: u64,
    pub flags: u16,
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl Conn {
    pub fn open(uri: &Uri, timeout: Duration) -> Result<Conn> {
        let addr = uri
            .addr
            .parse()
            .with_context(|| format!("{}: not an address", uri.addr))?;
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {}", uri.addr))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        if read_u64(&mut s)? != NBDMAGIC || read_u64(&mut s)? != IHAVEOPT {
            bail!("{}: not a newstyle NBD server", uri.addr);
        }
        let hflags = read_u16(&mut s)?;
        if hflags & handshake_flags::FIXED_NEWSTYLE == 0 {
            bail!("{}: server does not speak fixed newstyle", uri.addr);
        }
        let no_zeroes = hflags & handshake_flags::NO_ZEROES != 0;
        let mut cflags = client_flags::FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= client_flags::NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes())?;
        let name = uri.export.as_bytes();
        let mut msg = Vec::new();
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&opt::GO.to_be_bytes());
        msg.extend_from_slice(&((4 + name.len() + 2) as u32).to_be_bytes());
        msg.extend_from_slice(&(name.len() as u32).to_be_bytes());
        msg.extend_from_slice(name);
        msg.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&msg)?;
        let mut export = None;
        loop {
            if read_u64(&mut s)? != OPTION_REPLY_MAGIC {
                bail!("{}: bad option reply magic", uri.addr);
            }
            let _option = read_u32(&mut s)?;
            let kind = read_u32(&mut s)?;
            let len = read_u32(&mut s)? as usize;
            if len > 1 << 20 {
                bail!("{}: option reply of {len} bytes", uri.addr);
            }
            let mut data = vec![0; len];
            s.read_exact(&mut data)?;
            if kind & rep::ERR_BIT != 0 {
                bail!(
                    "{}: export {:?} refused ({kind:#x}): {}",
                    uri.addr,
                    uri.export,
                    String::from_utf8_lossy(&data)
                );
            }
            match kind {
                rep::INFO
                    if data.len() >= 12
                        && u16::from_be_bytes([data[0], data[1]]) == info::EXPORT =>
                {
                    let size = u64::from_be_bytes(data[2..10].try_into()?);
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    export = Some((size, flags));
                }
                rep::ACK => break,
                _ => {}
            }
        }
        let (size, flags) = export.ok_or_else(|| anyhow!("{}: no export info", uri.addr))?;
        s.set_read_timeout(None)?;
        Ok(Conn {
            stream: s,
            size,
            flags,
        })
    }
}

/// Writes one request (and its payload, for a write).
pub fn send(
    w: &mut impl Write,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) -> io::Result<()> {
    let mut b = Vec::with_capacity(28 + payload.len());
    b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    w.write_all(&b)
}

/// Reads one simple reply's header: (cookie, error).
pub fn recv(r: &mut impl Read) -> io::Result<(u64, u32)> {
    if read_u32(r)? != SIMPLE_REPLY_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad reply magic",
        ));
    }
    let error = read_u32(r)?;
    let cookie = read_u64(r)?;
    Ok((cookie, error))
}

/// Reads `buf.len()` bytes at `offset`, one request at a time.
pub fn read_at(conn: &mut Conn, offset: u64, buf: &mut [u8]) -> Result<()> {
    send(
        &mut conn.stream,
        cmd::READ,
        1,
        offset,
        buf.len() as u32,
        &[],
    )?;
    let (_, error) = recv(&mut conn.stream)?;
    if error != 0 {
        bail!("read at {offset} failed: error {error}");
    }
    conn.stream.read_exact(buf)?;
    Ok(())
}

pub fn disconnect(conn: &mut Conn) {
    let _ = send(&mut conn.stream, cmd::DISC, 0, 0, 0, &[]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            parse_uri("nbd://127.0.0.1:1234/r0").expect("valid"),
            Uri {
                addr: "127.0.0.1:1234".into(),
                export: "r0".into()
            }
        );
        assert_eq!(
            parse_uri("nbd://127.0.0.1").expect("valid").addr,
            "127.0.0.1:10809"
        );
        assert!(parse_uri("http://x/y").is_err());
        assert!(parse_uri("nbd:///r0").is_err());
    }
}
