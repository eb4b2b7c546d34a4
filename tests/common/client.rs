//! A minimal blocking NBD client for protocol tests, built on the proto
//! crate. It can do things real clients never do (bad magic, bad flags,
//! half payloads) so the server's handling of them can be checked.

use std::io::{Cursor, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::BytesMut;
use replblk_proto::nbd::{
    client_flags, opt, ClientFlags, Command, InfoReply, InfoRequest, OptionHeader,
    OptionReplyHeader, Request, ServerGreeting, SimpleReply,
};

pub struct Client {
    pub stream: TcpStream,
    pub size: u64,
    pub flags: u16,
    next_cookie: u64,
}

/// One option reply as received.
#[derive(Debug)]
pub struct OptReply {
    pub header: OptionReplyHeader,
    pub data: Vec<u8>,
}

pub fn connect_raw(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Reads the greeting and sends client flags; the stream is then in option
/// haggling.
pub fn greet(stream: &mut TcpStream) -> ServerGreeting {
    let mut raw = [0u8; ServerGreeting::LEN];
    stream.read_exact(&mut raw).expect("greeting");
    let g = ServerGreeting::decode(&mut Cursor::new(&raw[..]))
        .expect("valid greeting")
        .expect("complete greeting");
    let mut out = BytesMut::new();
    ClientFlags(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).encode(&mut out);
    stream.write_all(&out).expect("client flags");
    g
}

pub fn send_option(stream: &mut TcpStream, option: u32, data: &[u8]) {
    let mut out = BytesMut::new();
    OptionHeader {
        option,
        length: data.len() as u32,
    }
    .encode(&mut out);
    out.extend_from_slice(data);
    stream.write_all(&out).expect("send option");
}

pub fn read_option_reply(stream: &mut TcpStream) -> OptReply {
    let mut raw = [0u8; OptionReplyHeader::LEN];
    stream.read_exact(&mut raw).expect("option reply header");
    let header = OptionReplyHeader::decode(&mut Cursor::new(&raw[..]))
        .expect("valid reply")
        .expect("complete reply");
    let mut data = vec![0u8; header.length as usize];
    stream.read_exact(&mut data).expect("option reply data");
    OptReply { header, data }
}

/// Sends NBD_OPT_GO (or INFO) and collects replies up to the final one.
pub fn go(stream: &mut TcpStream, option: u32, name: &str, requests: &[u16]) -> Vec<OptReply> {
    let mut data = BytesMut::new();
    InfoRequest {
        name: name.into(),
        requests: requests.to_vec(),
    }
    .encode(&mut data);
    send_option(stream, option, &data);
    let mut replies = Vec::new();
    loop {
        let r = read_option_reply(stream);
        let last = r.header.reply_type != replblk_proto::nbd::rep::INFO;
        replies.push(r);
        if last {
            return replies;
        }
    }
}

impl Client {
    /// Connects and enters transmission on `export` with NBD_OPT_GO.
    pub fn connect(addr: &str, export: &str) -> Client {
        let mut stream = connect_raw(addr);
        greet(&mut stream);
        let replies = go(&mut stream, opt::GO, export, &[]);
        Client::after_go(stream, &replies)
    }

    /// The client of a stream whose NBD_OPT_GO got `replies`.
    pub fn after_go(stream: TcpStream, replies: &[OptReply]) -> Client {
        let last = replies.last().expect("a reply");
        assert_eq!(
            last.header.reply_type,
            replblk_proto::nbd::rep::ACK,
            "GO refused: {:?}",
            String::from_utf8_lossy(&last.data)
        );
        let mut size = 0;
        let mut flags = 0;
        for r in replies {
            if let Ok(InfoReply::Export { size: s, flags: f }) = InfoReply::decode_data(&r.data) {
                size = s;
                flags = f;
            }
        }
        Client {
            stream,
            size,
            flags,
            next_cookie: 1,
        }
    }

    pub fn send(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.send_with_cookie(cookie, command, flags, offset, length, payload);
        cookie
    }

    pub fn send_with_cookie(
        &mut self,
        cookie: u64,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut out = BytesMut::new();
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(&mut out);
        out.extend_from_slice(payload);
        self.stream.write_all(&out).expect("send request");
    }

    /// Reads one simple reply header.
    pub fn recv(&mut self) -> SimpleReply {
        let mut raw = [0u8; SimpleReply::LEN];
        self.stream.read_exact(&mut raw).expect("reply header");
        SimpleReply::decode(&mut Cursor::new(&raw[..]))
            .expect("valid reply")
            .expect("complete reply")
    }

    pub fn recv_data(&mut self, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.stream.read_exact(&mut data).expect("read data");
        data
    }

    /// One request, one reply; returns the error value.
    pub fn call(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u32 {
        let cookie = self.send(command, flags, offset, length, payload);
        let reply = self.recv();
        assert_eq!(reply.cookie, cookie, "reply for another request");
        reply.error
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.call(Command::Write, 0, offset, data.len() as u32, data)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let cookie = self.send(Command::Read, 0, offset, len, &[]);
        let reply = self.recv();
        assert_eq!(reply.cookie, cookie, "reply for another request");
        if reply.error != 0 {
            return Err(reply.error);
        }
        Ok(self.recv_data(len as usize))
    }

    pub fn flush(&mut self) -> u32 {
        self.call(Command::Flush, 0, 0, 0, &[])
    }

    pub fn disconnect(mut self) {
        self.send(Command::Disc, 0, 0, 0, &[]);
        // The server closes after DISC; wait for that so the test is ordered.
        let mut buf = [0u8; 1];
        let _ = self.stream.read(&mut buf);
    }
}
