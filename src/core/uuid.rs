//! Generation UUIDs: the rotations a node applies to its own
//! [`Generations`], and [`compare`], the decision two nodes take when they
//! meet. The rules are those of DRBD 8.4's `drbd_uuid_compare` (with its
//! rule numbers), followed by the disk-state check of its
//! `drbd_sync_handshake`.
//!
//! UUIDs are plain `u64`s: every bit is identity. DRBD keeps "was
//! Primary" in the lowest bit of the current UUID and masks it off when
//! comparing; here that fact lives in [`flags::PRIMARY`] and
//! [`flags::CRASHED_PRIMARY`] instead, so nothing is masked.
//!
//! `0` and [`UUID_JUST_CREATED`] name no data. Rotations never move either
//! into the bitmap slot or the history.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{flags, Generations, HISTORY, UUID_JUST_CREATED};

/// True for the UUIDs that name no data: `0` and [`UUID_JUST_CREATED`].
fn names_no_data(uuid: u64) -> bool {
    uuid == 0 || uuid == UUID_JUST_CREATED
}

impl Generations {
    /// True when the current UUID names no data yet (`0` or
    /// [`UUID_JUST_CREATED`]): nobody ever wrote to this copy as part of
    /// a generation.
    pub fn just_created(&self) -> bool {
        names_no_data(self.current)
    }

    /// Whether `uuid` (non-zero) is any of this node's UUIDs.
    pub fn contains(&self, uuid: u64) -> bool {
        uuid != 0 && (self.current == uuid || self.bitmap == uuid || self.history.contains(&uuid))
    }

    /// Pushes `uuid` onto the front of the history, dropping the oldest
    /// entry. UUIDs that name no data, and UUIDs this node already holds
    /// in any slot, are not pushed (a repeat would only evict an older,
    /// useful entry).
    pub fn push_history(&mut self, uuid: u64) {
        if names_no_data(uuid) || self.contains(uuid) {
            return;
        }
        self.history.copy_within(0..HISTORY - 1, 1);
        self.history[0] = uuid;
    }

    /// Starts a new data generation named `fresh` (a new random value).
    /// The old current UUID moves into the bitmap slot when that is empty
    /// (the bitmap then records every write the peer, still at the old
    /// generation, lacks); when the bitmap slot is already in use it keeps
    /// naming the older generation the peer has, and the old current UUID
    /// goes into the history. A current UUID that named no data is
    /// dropped.
    pub fn new_current(&mut self, fresh: u64) {
        let old = self.current;
        self.current = fresh;
        if names_no_data(old) {
            return;
        }
        if self.bitmap == 0 {
            self.bitmap = old;
        } else {
            self.push_history(old);
        }
    }

    /// Sets the bitmap UUID to `uuid`; an older, different bitmap UUID
    /// moves into the history. `0` is the same as
    /// [`clear_bitmap_uuid`](Self::clear_bitmap_uuid).
    pub fn set_bitmap(&mut self, uuid: u64) {
        if uuid == 0 {
            self.clear_bitmap_uuid();
            return;
        }
        let old = self.bitmap;
        self.bitmap = uuid;
        if old != uuid {
            self.push_history(old);
        }
    }

    /// Empties the bitmap slot, moving its UUID into the history: done by
    /// a sync source when a resync completes (the peer now has this node's
    /// current generation, the bitmap is empty).
    pub fn clear_bitmap_uuid(&mut self) {
        let old = self.bitmap;
        self.bitmap = 0;
        self.push_history(old);
    }

    /// A sync target's UUIDs once a resync from `peer` completed: it now
    /// holds exactly the source's data, so it takes the source's lineage,
    /// i.e. the source's UUIDs after the source clears its bitmap UUID.
    /// The target's own old current UUID is dropped unless the source
    /// knows it: data it named no longer exists here. Both nodes end with
    /// equal `Generations`.
    pub fn adopt_peer_current(&mut self, peer: &Generations) {
        let mut adopted = *peer;
        adopted.clear_bitmap_uuid();
        *self = adopted;
    }
}

/// What a node reports about its generations when two nodes meet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UuidView {
    pub gens: Generations,
    /// [`crate::core::flags`] bits; [`compare`] reads `CONSISTENT`,
    /// `CRASHED_PRIMARY` and `FULL_SYNC`.
    pub flags: u32,
    /// Blocks marked out of sync in this node's bitmap. [`compare`] uses
    /// it only when the generations say "no sync" (rules
    /// [`Rule::LocalDirtyBits`], [`Rule::PeerDirtyBits`],
    /// [`Rule::BothDirtyBits`]); it is carried for logs and split-brain
    /// policies too.
    pub dirty_bits: u64,
}

/// What a pair of nodes does on connecting, from one node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Both hold the same data.
    NoSync,
    /// This node sends: `full` copies everything, otherwise only the
    /// blocks marked in the bitmaps.
    SyncSource { full: bool },
    /// This node receives (and is Inconsistent until the sync completes).
    SyncTarget { full: bool },
    /// Both changed the data independently since they last shared it.
    SplitBrain,
    /// The two copies share no known generation.
    Unrelated,
}

impl Decision {
    /// The decision the peer takes in the same meeting.
    pub fn mirrored(self) -> Decision {
        match self {
            Decision::NoSync => Decision::NoSync,
            Decision::SyncSource { full } => Decision::SyncTarget { full },
            Decision::SyncTarget { full } => Decision::SyncSource { full },
            Decision::SplitBrain => Decision::SplitBrain,
            Decision::Unrelated => Decision::Unrelated,
        }
    }

    /// True for `SyncSource` and `SyncTarget`.
    pub fn is_sync(self) -> bool {
        match self {
            Decision::SyncSource { .. } | Decision::SyncTarget { .. } => true,
            Decision::NoSync | Decision::SplitBrain | Decision::Unrelated => false,
        }
    }

    /// True for a full sync.
    pub fn is_full(self) -> bool {
        match self {
            Decision::SyncSource { full } | Decision::SyncTarget { full } => full,
            Decision::NoSync | Decision::SplitBrain | Decision::Unrelated => false,
        }
    }

    fn made_full(self) -> Decision {
        match self {
            Decision::SyncSource { .. } => Decision::SyncSource { full: true },
            Decision::SyncTarget { .. } => Decision::SyncTarget { full: true },
            d @ (Decision::NoSync | Decision::SplitBrain | Decision::Unrelated) => d,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Decision::NoSync => "no sync",
            Decision::SyncSource { full: true } => "sync source (full)",
            Decision::SyncSource { full: false } => "sync source (bitmap-based)",
            Decision::SyncTarget { full: true } => "sync target (full)",
            Decision::SyncTarget { full: false } => "sync target (bitmap-based)",
            Decision::SplitBrain => "split brain",
            Decision::Unrelated => "unrelated data",
        };
        f.write_str(s)
    }
}

/// The rule that decided, named from the deciding node's point of view.
/// [`Rule::number`] is DRBD's rule number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// 10: neither copy holds data yet.
    BothJustCreated,
    /// 20: this copy holds no data yet; full sync target.
    LocalJustCreated,
    /// 30: the peer holds no data yet; full sync source.
    PeerJustCreated,
    /// 34: same current UUID; this node still has the bitmap UUID of a
    /// resync it led whose end it did not record; the peer's history
    /// shows that end. Sync source.
    LocalMissedSyncFinish,
    /// 35: the mirror of 34: the peer missed the end of a resync it led.
    /// Sync target.
    PeerMissedSyncFinish,
    /// 36: same current UUID, only this node has a bitmap UUID, the
    /// histories do not line up. Sync source.
    LocalBitmapOnly,
    /// 37: the mirror of 36. Sync target.
    PeerBitmapOnly,
    /// 40: same current UUID, neither was a crashed Primary: no sync.
    SameCurrent,
    /// 40: same current UUID, this node crashed while Primary (writes may
    /// have been in flight): sync source.
    CrashedPrimaryLocal,
    /// 40: same current UUID, the peer crashed while Primary: sync target.
    CrashedPrimaryPeer,
    /// 40: same current UUID, both crashed while Primary: the node that
    /// dialed becomes sync target.
    BothCrashedPrimaries,
    /// 50: this node's current UUID is the peer's bitmap UUID: bitmap-based
    /// sync target.
    LocalCurrentIsPeerBitmap,
    /// 60: this node's current UUID is in the peer's history: full sync
    /// target.
    PeerHistoryHasLocalCurrent,
    /// 70: the peer's current UUID is this node's bitmap UUID: bitmap-based
    /// sync source.
    PeerCurrentIsLocalBitmap,
    /// 80: the peer's current UUID is in this node's history: full sync
    /// source.
    LocalHistoryHasPeerCurrent,
    /// 90: both bitmap UUIDs name the same generation: both wrote since.
    SplitBrainBitmapsEqual,
    /// 100: a shared older generation: both changed the data since.
    SplitBrainHistoryShared,
    /// 100 (DRBD reports the last rule it tried): nothing in common.
    Unrelated,
    /// Not a UUID rule (DRBD applies it in `drbd_sync_handshake`;
    /// [`Rule::number`] is 0): this node's data is Inconsistent and the
    /// peer's is not, so this node becomes sync target.
    LocalInconsistent,
    /// The mirror of `LocalInconsistent`: sync source.
    PeerInconsistent,
    /// Not a UUID rule ([`Rule::number`] is 0; DRBD only warns "no
    /// resync, but bits in bitmap"): same generation and no crash, but
    /// this node marked blocks out of sync for the peer (writes the peer
    /// acknowledged without making them durable, when the session ended
    /// after this node stopped being Primary): bitmap-based sync source.
    LocalDirtyBits,
    /// The mirror of `LocalDirtyBits`: bitmap-based sync target.
    PeerDirtyBits,
    /// Same generation, both nodes marked blocks: the dialing node
    /// yields (a Primary never does, see `core::state`), and the sync
    /// covers the union of both bitmaps.
    BothDirtyBits,
}

impl Rule {
    /// Every rule, for tests and documentation.
    pub const ALL: [Rule; 23] = [
        Rule::BothJustCreated,
        Rule::LocalJustCreated,
        Rule::PeerJustCreated,
        Rule::LocalMissedSyncFinish,
        Rule::PeerMissedSyncFinish,
        Rule::LocalBitmapOnly,
        Rule::PeerBitmapOnly,
        Rule::SameCurrent,
        Rule::CrashedPrimaryLocal,
        Rule::CrashedPrimaryPeer,
        Rule::BothCrashedPrimaries,
        Rule::LocalCurrentIsPeerBitmap,
        Rule::PeerHistoryHasLocalCurrent,
        Rule::PeerCurrentIsLocalBitmap,
        Rule::LocalHistoryHasPeerCurrent,
        Rule::SplitBrainBitmapsEqual,
        Rule::SplitBrainHistoryShared,
        Rule::Unrelated,
        Rule::LocalInconsistent,
        Rule::PeerInconsistent,
        Rule::LocalDirtyBits,
        Rule::PeerDirtyBits,
        Rule::BothDirtyBits,
    ];

    /// DRBD's number for this rule (`drbd_uuid_compare`'s `rule_nr`); 0
    /// for the disk-state rules, which DRBD does not number.
    pub fn number(self) -> u32 {
        match self {
            Rule::BothJustCreated => 10,
            Rule::LocalJustCreated => 20,
            Rule::PeerJustCreated => 30,
            Rule::LocalMissedSyncFinish => 34,
            Rule::PeerMissedSyncFinish => 35,
            Rule::LocalBitmapOnly => 36,
            Rule::PeerBitmapOnly => 37,
            Rule::SameCurrent
            | Rule::CrashedPrimaryLocal
            | Rule::CrashedPrimaryPeer
            | Rule::BothCrashedPrimaries => 40,
            Rule::LocalCurrentIsPeerBitmap => 50,
            Rule::PeerHistoryHasLocalCurrent => 60,
            Rule::PeerCurrentIsLocalBitmap => 70,
            Rule::LocalHistoryHasPeerCurrent => 80,
            Rule::SplitBrainBitmapsEqual => 90,
            Rule::SplitBrainHistoryShared | Rule::Unrelated => 100,
            Rule::LocalInconsistent
            | Rule::PeerInconsistent
            | Rule::LocalDirtyBits
            | Rule::PeerDirtyBits
            | Rule::BothDirtyBits => 0,
        }
    }

    /// One short sentence saying why the rule decided as it did.
    pub fn describe(self) -> &'static str {
        match self {
            Rule::BothJustCreated => "neither node holds data yet",
            Rule::LocalJustCreated => "this node holds no data yet",
            Rule::PeerJustCreated => "the peer holds no data yet",
            Rule::LocalMissedSyncFinish => "this node led a resync and missed recording its end",
            Rule::PeerMissedSyncFinish => "the peer led a resync and missed recording its end",
            Rule::LocalBitmapOnly => {
                "same generation, but only this node still tracks changes for the peer"
            }
            Rule::PeerBitmapOnly => {
                "same generation, but only the peer still tracks changes for this node"
            }
            Rule::SameCurrent => "both nodes hold the same generation",
            Rule::CrashedPrimaryLocal => {
                "same generation, but this node crashed while Primary with writes maybe in flight"
            }
            Rule::CrashedPrimaryPeer => {
                "same generation, but the peer crashed while Primary with writes maybe in flight"
            }
            Rule::BothCrashedPrimaries => {
                "same generation, both nodes crashed while Primary; the dialing node yields"
            }
            Rule::LocalCurrentIsPeerBitmap => {
                "the peer wrote since this node's generation and tracked the changes"
            }
            Rule::PeerHistoryHasLocalCurrent => {
                "this node's generation is an older one of the peer's, changes not tracked"
            }
            Rule::PeerCurrentIsLocalBitmap => {
                "this node wrote since the peer's generation and tracked the changes"
            }
            Rule::LocalHistoryHasPeerCurrent => {
                "the peer's generation is an older one of this node's, changes not tracked"
            }
            Rule::SplitBrainBitmapsEqual => {
                "both nodes wrote since the generation they last shared"
            }
            Rule::SplitBrainHistoryShared => {
                "both nodes changed the data since an older generation they shared"
            }
            Rule::Unrelated => "the nodes share no generation: unrelated data",
            Rule::LocalInconsistent => "this node's data is Inconsistent and the peer's is not",
            Rule::PeerInconsistent => "the peer's data is Inconsistent and this node's is not",
            Rule::LocalDirtyBits => {
                "same generation, but this node marked blocks the peer may lack"
            }
            Rule::PeerDirtyBits => "same generation, but the peer marked blocks this node may lack",
            Rule::BothDirtyBits => {
                "same generation, both nodes marked blocks; the dialing node yields"
            }
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {}: {}", self.number(), self.describe())
    }
}

/// The outcome of [`compare`]: what to do, and the rule that said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub decision: Decision,
    pub rule: Rule,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} by {}", self.decision, self.rule)
    }
}

/// Decides what `local` does on meeting `peer`. Computed on both nodes
/// with the views swapped and opposite `local_dials`, the two verdicts
/// mirror each other (see [`Decision::mirrored`]).
///
/// First the UUID rules, in DRBD's order (10, 20, 30, 34–37, 40, 50, 60,
/// 70, 80, 90, 100; see [`Rule`]). A "no sync" by rule 40 becomes a
/// bitmap-based sync from the side whose bitmap marks blocks (both
/// marked: the dialing node yields, and the bitmaps' union is synced):
/// equal generations do not
/// make equal data when writes the peer acknowledged were lost from its
/// page cache after the writer stopped being Primary. Then the disk
/// states: when exactly one
/// side is Inconsistent (no `CONSISTENT` flag) and the data are related,
/// the consistent side is sync source; the sync is full if the UUIDs had
/// said full or split brain. Last, a sync is made full when either side
/// has `FULL_SYNC` set (its bitmap cannot be trusted).
///
/// `local_dials` breaks the one tie (rule 40, both crashed Primaries):
/// the dialing node becomes sync target, as DRBD's node with the
/// "resolve conflicts" flag does.
pub fn compare(local: &UuidView, peer: &UuidView, local_dials: bool) -> Verdict {
    let (mut decision, mut rule) = uuid_rules(local, peer, local_dials);
    if rule == Rule::SameCurrent {
        match (local.dirty_bits > 0, peer.dirty_bits > 0) {
            (false, false) => {}
            (true, false) => {
                (decision, rule) = (Decision::SyncSource { full: false }, Rule::LocalDirtyBits)
            }
            (false, true) => {
                (decision, rule) = (Decision::SyncTarget { full: false }, Rule::PeerDirtyBits)
            }
            (true, true) => {
                // Bitmap-based: the source merges the target's bitmap
                // into its own at connect.
                decision = if local_dials {
                    Decision::SyncTarget { full: false }
                } else {
                    Decision::SyncSource { full: false }
                };
                rule = Rule::BothDirtyBits;
            }
        }
    }

    let local_ok = local.flags & flags::CONSISTENT != 0;
    let peer_ok = peer.flags & flags::CONSISTENT != 0;
    if decision != Decision::Unrelated && local_ok != peer_ok {
        let full = decision == Decision::SplitBrain || decision.is_full();
        let (by_disk, disk_rule) = if local_ok {
            (Decision::SyncSource { full }, Rule::PeerInconsistent)
        } else {
            (Decision::SyncTarget { full }, Rule::LocalInconsistent)
        };
        if by_disk != decision {
            decision = by_disk;
            rule = disk_rule;
        }
    }

    if (local.flags | peer.flags) & flags::FULL_SYNC != 0 {
        decision = decision.made_full();
    }
    Verdict { decision, rule }
}

/// DRBD's `drbd_uuid_compare`, minus rules 51 and 71 (they repair a lost
/// sync-UUID packet, which this protocol does not have), with rule 100
/// looking at bitmap slots as well as history.
fn uuid_rules(local: &UuidView, peer: &UuidView, local_dials: bool) -> (Decision, Rule) {
    let (l, p) = (&local.gens, &peer.gens);
    let bitmap_sync = |source: bool, rule| {
        let d = if source {
            Decision::SyncSource { full: false }
        } else {
            Decision::SyncTarget { full: false }
        };
        (d, rule)
    };

    match (names_no_data(l.current), names_no_data(p.current)) {
        (true, true) => return (Decision::NoSync, Rule::BothJustCreated),
        (true, false) => return (Decision::SyncTarget { full: true }, Rule::LocalJustCreated),
        (false, true) => return (Decision::SyncSource { full: true }, Rule::PeerJustCreated),
        (false, false) => {}
    }

    if l.current == p.current {
        // Had the node with a bitmap UUID recorded the end of the resync
        // it led, its history would be the other's.
        if l.bitmap != 0 && p.bitmap == 0 {
            let lined_up = p.history[0] == l.bitmap && p.history[1..] == l.history[..HISTORY - 1];
            let rule = if lined_up {
                Rule::LocalMissedSyncFinish
            } else {
                Rule::LocalBitmapOnly
            };
            return bitmap_sync(true, rule);
        }
        if l.bitmap == 0 && p.bitmap != 0 {
            let lined_up = l.history[0] == p.bitmap && l.history[1..] == p.history[..HISTORY - 1];
            let rule = if lined_up {
                Rule::PeerMissedSyncFinish
            } else {
                Rule::PeerBitmapOnly
            };
            return bitmap_sync(false, rule);
        }
        let local_crashed = local.flags & flags::CRASHED_PRIMARY != 0;
        let peer_crashed = peer.flags & flags::CRASHED_PRIMARY != 0;
        return match (local_crashed, peer_crashed) {
            (false, false) => (Decision::NoSync, Rule::SameCurrent),
            (true, false) => bitmap_sync(true, Rule::CrashedPrimaryLocal),
            (false, true) => bitmap_sync(false, Rule::CrashedPrimaryPeer),
            (true, true) => bitmap_sync(!local_dials, Rule::BothCrashedPrimaries),
        };
    }

    if l.current == p.bitmap {
        return bitmap_sync(false, Rule::LocalCurrentIsPeerBitmap);
    }
    if p.history.contains(&l.current) {
        return (
            Decision::SyncTarget { full: true },
            Rule::PeerHistoryHasLocalCurrent,
        );
    }
    if l.bitmap == p.current {
        return bitmap_sync(true, Rule::PeerCurrentIsLocalBitmap);
    }
    if l.history.contains(&p.current) {
        return (
            Decision::SyncSource { full: true },
            Rule::LocalHistoryHasPeerCurrent,
        );
    }
    if l.bitmap != 0 && l.bitmap == p.bitmap {
        return (Decision::SplitBrain, Rule::SplitBrainBitmapsEqual);
    }
    let older = |g: &Generations| {
        let mut v = [0u64; HISTORY + 1];
        v[0] = g.bitmap;
        v[1..].copy_from_slice(&g.history);
        v
    };
    let (lo, po) = (older(l), older(p));
    if lo.iter().any(|u| !names_no_data(*u) && po.contains(u)) {
        return (Decision::SplitBrain, Rule::SplitBrainHistoryShared);
    }
    (Decision::Unrelated, Rule::Unrelated)
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: u32 = flags::CONSISTENT;

    fn g(current: u64, bitmap: u64, history: [u64; HISTORY]) -> Generations {
        Generations {
            current,
            bitmap,
            history,
        }
    }

    fn view(gens: Generations, flags: u32) -> UuidView {
        UuidView {
            gens,
            flags,
            dirty_bits: 0,
        }
    }

    /// Compares both ways, checks the two verdicts mirror each other, and
    /// returns the local one.
    fn both(l: UuidView, p: UuidView, local_dials: bool) -> Verdict {
        let v = compare(&l, &p, local_dials);
        let w = compare(&p, &l, !local_dials);
        assert_eq!(v.decision, w.decision.mirrored(), "{v} vs {w}");
        v
    }

    fn check(l: UuidView, p: UuidView, decision: Decision, rule: Rule) {
        let v = both(l, p, false);
        assert_eq!((v.decision, v.rule), (decision, rule));
    }

    const SRC_BM: Decision = Decision::SyncSource { full: false };
    const TGT_BM: Decision = Decision::SyncTarget { full: false };
    const SRC_FULL: Decision = Decision::SyncSource { full: true };
    const TGT_FULL: Decision = Decision::SyncTarget { full: true };

    #[test]
    fn rule_10_both_just_created() {
        let jc = g(UUID_JUST_CREATED, 0, [0, 0]);
        check(
            view(jc, 0),
            view(jc, 0),
            Decision::NoSync,
            Rule::BothJustCreated,
        );
        // 0 counts as "no data" too, and stays symmetric.
        check(
            view(g(0, 0, [0, 0]), 0),
            view(jc, 0),
            Decision::NoSync,
            Rule::BothJustCreated,
        );
    }

    #[test]
    fn rules_20_30_one_side_just_created() {
        let jc = view(g(UUID_JUST_CREATED, 0, [0, 0]), C);
        let data = view(g(0xA1, 0, [0, 0]), C);
        check(jc, data, TGT_FULL, Rule::LocalJustCreated);
        check(data, jc, SRC_FULL, Rule::PeerJustCreated);
    }

    #[test]
    fn rules_34_35_missed_sync_finish() {
        // The source kept bitmap 0xB0; the target adopted the source's
        // post-sync UUIDs.
        let source = view(g(0xC2, 0xB0, [0x10, 0x11]), C);
        let target = view(g(0xC2, 0, [0xB0, 0x10]), C);
        check(source, target, SRC_BM, Rule::LocalMissedSyncFinish);
        check(target, source, TGT_BM, Rule::PeerMissedSyncFinish);
    }

    #[test]
    fn rules_36_37_bitmap_only_on_one_side() {
        let source = view(g(0xC2, 0xB0, [0x11, 0x12]), C);
        let target = view(g(0xC2, 0, [0x21, 0x22]), C);
        check(source, target, SRC_BM, Rule::LocalBitmapOnly);
        check(target, source, TGT_BM, Rule::PeerBitmapOnly);
    }

    #[test]
    fn rule_40_same_current_and_crashed_primaries() {
        let same = g(0xC1, 0, [0x11, 0]);
        let cp = C | flags::CRASHED_PRIMARY;
        check(
            view(same, C),
            view(same, C),
            Decision::NoSync,
            Rule::SameCurrent,
        );
        check(
            view(same, cp),
            view(same, C),
            SRC_BM,
            Rule::CrashedPrimaryLocal,
        );
        check(
            view(same, C),
            view(same, cp),
            TGT_BM,
            Rule::CrashedPrimaryPeer,
        );
        // Both crashed: the dialer yields.
        let v = both(view(same, cp), view(same, cp), true);
        assert_eq!((v.decision, v.rule), (TGT_BM, Rule::BothCrashedPrimaries));
        let v = both(view(same, cp), view(same, cp), false);
        assert_eq!((v.decision, v.rule), (SRC_BM, Rule::BothCrashedPrimaries));
        // Both bitmaps set with the same current: still rule 40.
        let both_bm = g(0xC1, 0xB1, [0, 0]);
        check(
            view(both_bm, C),
            view(both_bm, C),
            Decision::NoSync,
            Rule::SameCurrent,
        );
    }

    #[test]
    fn rules_50_70_bitmap_names_the_peer_generation() {
        // The writer moved from C1 to C2 and tracked the changes.
        let writer = view(g(0xC2, 0xC1, [0x11, 0]), C);
        let behind = view(g(0xC1, 0, [0x11, 0]), C);
        check(behind, writer, TGT_BM, Rule::LocalCurrentIsPeerBitmap);
        check(writer, behind, SRC_BM, Rule::PeerCurrentIsLocalBitmap);
    }

    #[test]
    fn rules_60_80_generation_only_in_history() {
        let ahead = view(g(0xC3, 0, [0xC2, 0xC1]), C);
        let behind = view(g(0xC1, 0, [0x01, 0]), C);
        check(behind, ahead, TGT_FULL, Rule::PeerHistoryHasLocalCurrent);
        check(ahead, behind, SRC_FULL, Rule::LocalHistoryHasPeerCurrent);
    }

    #[test]
    fn rule_90_split_brain_bitmaps_equal() {
        let a = view(g(0xA2, 0xC1, [0x11, 0]), C);
        let b = view(g(0xB2, 0xC1, [0x11, 0]), C);
        check(a, b, Decision::SplitBrain, Rule::SplitBrainBitmapsEqual);
    }

    #[test]
    fn rule_100_split_brain_history_shared() {
        let a = view(g(0xA3, 0xA1, [0xC0, 0x01]), C);
        let b = view(g(0xB3, 0xB1, [0x02, 0xC0]), C);
        check(a, b, Decision::SplitBrain, Rule::SplitBrainHistoryShared);
        // A bitmap UUID found in the other's history counts too.
        let a = view(g(0xA3, 0xC0, [0x03, 0x04]), C);
        let b = view(g(0xB3, 0xB1, [0xC0, 0x05]), C);
        check(a, b, Decision::SplitBrain, Rule::SplitBrainHistoryShared);
    }

    #[test]
    fn rule_100_unrelated() {
        let a = view(g(0xA3, 0, [0, 0]), C);
        let b = view(g(0xB3, 0, [0, 0]), C);
        check(a, b, Decision::Unrelated, Rule::Unrelated);
        // Inconsistency does not turn unrelated data into a sync.
        check(view(a.gens, 0), b, Decision::Unrelated, Rule::Unrelated);
    }

    #[test]
    fn disk_states_override() {
        let same = g(0xC1, 0, [0, 0]);
        // Same generation, one side Inconsistent: bitmap-based.
        check(
            view(same, 0),
            view(same, C),
            TGT_BM,
            Rule::LocalInconsistent,
        );
        check(view(same, C), view(same, 0), SRC_BM, Rule::PeerInconsistent);
        // Split brain with one side Inconsistent: full sync from the
        // consistent one.
        let a = view(g(0xA2, 0xC1, [0, 0]), 0);
        let b = view(g(0xB2, 0xC1, [0, 0]), C);
        check(a, b, TGT_FULL, Rule::LocalInconsistent);
        // The UUIDs already agree with the disk states: their rule stays.
        let writer = view(g(0xC2, 0xC1, [0, 0]), C);
        let behind = view(g(0xC1, 0, [0, 0]), 0);
        check(behind, writer, TGT_BM, Rule::LocalCurrentIsPeerBitmap);
        // Both Inconsistent: no override.
        check(
            view(same, 0),
            view(same, 0),
            Decision::NoSync,
            Rule::SameCurrent,
        );
    }

    #[test]
    fn marked_blocks_turn_no_sync_into_a_sync() {
        let same = g(0xC1, 0, [0x11, 0]);
        let dirty = |f, bits| UuidView {
            gens: same,
            flags: f,
            dirty_bits: bits,
        };
        check(dirty(C, 3), dirty(C, 0), SRC_BM, Rule::LocalDirtyBits);
        check(dirty(C, 0), dirty(C, 3), TGT_BM, Rule::PeerDirtyBits);
        let v = both(dirty(C, 1), dirty(C, 2), true);
        assert_eq!((v.decision, v.rule), (TGT_BM, Rule::BothDirtyBits));
        // A crashed Primary still decides by rule 40, a just-created pair
        // by rule 10, and an Inconsistent side by its disk state.
        let cp = C | flags::CRASHED_PRIMARY;
        check(dirty(C, 3), dirty(cp, 0), TGT_BM, Rule::CrashedPrimaryPeer);
        let jc = g(UUID_JUST_CREATED, 0, [0, 0]);
        let v = compare(
            &UuidView {
                gens: jc,
                flags: 0,
                dirty_bits: 5,
            },
            &view(jc, 0),
            true,
        );
        assert_eq!(v.rule, Rule::BothJustCreated);
        check(dirty(0, 3), dirty(C, 0), TGT_BM, Rule::LocalInconsistent);
    }

    #[test]
    fn full_sync_flag_makes_syncs_full() {
        let writer = g(0xC2, 0xC1, [0, 0]);
        let behind = g(0xC1, 0, [0, 0]);
        let fs = C | flags::FULL_SYNC;
        check(
            view(writer, fs),
            view(behind, C),
            SRC_FULL,
            Rule::PeerCurrentIsLocalBitmap,
        );
        check(
            view(writer, C),
            view(behind, fs),
            SRC_FULL,
            Rule::PeerCurrentIsLocalBitmap,
        );
        let same = g(0xC1, 0, [0, 0]);
        check(
            view(same, fs),
            view(same, C),
            Decision::NoSync,
            Rule::SameCurrent,
        );
    }

    #[test]
    fn every_rule_has_a_number_and_sentence() {
        for r in Rule::ALL {
            assert!(!r.describe().is_empty());
            assert!(r.number() <= 100);
            let json = serde_json::to_string(&r).expect("serializes");
            assert!(
                json.chars().all(|c| c != '_' && !c.is_ascii_uppercase()),
                "{json}"
            );
        }
        assert_eq!(Rule::PeerCurrentIsLocalBitmap.number(), 70);
        assert_eq!(
            serde_json::to_string(&Decision::SyncTarget { full: true }).expect("serializes"),
            r#"{"sync-target":{"full":true}}"#
        );
        assert_eq!(
            serde_json::to_string(&Decision::SplitBrain).expect("serializes"),
            r#""split-brain""#
        );
    }

    #[test]
    fn new_current_moves_current_into_empty_bitmap() {
        let mut x = g(0xC1, 0, [0x11, 0x12]);
        x.new_current(0xC2);
        assert_eq!(x, g(0xC2, 0xC1, [0x11, 0x12]));
    }

    #[test]
    fn new_current_with_bitmap_in_use_pushes_history() {
        let mut x = g(0xC2, 0xC1, [0x11, 0x12]);
        x.new_current(0xC3);
        assert_eq!(x, g(0xC3, 0xC1, [0xC2, 0x11]));
    }

    #[test]
    fn new_current_drops_a_just_created_uuid() {
        let mut x = g(UUID_JUST_CREATED, 0, [0, 0]);
        x.new_current(0xC1);
        assert_eq!(x, g(0xC1, 0, [0, 0]));
        assert!(!x.just_created());
        assert!(g(0, 0, [0, 0]).just_created());
    }

    #[test]
    fn clear_bitmap_uuid_moves_it_to_history() {
        let mut x = g(0xC2, 0xC1, [0x11, 0x12]);
        x.clear_bitmap_uuid();
        assert_eq!(x, g(0xC2, 0, [0xC1, 0x11]));
        // Clearing an empty slot changes nothing.
        let before = x;
        x.clear_bitmap_uuid();
        assert_eq!(x, before);
    }

    #[test]
    fn set_bitmap() {
        let mut x = g(0xC2, 0, [0x11, 0x12]);
        x.set_bitmap(0xB1);
        assert_eq!(x, g(0xC2, 0xB1, [0x11, 0x12]));
        x.set_bitmap(0xB2);
        assert_eq!(x, g(0xC2, 0xB2, [0xB1, 0x11]));
        x.set_bitmap(0);
        assert_eq!(x, g(0xC2, 0, [0xB2, 0xB1]));
    }

    #[test]
    fn push_history_skips_repeats_and_empty_uuids() {
        let mut x = g(0xC2, 0xB1, [0x11, 0]);
        for u in [0, UUID_JUST_CREATED, 0xC2, 0xB1, 0x11] {
            x.push_history(u);
        }
        assert_eq!(x, g(0xC2, 0xB1, [0x11, 0]));
        x.push_history(0x22);
        assert_eq!(x, g(0xC2, 0xB1, [0x22, 0x11]));
    }

    #[test]
    fn adopt_peer_current_after_sync_gives_equal_uuids() {
        let mut source = g(0xC2, 0xC1, [0x11, 0x12]);
        let at_handshake = source;
        let mut target = g(0xC1, 0, [0x11, 0x12]);
        assert_eq!(
            compare(&view(target, C), &view(source, C), false).rule,
            Rule::LocalCurrentIsPeerBitmap
        );
        source.clear_bitmap_uuid();
        target.adopt_peer_current(&at_handshake);
        assert_eq!(target, source);
        assert_eq!(target, g(0xC2, 0, [0xC1, 0x11]));
        // A full-sync target drops a current UUID the source never had.
        let mut victim = g(0xD9, 0xC1, [0, 0]);
        victim.adopt_peer_current(&at_handshake);
        assert!(!victim.contains(0xD9));
    }

    #[test]
    fn missed_finish_is_detected_after_adopt() {
        // Source records nothing after the sync; target adopted.
        let source = g(0xC2, 0xC1, [0x11, 0x12]);
        let mut target = g(0xC1, 0, [0x11, 0x12]);
        target.adopt_peer_current(&source);
        check(
            view(source, C),
            view(target, C),
            SRC_BM,
            Rule::LocalMissedSyncFinish,
        );
    }
}
