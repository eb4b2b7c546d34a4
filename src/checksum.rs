//! Block digests for comparing the two copies without moving the data
//! (online verify; usable by checksum-based resync too). SHA-256 cut to
//! [`DIGEST_LEN`] bytes: independent of the crc32c that guards frames in
//! transit (a corruption crc32c misses must not also hide here), and
//! collision-resistant, so data crafted by a client cannot make two
//! different blocks look equal. With the CPU's SHA extensions it runs at
//! over 1 GB/s per core.

use sha2::{Digest, Sha256};

pub use replblk_proto::repl::DIGEST_LEN;

/// One block's digest.
pub fn digest(data: &[u8]) -> [u8; DIGEST_LEN] {
    let full = Sha256::digest(data);
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(&full[..DIGEST_LEN]);
    out
}

/// The digest of each `block`-byte piece of `data` (the last may be
/// shorter).
pub fn block_digests(data: &[u8], block: usize) -> Vec<[u8; DIGEST_LEN]> {
    data.chunks(block.max(1)).map(digest).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_tell_blocks_apart_and_are_stable() {
        let a = vec![0u8; 4096];
        let mut b = a.clone();
        b[4095] = 1;
        assert_ne!(digest(&a), digest(&b));
        assert_eq!(digest(&a), digest(&vec![0u8; 4096]));
        // SHA-256("abc") begins ba7816bf 8f01cfea 414140de 5dae2223.
        assert_eq!(
            digest(b"abc"),
            [
                0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae,
                0x22, 0x23
            ]
        );
        let mut data = vec![0u8; 3 * 4096 + 100];
        data[4096] = 9;
        let d = block_digests(&data, 4096);
        assert_eq!(d.len(), 4);
        assert_eq!(d[0], d[2]);
        assert_ne!(d[0], d[1]);
        assert_eq!(d[3], digest(&[0u8; 100]));
    }
}
