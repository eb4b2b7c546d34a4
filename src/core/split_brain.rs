//! Automatic split-brain resolution: DRBD's `after-sb-0pri` and
//! `after-sb-1pri` policies as one pure function, [`resolve`]. It runs
//! only for a split brain the bitmaps can repair (rule 90: both bitmap
//! UUIDs name the generation the nodes last shared, so the union of
//! both bitmaps covers every block either changed since). Two
//! Primaries never connect, so there is no `after-sb-2pri`.
//!
//! Both nodes run the same function on mirrored facts and must use the
//! same policies (the handshake refuses a peer whose differ), so their
//! decisions mirror each other.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::state::Role;

/// `after-sb-0pri`: both nodes are Secondary when they meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum After0Pri {
    /// No automatic resolution: both go StandAlone.
    #[default]
    Disconnect,
    /// If exactly one node changed nothing since the split, its side is
    /// discarded (it becomes sync target: it loses nothing); if neither
    /// changed anything, the dialing node yields. Otherwise disconnect.
    DiscardZeroChanges,
    /// The node that became Primary after the split (it was not Primary
    /// when the link was lost) is discarded; if that does not decide,
    /// as `discard-zero-changes`, then as `discard-least-changes`.
    DiscardYoungerPrimary,
    /// The node with fewer changed blocks is discarded (a tie: the
    /// dialing node yields), after `discard-zero-changes` had its say.
    DiscardLeastChanges,
}

/// `after-sb-1pri`: exactly one node is Primary when they meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum After1Pri {
    /// No automatic resolution.
    #[default]
    Disconnect,
    /// The Secondary's changes are discarded, whatever `after-sb-0pri`
    /// says.
    DiscardSecondary,
    /// `after-sb-0pri` decides; its decision is taken only if it
    /// discards the Secondary, otherwise disconnect.
    Consensus,
}

impl After0Pri {
    pub const ALL: [After0Pri; 4] = [
        After0Pri::Disconnect,
        After0Pri::DiscardZeroChanges,
        After0Pri::DiscardYoungerPrimary,
        After0Pri::DiscardLeastChanges,
    ];

    pub fn name(self) -> &'static str {
        match self {
            After0Pri::Disconnect => "disconnect",
            After0Pri::DiscardZeroChanges => "discard-zero-changes",
            After0Pri::DiscardYoungerPrimary => "discard-younger-primary",
            After0Pri::DiscardLeastChanges => "discard-least-changes",
        }
    }

    /// The code sent in `Hello` to compare with the peer's.
    pub fn code(self) -> u8 {
        match self {
            After0Pri::Disconnect => 0,
            After0Pri::DiscardZeroChanges => 1,
            After0Pri::DiscardYoungerPrimary => 2,
            After0Pri::DiscardLeastChanges => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<After0Pri> {
        After0Pri::ALL.into_iter().find(|p| p.code() == code)
    }
}

impl After1Pri {
    pub const ALL: [After1Pri; 3] = [
        After1Pri::Disconnect,
        After1Pri::DiscardSecondary,
        After1Pri::Consensus,
    ];

    pub fn name(self) -> &'static str {
        match self {
            After1Pri::Disconnect => "disconnect",
            After1Pri::DiscardSecondary => "discard-secondary",
            After1Pri::Consensus => "consensus",
        }
    }

    pub fn code(self) -> u8 {
        match self {
            After1Pri::Disconnect => 0,
            After1Pri::DiscardSecondary => 1,
            After1Pri::Consensus => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<After1Pri> {
        After1Pri::ALL.into_iter().find(|p| p.code() == code)
    }
}

impl fmt::Display for After0Pri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for After1Pri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A resource's automatic split-brain policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Policy {
    pub after_sb_0pri: After0Pri,
    pub after_sb_1pri: After1Pri,
}

impl Policy {
    /// The two codes carried in `Hello`.
    pub fn codes(self) -> [u8; 2] {
        [self.after_sb_0pri.code(), self.after_sb_1pri.code()]
    }

    /// True when nothing is resolved automatically.
    pub fn is_manual(self) -> bool {
        self == Policy::default()
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "after-sb-0pri {}, after-sb-1pri {}",
            self.after_sb_0pri, self.after_sb_1pri
        )
    }
}

/// What one node knows when a split brain is detected, from its own
/// point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    pub local_role: Role,
    pub peer_role: Role,
    /// Blocks marked in this node's bitmap: its changes since the split.
    pub local_changes: u64,
    /// The same for the peer (from its `State`).
    pub peer_changes: u64,
    /// This node was Primary when it lost the peer (its bitmap UUID was
    /// set while Primary); a node promoted after the split was not.
    pub local_primary_at_split: bool,
    pub peer_primary_at_split: bool,
    /// This node dialed: it yields on a tie (DRBD's "resolve conflicts"
    /// node does the same on its side).
    pub local_dials: bool,
}

impl Facts {
    /// The same facts as the peer sees them.
    pub fn mirrored(self) -> Facts {
        Facts {
            local_role: self.peer_role,
            peer_role: self.local_role,
            local_changes: self.peer_changes,
            peer_changes: self.local_changes,
            local_primary_at_split: self.peer_primary_at_split,
            peer_primary_at_split: self.local_primary_at_split,
            local_dials: !self.local_dials,
        }
    }
}

/// Whose changes an automatic resolution discards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Victim {
    /// This node: it becomes sync target.
    Local,
    /// The peer: this node becomes sync source.
    Peer,
}

/// The outcome of [`resolve`], with what it was decided on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    /// `None`: not resolved, the nodes disconnect.
    pub victim: Option<Victim>,
    /// The setting that decided: `after-sb-0pri` or `after-sb-1pri`.
    pub setting: String,
    /// Its value, e.g. `discard-least-changes`.
    pub policy: String,
    pub primaries: u8,
    pub local_changes: u64,
    pub peer_changes: u64,
    /// One sentence with the numbers, for the log and `status`.
    pub reason: String,
}

fn who(v: Victim) -> &'static str {
    match v {
        Victim::Local => "this node's",
        Victim::Peer => "the peer's",
    }
}

/// The `after-sb-0pri` decision (DRBD's `drbd_asb_recover_0p`): which
/// side to discard, and why, or why not.
fn zero_pri(p: After0Pri, f: &Facts) -> (Option<Victim>, String) {
    let (ls, ps) = (f.local_changes, f.peer_changes);
    let tie = if f.local_dials {
        Victim::Local
    } else {
        Victim::Peer
    };
    let changes = format!("this node changed {ls} blocks, the peer {ps}");
    if p == After0Pri::Disconnect {
        return (None, format!("no automatic resolution ({changes})"));
    }
    if p == After0Pri::DiscardYoungerPrimary {
        match (f.local_primary_at_split, f.peer_primary_at_split) {
            (false, true) => {
                return (
                    Some(Victim::Local),
                    "this node became Primary after the split, the peer was Primary before it: discarding the younger Primary's (this node's) changes".into(),
                )
            }
            (true, false) => {
                return (
                    Some(Victim::Peer),
                    "the peer became Primary after the split, this node was Primary before it: discarding the younger Primary's (the peer's) changes".into(),
                )
            }
            (true, true) | (false, false) => {}
        }
    }
    let undecided = if p == After0Pri::DiscardYoungerPrimary {
        "the younger Primary is not known; "
    } else {
        ""
    };
    match (ls, ps) {
        (0, 0) => {
            return (
                Some(tie),
                format!(
                    "{undecided}neither node changed any block: the dialing node yields, discarding {} (empty) changes",
                    who(tie)
                ),
            )
        }
        (0, _) => {
            return (
                Some(Victim::Local),
                format!("{undecided}{changes}: discarding this node's (zero) changes"),
            )
        }
        (_, 0) => {
            return (
                Some(Victim::Peer),
                format!("{undecided}{changes}: discarding the peer's (zero) changes"),
            )
        }
        _ => {}
    }
    if p == After0Pri::DiscardZeroChanges {
        return (None, format!("both nodes changed blocks ({changes})"));
    }
    let victim = match ls.cmp(&ps) {
        std::cmp::Ordering::Less => Victim::Local,
        std::cmp::Ordering::Greater => Victim::Peer,
        std::cmp::Ordering::Equal => tie,
    };
    let tail = if ls == ps {
        " (a tie: the dialing node yields)"
    } else {
        ""
    };
    (
        Some(victim),
        format!(
            "{undecided}{changes}: discarding {} changes, the fewer{tail}",
            who(victim)
        ),
    )
}

/// Decides an auto-recoverable split brain by `policy` (see the module
/// doc). Called on both nodes with mirrored [`Facts`], the results
/// mirror each other.
pub fn resolve(policy: Policy, f: &Facts) -> Resolution {
    let primaries =
        u8::from(f.local_role == Role::Primary) + u8::from(f.peer_role == Role::Primary);
    let (setting, name, (victim, reason)) = match primaries {
        0 => (
            "after-sb-0pri",
            policy.after_sb_0pri.name(),
            zero_pri(policy.after_sb_0pri, f),
        ),
        1 => {
            let secondary = if f.local_role == Role::Secondary {
                Victim::Local
            } else {
                Victim::Peer
            };
            let decided = match policy.after_sb_1pri {
                After1Pri::Disconnect => (None, "no automatic resolution".to_string()),
                After1Pri::DiscardSecondary => (
                    Some(secondary),
                    format!(
                        "discarding the Secondary's ({}) changes (this node changed {} blocks, the peer {})",
                        if secondary == Victim::Local { "this node" } else { "the peer" },
                        f.local_changes,
                        f.peer_changes
                    ),
                ),
                After1Pri::Consensus => {
                    let (v, why) = zero_pri(policy.after_sb_0pri, f);
                    if v == Some(secondary) {
                        (v, format!("after-sb-0pri {} agrees: {why}", policy.after_sb_0pri))
                    } else {
                        (
                            None,
                            format!(
                                "after-sb-0pri {} would not discard the Secondary: {why}",
                                policy.after_sb_0pri
                            ),
                        )
                    }
                }
            };
            ("after-sb-1pri", policy.after_sb_1pri.name(), decided)
        }
        _ => (
            "after-sb-2pri",
            "disconnect",
            (
                None,
                "two Primaries are never resolved automatically".into(),
            ),
        ),
    };
    Resolution {
        victim,
        setting: setting.into(),
        policy: name.into(),
        primaries,
        local_changes: f.local_changes,
        peer_changes: f.peer_changes,
        reason,
    }
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} ({} Primary): {}",
            self.setting, self.policy, self.primaries, self.reason
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(local: u64, peer: u64) -> Facts {
        Facts {
            local_role: Role::Secondary,
            peer_role: Role::Secondary,
            local_changes: local,
            peer_changes: peer,
            local_primary_at_split: false,
            peer_primary_at_split: false,
            local_dials: true,
        }
    }

    fn zero(p: After0Pri) -> Policy {
        Policy {
            after_sb_0pri: p,
            after_sb_1pri: After1Pri::Disconnect,
        }
    }

    fn one(p1: After1Pri, p0: After0Pri) -> Policy {
        Policy {
            after_sb_0pri: p0,
            after_sb_1pri: p1,
        }
    }

    fn mirror(v: Option<Victim>) -> Option<Victim> {
        v.map(|v| match v {
            Victim::Local => Victim::Peer,
            Victim::Peer => Victim::Local,
        })
    }

    /// Resolves on both sides, checks they agree, returns the local one.
    fn both(p: Policy, f: Facts) -> Resolution {
        let a = resolve(p, &f);
        let b = resolve(p, &f.mirrored());
        assert_eq!(a.victim, mirror(b.victim), "{a} / {b}");
        a
    }

    #[test]
    fn disconnect_is_the_default_and_never_resolves() {
        assert!(Policy::default().is_manual());
        for (l, p) in [(0, 0), (0, 5), (5, 0), (3, 9)] {
            let r = both(Policy::default(), facts(l, p));
            assert_eq!(r.victim, None);
            assert_eq!(r.setting, "after-sb-0pri");
            let mut f = facts(l, p);
            f.local_role = Role::Primary;
            assert_eq!(both(Policy::default(), f).victim, None);
        }
    }

    #[test]
    fn discard_zero_changes() {
        let p = zero(After0Pri::DiscardZeroChanges);
        assert_eq!(both(p, facts(0, 7)).victim, Some(Victim::Local));
        assert_eq!(both(p, facts(7, 0)).victim, Some(Victim::Peer));
        let r = both(p, facts(3, 7));
        assert_eq!(r.victim, None);
        assert!(
            r.reason.contains("this node changed 3 blocks, the peer 7"),
            "{r}"
        );
        // Neither changed anything: the dialing node yields.
        assert_eq!(both(p, facts(0, 0)).victim, Some(Victim::Local));
        let mut f = facts(0, 0);
        f.local_dials = false;
        assert_eq!(both(p, f).victim, Some(Victim::Peer));
    }

    #[test]
    fn discard_least_changes() {
        let p = zero(After0Pri::DiscardLeastChanges);
        let r = both(p, facts(3, 7));
        assert_eq!(r.victim, Some(Victim::Local));
        assert_eq!((r.local_changes, r.peer_changes), (3, 7));
        assert!(r.reason.contains("the fewer"), "{r}");
        assert_eq!(both(p, facts(9, 7)).victim, Some(Victim::Peer));
        assert_eq!(both(p, facts(0, 7)).victim, Some(Victim::Local));
        let r = both(p, facts(5, 5));
        assert_eq!(r.victim, Some(Victim::Local), "tie: the dialer yields");
        assert!(r.reason.contains("tie"), "{r}");
    }

    #[test]
    fn discard_younger_primary() {
        let p = zero(After0Pri::DiscardYoungerPrimary);
        let mut f = facts(1, 100);
        f.peer_primary_at_split = true;
        let r = both(p, f);
        assert_eq!(r.victim, Some(Victim::Local));
        assert!(r.reason.contains("younger"), "{r}");
        f.local_primary_at_split = true;
        f.peer_primary_at_split = false;
        assert_eq!(both(p, f).victim, Some(Victim::Peer));
        // Not decided by the roles: zero changes, then least changes.
        f.peer_primary_at_split = true;
        assert_eq!(both(p, f).victim, Some(Victim::Local));
        let r = both(p, facts(8, 0));
        assert_eq!(r.victim, Some(Victim::Peer));
        assert!(r.reason.contains("not known"), "{r}");
    }

    #[test]
    fn discard_secondary() {
        let p = one(After1Pri::DiscardSecondary, After0Pri::Disconnect);
        let mut f = facts(100, 1);
        f.peer_role = Role::Primary;
        let r = both(p, f);
        assert_eq!(r.victim, Some(Victim::Local));
        assert_eq!((r.setting.as_str(), r.primaries), ("after-sb-1pri", 1));
        f.peer_role = Role::Secondary;
        f.local_role = Role::Primary;
        assert_eq!(both(p, f).victim, Some(Victim::Peer));
    }

    #[test]
    fn consensus_takes_the_0pri_decision_only_if_it_discards_the_secondary() {
        let p = one(After1Pri::Consensus, After0Pri::DiscardLeastChanges);
        let mut f = facts(2, 9);
        f.peer_role = Role::Primary;
        assert_eq!(both(p, f).victim, Some(Victim::Local));
        // Least changes would discard the Primary: no.
        f.local_changes = 20;
        let r = both(p, f);
        assert_eq!(r.victim, None);
        assert!(r.reason.contains("would not discard the Secondary"), "{r}");
        // With after-sb-0pri disconnect there is never a consensus.
        let p = one(After1Pri::Consensus, After0Pri::Disconnect);
        f.local_changes = 0;
        assert_eq!(both(p, f).victim, None);
    }

    #[test]
    fn after_sb_0pri_does_not_apply_with_a_primary_and_1pri_not_without() {
        let p = one(After1Pri::Disconnect, After0Pri::DiscardZeroChanges);
        let mut f = facts(0, 7);
        f.local_role = Role::Primary;
        assert_eq!(both(p, f).victim, None);
        let p = one(After1Pri::DiscardSecondary, After0Pri::Disconnect);
        assert_eq!(both(p, facts(0, 7)).victim, None);
    }

    #[test]
    fn two_primaries_are_never_resolved() {
        let p = one(After1Pri::DiscardSecondary, After0Pri::DiscardZeroChanges);
        let mut f = facts(0, 7);
        f.local_role = Role::Primary;
        f.peer_role = Role::Primary;
        assert_eq!(both(p, f).victim, None);
    }

    #[test]
    fn every_policy_pair_decides_symmetrically() {
        for p0 in After0Pri::ALL {
            for p1 in After1Pri::ALL {
                let p = one(p1, p0);
                for roles in [
                    (Role::Secondary, Role::Secondary),
                    (Role::Primary, Role::Secondary),
                    (Role::Secondary, Role::Primary),
                ] {
                    for (l, r) in [(0, 0), (0, 3), (3, 0), (3, 3), (2, 5)] {
                        for flags in [(false, false), (true, false), (false, true), (true, true)] {
                            for dials in [true, false] {
                                let f = Facts {
                                    local_role: roles.0,
                                    peer_role: roles.1,
                                    local_changes: l,
                                    peer_changes: r,
                                    local_primary_at_split: flags.0,
                                    peer_primary_at_split: flags.1,
                                    local_dials: dials,
                                };
                                let res = both(p, f);
                                assert!(!res.reason.is_empty());
                                // A Primary is never discarded.
                                if res.victim == Some(Victim::Local) {
                                    assert_eq!(roles.0, Role::Secondary, "{res}");
                                }
                                if res.victim == Some(Victim::Peer) {
                                    assert_eq!(roles.1, Role::Secondary, "{res}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn codes_round_trip() {
        for p in After0Pri::ALL {
            assert_eq!(After0Pri::from_code(p.code()), Some(p));
        }
        for p in After1Pri::ALL {
            assert_eq!(After1Pri::from_code(p.code()), Some(p));
        }
        assert_eq!(After0Pri::from_code(9), None);
        assert_eq!(
            serde_json::to_string(&After0Pri::DiscardYoungerPrimary).unwrap_or_default(),
            "\"discard-younger-primary\""
        );
    }
}
