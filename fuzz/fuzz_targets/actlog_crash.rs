#![no_main]

//! The activity log against a crash at any moment: a fuzzed run of
//! requests (extents to make hot, the shell's answer about each eviction
//! candidate, failed transaction writes) drives `ActivityLog` and writes
//! its transactions into a ring in memory; the run then stops at a crash
//! that may tear the transaction being written. Recovery from that ring
//! must return every extent that was hot after the last transaction that
//! reached the disk whole (a write may have been issued to any of them),
//! and nothing that was never made hot.

use libfuzzer_sys::fuzz_target;
use replblk::core::actlog::{self, ActivityLog, Candidate, BLOCK, MAX_UPDATES};
use std::collections::BTreeSet;

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next();
    let (Some(a), Some(b), Some(c)) = (next(), next(), next()) else {
        return;
    };
    let ring_blocks = u32::from(a % 8) + 2;
    let capacity = u32::from(u16::from_le_bytes([b, c])) % actlog::max_extents(ring_blocks) + 1;
    let mut al = ActivityLog::new(capacity, ring_blocks, 0);
    let mut ring = vec![0u8; ring_blocks as usize * BLOCK];
    // Hot as of the last transaction that reached the disk whole.
    let mut durable: BTreeSet<u32> = BTreeSet::new();
    let mut ever: BTreeSet<u32> = BTreeSet::new();
    let mut steps = 0;
    while let Some(op) = next() {
        steps += 1;
        if steps > 512 {
            break;
        }
        // Up to 4 wanted extents from a space a little larger than the
        // table, so that evictions happen.
        let space = capacity.saturating_mul(2).max(4);
        let wanted: Vec<u32> = (0..(op % 4) + 1)
            .map(|_| {
                u32::from(u16::from_le_bytes([
                    next().unwrap_or(0),
                    next().unwrap_or(0),
                ])) % space
            })
            .collect();
        let answers = next().unwrap_or(0);
        let mut k = 0u32;
        let plan = al.plan(&wanted, usize::from(op >> 4), |e| {
            k += 1;
            if wanted.contains(&e) {
                return Candidate::Busy;
            }
            match (answers.rotate_left(k) ^ e as u8) % 4 {
                0 => Candidate::Busy,
                1 => Candidate::Referenced,
                _ => Candidate::Take,
            }
        });
        let Ok(updates) = plan else { continue };
        for chunk in updates.chunks(MAX_UPDATES) {
            let t = al.commit(chunk);
            let at = t.index as usize * BLOCK;
            match next().unwrap_or(0) {
                // A crash while this block is written: a prefix of it
                // reaches the disk, then nothing more.
                0 => {
                    let len = usize::from(next().unwrap_or(0)) * 16;
                    ring[at..at + len.min(BLOCK)].copy_from_slice(&t.block[..len.min(BLOCK)]);
                    return check(&ring, &durable, &ever);
                }
                // The write failed: the block may or may not be on disk;
                // the log forgets what it changed.
                1 => {
                    if next().unwrap_or(0) & 1 == 1 {
                        ring[at..at + BLOCK].copy_from_slice(&t.block[..]);
                    }
                    al.forget(chunk);
                    ever.extend(chunk.iter().map(|u| u.extent));
                    durable = al.hot().into_iter().collect();
                }
                _ => {
                    ring[at..at + BLOCK].copy_from_slice(&t.block[..]);
                    durable = al.hot().into_iter().collect();
                    ever.extend(durable.iter().copied());
                }
            }
        }
    }
    check(&ring, &durable, &ever);
});

fn check(ring: &[u8], durable: &BTreeSet<u32>, ever: &BTreeSet<u32>) {
    let found = actlog::recover(ring);
    let got: BTreeSet<u32> = found.extents.iter().copied().collect();
    for e in durable {
        assert!(
            got.contains(e),
            "hot extent {e} lost by recovery: {found:?}"
        );
    }
    for e in &got {
        assert!(ever.contains(e), "extent {e} recovered but never hot");
    }
}
