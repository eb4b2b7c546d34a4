//! The bitmap exchange at connect: when a resync follows the handshake,
//! both nodes send their out-of-sync bitmap and merge the peer's into
//! their own, so the sync covers every block either side changed (DRBD
//! exchanges its bitmaps the same way). That is what lets a split brain
//! be resolved by moving only the blocks both sides changed, instead of
//! the whole device.
//!
//! The bitmap travels as `Bitmap` frames of at most
//! `MAX_BITMAP_CHUNK_BITS` bits each, run-length encoded when that is
//! smaller. Everything the peer sends is checked against our own
//! geometry before it is used: the buffer it is merged into is sized
//! from our own device, never from the peer's numbers.

use crate::net::Stream;
use std::io::{self, Read};

use replblk_proto::repl::{kind, BitmapChunk, Frame, FrameHeader, MAX_BITMAP_CHUNK_BITS};

use super::link::{write_frame, LinkError};

/// Largest `Bitmap` frame body accepted.
const MAX_CHUNK_BODY: u32 = (MAX_BITMAP_CHUNK_BITS / 8) as u32 + BitmapChunk::FIXED as u32;

/// Sends `ours` (the raw bitmap of `total_bits`) and receives the peer's
/// bitmap of the same geometry at the same time (a thread writes while
/// this one reads, so two large bitmaps cannot fill both socket buffers
/// and stall each other). Returns the peer's bitmap in raw form.
pub fn exchange(stream: &Stream, ours: &[u8], total_bits: u64) -> Result<Vec<u8>, LinkError> {
    let mut writer = stream.try_clone()?;
    let mut reader = stream.try_clone()?;
    std::thread::scope(|scope| {
        let sender = scope.spawn(move || -> io::Result<()> {
            for chunk in BitmapChunk::split(ours, total_bits, MAX_BITMAP_CHUNK_BITS) {
                write_frame(&mut writer, &Frame::Bitmap(chunk))?;
            }
            Ok(())
        });
        let received = receive(&mut reader, total_bits);
        if received.is_err() {
            // Unblock the sender if the peer stopped reading.
            stream.shutdown(std::net::Shutdown::Both);
        }
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("bitmap sender panicked")));
        let theirs = received?;
        sent.map_err(|e| {
            LinkError::Io(io::Error::new(e.kind(), format!("sending our bitmap: {e}")))
        })?;
        Ok(theirs)
    })
}

/// Reads the peer's bitmap chunks until all `total_bits` arrived.
pub fn receive(stream: &mut impl Read, total_bits: u64) -> Result<Vec<u8>, LinkError> {
    let mut out = vec![0u8; total_bits.div_ceil(8) as usize];
    let mut next = 0u64;
    let mut body = Vec::new();
    while next < total_bits {
        let mut raw = [0u8; FrameHeader::LEN];
        stream.read_exact(&mut raw)?;
        let header = FrameHeader::decode(&mut io::Cursor::new(&raw[..]))
            .map_err(|e| LinkError::Protocol(e.to_string()))?
            .ok_or_else(|| LinkError::Protocol("short frame header".into()))?;
        if header.kind != kind::BITMAP {
            return Err(LinkError::Protocol(format!(
                "expected the peer's bitmap, got frame kind {}",
                header.kind
            )));
        }
        if header.length > MAX_CHUNK_BODY {
            return Err(LinkError::Protocol(format!(
                "bitmap frame of {} bytes (limit {MAX_CHUNK_BODY})",
                header.length
            )));
        }
        body.resize(header.length as usize, 0);
        stream.read_exact(&mut body)?;
        let Frame::Bitmap(chunk) = Frame::decode_body(header.kind, &body)
            .map_err(|e| LinkError::Protocol(format!("peer's bitmap: {e}")))?
        else {
            return Err(LinkError::Protocol(
                "peer's bitmap: not a Bitmap frame".into(),
            ));
        };
        if chunk.total_bits != total_bits {
            return Err(LinkError::Protocol(format!(
                "peer's bitmap has {} bits, ours {total_bits} (different device size or granularity)",
                chunk.total_bits
            )));
        }
        if chunk.start_bit != next {
            return Err(LinkError::Protocol(format!(
                "peer's bitmap chunk starts at bit {}, expected {next}",
                chunk.start_bit
            )));
        }
        chunk
            .merge_into(&mut out)
            .map_err(|e| LinkError::Protocol(format!("peer's bitmap: {e}")))?;
        next += chunk.bits;
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn wire(frames: &[Frame]) -> Vec<u8> {
        let mut b = BytesMut::new();
        for f in frames {
            f.encode(&mut b);
        }
        b.to_vec()
    }

    #[test]
    fn a_bitmap_arrives_whole() {
        let mut bytes = vec![0u8; 1 << 17];
        bytes[7] = 0x81;
        bytes[100_000..100_050].fill(0xff);
        let bits = (bytes.len() * 8) as u64;
        let frames: Vec<Frame> = BitmapChunk::split(&bytes, bits, 1 << 16)
            .into_iter()
            .map(Frame::Bitmap)
            .collect();
        assert!(frames.len() > 1);
        let got = receive(&mut &wire(&frames)[..], bits).unwrap();
        assert_eq!(got, bytes);
    }

    #[test]
    fn hostile_bitmaps_give_clear_errors() {
        let err = |frames: &[Frame], bits: u64| {
            receive(&mut &wire(frames)[..], bits)
                .unwrap_err()
                .to_string()
        };
        let c = |total: u64, start: u64, bits: u64| {
            let bytes = vec![0xffu8; total.div_ceil(8) as usize];
            let mut chunk = BitmapChunk::split(&bytes, total, bits)
                .into_iter()
                .find(|c| c.start_bit == start)
                .unwrap();
            chunk.total_bits = total;
            Frame::Bitmap(chunk)
        };
        assert!(err(&[c(64, 0, 64)], 128).contains("different device size"));
        assert!(err(&[c(128, 64, 64)], 128).contains("expected 0"));
        assert!(err(&[Frame::Ping { nonce: 1 }], 128).contains("expected the peer's bitmap"));
        // A header announcing a huge body is refused before reading it.
        let mut b = BytesMut::new();
        FrameHeader {
            kind: kind::BITMAP,
            length: 30 << 20,
        }
        .encode(&mut b);
        assert!(receive(&mut &b[..], 128)
            .unwrap_err()
            .to_string()
            .contains("limit"));
        // Cut short.
        let whole = wire(&[c(128, 0, 128)]);
        assert!(receive(&mut &whole[..whole.len() - 1], 128).is_err());
    }
}
