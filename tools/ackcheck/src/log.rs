//! The write log and the check against it, with no I/O.
//!
//! One line per event, appended as they happen:
//! - `R <run> <block_size> <first_block> <blocks>` starts a run;
//! - `I <seq> <block>` write `seq` of the run was sent for `block`;
//! - `A <seq>` the server acknowledged it; `E <seq> <errno>` it failed;
//! - `F <n>` a flush was acknowledged that the first `n` `A` lines of the
//!   run precede (NBD: a flush covers the writes completed before it was
//!   sent);
//! - `L <reason>` the connection was lost (what was in flight is unknown).
//!
//! A block must then hold the last acknowledged write to it, or a write
//! sent after that one (acknowledged or not). With `flushed`, only writes
//! an acknowledged flush covers are required.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::stamp::{Found, Stamp};

#[derive(Debug, Default, Clone)]
pub struct Run {
    pub id: u64,
    pub block_size: u64,
    /// Blocks each write was sent for, by sequence number.
    pub issued: BTreeMap<u64, u64>,
    /// Acknowledged sequence numbers, in the order the acks came.
    pub acked: Vec<u64>,
    pub failed: u64,
    /// How many acks the acknowledged flushes covered, at most.
    pub flushed_acks: usize,
    pub lost: u64,
}

/// Parses a log (several runs may follow each other in one file).
pub fn parse(text: &str) -> Result<Vec<Run>, String> {
    let mut runs: Vec<Run> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = || format!("log line {}: cannot parse {line:?}", n + 1);
        let mut f = line.split_whitespace();
        let Some(tag) = f.next() else { continue };
        let mut num =
            || -> Result<u64, String> { f.next().and_then(|v| v.parse().ok()).ok_or_else(bad) };
        if tag == "R" {
            let id = num()?;
            let block_size = num()?;
            runs.push(Run {
                id,
                block_size,
                ..Run::default()
            });
            continue;
        }
        let run = runs
            .last_mut()
            .ok_or_else(|| format!("log line {}: no run started", n + 1))?;
        match tag {
            "I" => {
                let seq = num()?;
                let block = num()?;
                run.issued.insert(seq, block);
            }
            "A" => run.acked.push(num()?),
            "E" => {
                num()?;
                run.failed += 1;
            }
            "F" => {
                let upto = num()? as usize;
                run.flushed_acks = run.flushed_acks.max(upto.min(run.acked.len()));
            }
            "L" => run.lost += 1,
            _ => return Err(bad()),
        }
    }
    Ok(runs)
}

/// The verdict on one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Holds the required write or a later one.
    Ok,
    /// Nothing is required of it (never acknowledged a write).
    Free,
    /// An acknowledged write is missing: older data, zeros or garbage.
    Lost,
    /// A stamp meant for another block.
    Misplaced,
    /// A stamp of a write the log never sent to this block.
    Phantom,
}

/// A write's place in the history: (run index, sequence number).
type At = (usize, u64);

/// One block's due: the write that must be there or be superseded, and
/// every write sent to it.
#[derive(Default)]
struct Due {
    required: Option<At>,
    sent: BTreeSet<At>,
}

/// What the runs require of each block.
pub struct Expect {
    run_index: HashMap<u64, usize>,
    blocks: BTreeMap<u64, Due>,
}

impl Expect {
    pub fn new(runs: &[Run], flushed: bool) -> Expect {
        let mut blocks: BTreeMap<u64, Due> = BTreeMap::new();
        let mut run_index = HashMap::new();
        for (ri, run) in runs.iter().enumerate() {
            run_index.insert(run.id, ri);
            for (&seq, &block) in &run.issued {
                blocks.entry(block).or_default().sent.insert((ri, seq));
            }
            let required = if flushed {
                &run.acked[..run.flushed_acks]
            } else {
                &run.acked[..]
            };
            for &seq in required {
                let Some(&block) = run.issued.get(&seq) else {
                    continue;
                };
                let e = blocks.entry(block).or_default();
                e.required = e.required.max(Some((ri, seq)));
            }
        }
        Expect { run_index, blocks }
    }

    /// Blocks any run sent a write to, in order.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.blocks.keys().copied()
    }

    pub fn required(&self) -> usize {
        self.blocks
            .values()
            .filter(|d| d.required.is_some())
            .count()
    }

    /// A log equivalent to the runs for a plain (not `--flushed`) check:
    /// per block, only the required write and the writes sent after it
    /// are kept; flushes are dropped. Keeps long histories small. A block
    /// holding a superseded write fails either way, though as a phantom
    /// rather than lost once its send is dropped.
    pub fn compact(runs: &[Run]) -> String {
        let e = Expect::new(runs, false);
        let mut per_run: Vec<Vec<String>> = vec![Vec::new(); runs.len()];
        for (block, due) in &e.blocks {
            for &(ri, seq) in &due.sent {
                if Some((ri, seq)) >= due.required {
                    per_run[ri].push(format!("I {seq} {block}"));
                }
            }
            if let Some((ri, seq)) = due.required {
                per_run[ri].push(format!("A {seq}"));
            }
        }
        let mut out = String::new();
        for (run, lines) in runs.iter().zip(per_run) {
            if lines.is_empty() {
                continue;
            }
            out.push_str(&format!("R {} {} 0 0\n", run.id, run.block_size));
            for l in lines {
                out.push_str(&l);
                out.push('\n');
            }
        }
        out
    }

    pub fn judge(&self, block: u64, found: Found) -> Verdict {
        let Some(Due { required, sent }) = self.blocks.get(&block) else {
            return Verdict::Free;
        };
        let at = match found {
            Found::Stamp(Stamp { run, block: b, seq }) => {
                let Some(&ri) = self.run_index.get(&run) else {
                    return if required.is_some() {
                        Verdict::Lost
                    } else {
                        Verdict::Free
                    };
                };
                if b != block {
                    return Verdict::Misplaced;
                }
                if !sent.contains(&(ri, seq)) {
                    return Verdict::Phantom;
                }
                Some((ri, seq))
            }
            Found::Zero | Found::Garbage => None,
        };
        match required {
            None => Verdict::Free,
            Some(req) if at >= Some(*req) => Verdict::Ok,
            Some(_) => Verdict::Lost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(run: u64, block: u64, seq: u64) -> Found {
        Found::Stamp(Stamp { run, block, seq })
    }

    const LOG: &str = "R 9 4096 0 100\nI 1 5\nA 1\nF 1\nI 2 5\nA 2\nI 3 6\nI 4 7\nA 4\nL lost\n";

    #[test]
    fn the_last_acknowledged_write_or_a_later_one_must_be_there() {
        let runs = parse(LOG).expect("parses");
        let e = Expect::new(&runs, false);
        assert_eq!(e.required(), 2);
        assert_eq!(e.judge(5, stamp(9, 5, 2)), Verdict::Ok);
        assert_eq!(e.judge(5, stamp(9, 5, 1)), Verdict::Lost);
        assert_eq!(e.judge(5, Found::Zero), Verdict::Lost);
        assert_eq!(e.judge(5, Found::Garbage), Verdict::Lost);
        assert_eq!(e.judge(5, stamp(9, 6, 3)), Verdict::Misplaced);
        assert_eq!(e.judge(5, stamp(9, 5, 4)), Verdict::Phantom);
        // Sent, never acknowledged: anything goes.
        assert_eq!(e.judge(6, Found::Zero), Verdict::Free);
        assert_eq!(e.judge(6, stamp(9, 6, 3)), Verdict::Free);
        assert_eq!(e.judge(7, stamp(9, 7, 4)), Verdict::Ok);
        assert_eq!(e.judge(8, Found::Garbage), Verdict::Free);
    }

    #[test]
    fn with_flushed_only_writes_a_flush_covered_are_required() {
        let runs = parse(LOG).expect("parses");
        let e = Expect::new(&runs, true);
        assert_eq!(e.required(), 1);
        assert_eq!(e.judge(5, stamp(9, 5, 1)), Verdict::Ok);
        assert_eq!(e.judge(5, Found::Zero), Verdict::Lost);
        assert_eq!(e.judge(7, Found::Zero), Verdict::Free);
    }

    #[test]
    fn a_later_run_supersedes_an_earlier_one() {
        let text = format!("{LOG}R 10 4096 0 100\nI 1 5\nI 2 7\nA 2\n");
        let runs = parse(&text).expect("parses");
        let e = Expect::new(&runs, false);
        // Block 5: run 9's seq 2 is required; run 10's unacked write may
        // have replaced it.
        assert_eq!(e.judge(5, stamp(10, 5, 1)), Verdict::Ok);
        assert_eq!(e.judge(5, stamp(9, 5, 2)), Verdict::Ok);
        assert_eq!(e.judge(7, stamp(9, 7, 4)), Verdict::Lost);
        assert_eq!(e.judge(7, stamp(10, 7, 2)), Verdict::Ok);
        assert_eq!(e.judge(7, stamp(11, 7, 2)), Verdict::Lost);
    }

    #[test]
    fn a_compacted_log_judges_every_block_alike() {
        let text = format!("{LOG}R 10 4096 0 100\nI 1 5\nI 2 7\nA 2\nI 3 8\nA 3\n");
        let runs = parse(&text).expect("parses");
        let full = Expect::new(&runs, false);
        let compacted = parse(&Expect::compact(&runs)).expect("compacted parses");
        let small = Expect::new(&compacted, false);
        assert_eq!(full.required(), small.required());
        let founds = [
            Found::Zero,
            Found::Garbage,
            stamp(9, 5, 1),
            stamp(9, 5, 2),
            stamp(10, 5, 1),
            stamp(9, 6, 3),
            stamp(9, 7, 4),
            stamp(10, 7, 2),
            stamp(10, 8, 3),
        ];
        // The same pass or fail (a superseded write, lost before, may be
        // called a phantom now: its send was dropped).
        let passes = |v: Verdict| matches!(v, Verdict::Ok | Verdict::Free);
        for block in 0..10 {
            for f in founds {
                assert_eq!(
                    passes(full.judge(block, f)),
                    passes(small.judge(block, f)),
                    "block {block}, {f:?}"
                );
            }
        }
        // Superseded history is gone.
        assert!(compacted.iter().map(|r| r.issued.len()).sum::<usize>() < 6);
    }

    #[test]
    fn a_malformed_log_is_an_error_not_a_panic() {
        assert!(parse("I 1 2\n").is_err());
        assert!(parse("R 1 4096 0 1\nX\n").is_err());
        assert!(parse("R 1 4096 0 1\nI one 2\n").is_err());
    }
}
