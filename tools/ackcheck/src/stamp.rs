//! The stamp every written block carries, so a block read back later
//! says which write put it there.
//!
//! Layout of a block (little-endian): magic (8), run id (8), block index
//! (8), sequence number (8), a fill derived from all three, and a crc32c
//! of everything before it in the last 4 bytes.

pub const MAGIC: &[u8; 8] = b"ACKCHK01";
const HEADER: usize = 32;

/// Who wrote a block: the run, the block index it was meant for, and the
/// write's sequence number within the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub run: u64,
    pub block: u64,
    pub seq: u64,
}

/// Fills `buf` (the whole block) with `stamp`'s contents.
pub fn encode(stamp: Stamp, buf: &mut [u8]) {
    assert!(buf.len() >= HEADER + 8, "block too small for a stamp");
    let end = buf.len() - 4;
    buf[0..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&stamp.run.to_le_bytes());
    buf[16..24].copy_from_slice(&stamp.block.to_le_bytes());
    buf[24..32].copy_from_slice(&stamp.seq.to_le_bytes());
    let mut x =
        stamp.run ^ stamp.block.rotate_left(21) ^ stamp.seq.rotate_left(42) ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in buf[HEADER..end].chunks_mut(8) {
        // xorshift64*: cheap, and different for every (run, block, seq).
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let crc = replblk_proto::crc32c(&buf[..end]);
    buf[end..].copy_from_slice(&crc.to_le_bytes());
}

/// What a block read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A whole, intact stamp.
    Stamp(Stamp),
    /// Every byte zero (never written, or trimmed).
    Zero,
    /// Anything else: foreign data, a torn or corrupted block.
    Garbage,
}

pub fn decode(buf: &[u8]) -> Found {
    if buf.iter().all(|&b| b == 0) {
        return Found::Zero;
    }
    if buf.len() < HEADER + 8 || &buf[0..8] != MAGIC {
        return Found::Garbage;
    }
    let end = buf.len() - 4;
    let crc = u32::from_le_bytes(buf[end..].try_into().unwrap_or_default());
    if replblk_proto::crc32c(&buf[..end]) != crc {
        return Found::Garbage;
    }
    let word = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap_or_default());
    let stamp = Stamp {
        run: word(8),
        block: word(16),
        seq: word(24),
    };
    // The fill too: a stamp whose body belongs to another write is torn.
    let mut expect = vec![0u8; buf.len()];
    encode(stamp, &mut expect);
    if expect != buf {
        return Found::Garbage;
    }
    Found::Stamp(stamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_reads_back_as_itself() {
        let s = Stamp {
            run: 7,
            block: 12345,
            seq: 99,
        };
        let mut buf = vec![0u8; 4096];
        encode(s, &mut buf);
        assert_eq!(decode(&buf), Found::Stamp(s));
    }

    #[test]
    fn zeros_flipped_bits_and_torn_blocks_are_told_apart() {
        assert_eq!(decode(&[0u8; 4096]), Found::Zero);
        let mut buf = vec![0u8; 4096];
        encode(
            Stamp {
                run: 1,
                block: 2,
                seq: 3,
            },
            &mut buf,
        );
        let mut flipped = buf.clone();
        flipped[1000] ^= 1;
        assert_eq!(decode(&flipped), Found::Garbage);
        // First half of one write, second half of another.
        let mut other = vec![0u8; 4096];
        encode(
            Stamp {
                run: 1,
                block: 2,
                seq: 4,
            },
            &mut other,
        );
        let mut torn = buf.clone();
        torn[2048..].copy_from_slice(&other[2048..]);
        assert_eq!(decode(&torn), Found::Garbage);
    }
}
