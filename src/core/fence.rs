//! Resource-level fencing, DRBD's `fencing resource-only`: what a Primary
//! does when it can no longer reach its peer. No I/O here: the shell
//! (`crate::repl`) feeds [`FenceEvent`]s to a [`Fencer`] and carries out
//! the [`FenceAction`]s it returns.
//!
//! A Primary that loses its peer cannot tell a dead peer from a cut link.
//! If the peer is alive, a cluster manager may promote it; every write the
//! old Primary acknowledged from then on would be missing there. So, with
//! fencing on, the first sign of a lost peer (the link dropping, or a
//! write or barrier that could not be mirrored) **freezes** writes: new
//! ones wait before touching the disk, those that lost their peer wait
//! before being acknowledged. The configured fence-peer handler runs; when
//! it says the peer is fenced (a cluster constraint forbids promoting it)
//! or outdated, writes resume and go on without the peer, marked out of
//! sync as usual. A failed handler is run again after a delay; the peer
//! coming back, or the operator's `resume-io`, also resumes. Once the pair
//! is back in sync, the unfence handler lifts the fence.
//!
//! Promoting a node whose peer is not connected runs the handler first
//! (the peer might be a Primary elsewhere): the promote goes on only if
//! the peer is fenced.
//!
//! Handler exit codes follow DRBD's fence-peer convention.

use super::state::Level;

/// What a fence-peer handler reported, from its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 3: the peer's data is already Inconsistent or Outdated.
    AlreadyOutdated,
    /// Exit 4: the peer was fenced (constraint placed) or marked Outdated.
    Fenced,
    /// Exit 5: the peer could not be reached and was not fenced.
    Unreachable,
    /// Exit 6: the peer is Primary: fencing it was refused.
    PeerPrimary,
    /// Exit 7: the peer node was shot (STONITH).
    Stonithed,
    /// Any other exit, a signal, a timeout, or the handler not starting.
    Failed(String),
}

impl Outcome {
    /// The outcome for a handler that exited with `code` (`None`: killed
    /// by a signal).
    pub fn from_exit(code: Option<i32>) -> Outcome {
        match code {
            Some(3) => Outcome::AlreadyOutdated,
            Some(4) => Outcome::Fenced,
            Some(5) => Outcome::Unreachable,
            Some(6) => Outcome::PeerPrimary,
            Some(7) => Outcome::Stonithed,
            Some(c) => Outcome::Failed(format!("exit status {c}")),
            None => Outcome::Failed("killed by a signal".into()),
        }
    }

    /// The peer can no longer be promoted (or is dead): writes may go on
    /// without it.
    pub fn peer_fenced(&self) -> bool {
        match self {
            Outcome::AlreadyOutdated | Outcome::Fenced | Outcome::Stonithed => true,
            Outcome::Unreachable | Outcome::PeerPrimary | Outcome::Failed(_) => false,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Outcome::AlreadyOutdated => "the peer is already Outdated or Inconsistent".into(),
            Outcome::Fenced => "the peer is fenced".into(),
            Outcome::Unreachable => "the peer is unreachable and was not fenced".into(),
            Outcome::PeerPrimary => "the peer is Primary".into(),
            Outcome::Stonithed => "the peer node was shot".into(),
            Outcome::Failed(why) => format!("the handler failed ({why})"),
        }
    }
}

/// Something that happened; see [`Fencer::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceEvent {
    /// While Primary: the link to the peer dropped, or a write or barrier
    /// could not be mirrored because it did.
    PeerUnreachable,
    /// The fence-peer handler started by `RunFenceHandler` finished.
    HandlerExited(Outcome),
    /// The delay asked for by `ScheduleRetry` is over.
    RetryDue,
    /// The handshake with the peer completed.
    PeerConnected,
    /// Connected, no resync running, both disks UpToDate.
    InSync,
    /// The operator's `resume-io`: they vouch that the peer is fenced.
    Resume,
    /// The resource goes down (daemon stopping): held writes fail.
    Shutdown,
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceAction {
    /// Hold new writes, and the completion of writes the peer missed.
    Freeze,
    /// Release held writes: completed successfully, or (`fail`) with an
    /// I/O error.
    Thaw {
        fail: bool,
    },
    /// Start the fence-peer handler; report its end as `HandlerExited`.
    RunFenceHandler,
    /// Report `RetryDue` after the configured retry delay.
    ScheduleRetry,
    /// Record in the metadata that the peer is fenced
    /// (`Event::PeerFenced`), so a restart of this node knows it.
    MarkPeerFenced,
    /// Start the unfence handler (fire and forget; it is idempotent).
    RunUnfenceHandler,
    Log {
        level: Level,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Writes flow.
    Normal,
    /// Writes are held; `running`: a handler is running now.
    Frozen { running: bool, attempts: u32 },
}

/// Fencing state of one resource on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fencer {
    enabled: bool,
    phase: Phase,
    /// The peer is known fenced or outdated since the link was last up.
    peer_fenced: bool,
    /// A fence was placed that the unfence handler has not lifted yet.
    unfence_owed: bool,
}

/// How a promote must treat fencing; see [`Fencer::promote_needs_fence`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromoteFence {
    /// Go ahead.
    NotNeeded,
    /// Run the fence-peer handler first, then [`Fencer::promote_fenced`].
    RunHandler,
}

impl Fencer {
    /// `enabled`: the resource's policy is `resource-only`.
    /// `peer_fenced`: the metadata says the peer was fenced before this
    /// node last stopped (`PEER_OUTDATED`); the fence may still be in
    /// place, so it is owed an unfence too.
    pub fn new(enabled: bool, peer_fenced: bool) -> Fencer {
        Fencer {
            enabled,
            phase: Phase::Normal,
            peer_fenced,
            unfence_owed: enabled && peer_fenced,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Writes are held now.
    pub fn frozen(&self) -> bool {
        matches!(self.phase, Phase::Frozen { .. })
    }

    /// The peer is known fenced or outdated since the link was last up.
    pub fn peer_fenced(&self) -> bool {
        self.peer_fenced
    }

    /// Whether promoting now needs the peer fenced first: fencing is on,
    /// the peer is not connected (so it may be Primary somewhere, or be
    /// promoted later) and not known fenced.
    pub fn promote_needs_fence(&self, connected: bool) -> PromoteFence {
        if self.enabled && !connected && !self.peer_fenced {
            PromoteFence::RunHandler
        } else {
            PromoteFence::NotNeeded
        }
    }

    /// The handler run for a promote finished. `Ok`: promote (with the
    /// actions to carry out first); `Err`: refuse, with the reason. With
    /// `force` the operator overrides a failed handler: logged as an
    /// error, and the peer then counts as fenced (on their word).
    pub fn promote_fenced(
        &mut self,
        outcome: &Outcome,
        force: bool,
    ) -> Result<Vec<FenceAction>, String> {
        if outcome.peer_fenced() {
            self.peer_fenced = true;
            self.unfence_owed = true;
            return Ok(vec![
                log(
                    Level::Warn,
                    format!("peer fenced before promoting: {}", outcome.describe()),
                ),
                FenceAction::MarkPeerFenced,
            ]);
        }
        if !force {
            return Err(format!(
                "promote refused: the peer is not connected and could not be fenced: {} \
                 (promote --force overrides)",
                outcome.describe()
            ));
        }
        self.peer_fenced = true;
        Ok(vec![log(
            Level::Error,
            format!(
                "promote FORCED although the peer could not be fenced: {}",
                outcome.describe()
            ),
        )])
    }

    pub fn handle(&mut self, event: FenceEvent) -> Vec<FenceAction> {
        if !self.enabled {
            return Vec::new();
        }
        let mut out = Vec::new();
        match event {
            FenceEvent::PeerUnreachable => {
                if self.phase == Phase::Normal && !self.peer_fenced {
                    self.phase = Phase::Frozen {
                        running: true,
                        attempts: 1,
                    };
                    out.push(log(
                        Level::Warn,
                        "lost the peer: writes frozen until it is fenced (fence-peer handler started)",
                    ));
                    out.push(FenceAction::Freeze);
                    out.push(FenceAction::RunFenceHandler);
                }
            }
            FenceEvent::HandlerExited(outcome) => match self.phase {
                Phase::Frozen {
                    running: true,
                    attempts,
                } => {
                    if outcome.peer_fenced() {
                        self.phase = Phase::Normal;
                        self.peer_fenced = true;
                        self.unfence_owed = true;
                        out.push(log(
                            Level::Warn,
                            format!("fence-peer handler: {}; writes resume", outcome.describe()),
                        ));
                        out.push(FenceAction::MarkPeerFenced);
                        out.push(FenceAction::Thaw { fail: false });
                    } else {
                        self.phase = Phase::Frozen {
                            running: false,
                            attempts,
                        };
                        out.push(log(
                            Level::Error,
                            format!(
                                "fence-peer handler (attempt {attempts}): {}; writes stay frozen \
                                 and it runs again (`replctl resume-io` overrides)",
                                outcome.describe()
                            ),
                        ));
                        out.push(FenceAction::ScheduleRetry);
                    }
                }
                Phase::Frozen { running: false, .. } | Phase::Normal => {
                    // Finished after the freeze ended (peer back, resume):
                    // whatever it placed must be lifted in time.
                    if outcome.peer_fenced() {
                        self.unfence_owed = true;
                    }
                    out.push(log(
                        Level::Info,
                        format!(
                            "fence-peer handler finished after writes resumed: {}",
                            outcome.describe()
                        ),
                    ));
                }
            },
            FenceEvent::RetryDue => {
                if let Phase::Frozen {
                    running: false,
                    attempts,
                } = self.phase
                {
                    self.phase = Phase::Frozen {
                        running: true,
                        attempts: attempts + 1,
                    };
                    out.push(FenceAction::RunFenceHandler);
                }
            }
            FenceEvent::PeerConnected => {
                self.peer_fenced = false;
                if self.frozen() {
                    self.phase = Phase::Normal;
                    out.push(log(
                        Level::Info,
                        "the peer is back: writes resume (what it missed is resynced)",
                    ));
                    out.push(FenceAction::Thaw { fail: false });
                }
            }
            FenceEvent::InSync => {
                if self.unfence_owed && self.phase == Phase::Normal {
                    self.unfence_owed = false;
                    out.push(log(
                        Level::Info,
                        "the pair is in sync again: running the unfence handler",
                    ));
                    out.push(FenceAction::RunUnfenceHandler);
                }
            }
            FenceEvent::Resume => {
                if self.frozen() {
                    self.phase = Phase::Normal;
                    self.peer_fenced = true;
                    out.push(log(
                        Level::Warn,
                        "resume-io: writes resume without the peer fenced, on the operator's word",
                    ));
                    out.push(FenceAction::Thaw { fail: false });
                }
            }
            FenceEvent::Shutdown => {
                if self.frozen() {
                    self.phase = Phase::Normal;
                    out.push(log(
                        Level::Error,
                        "shutting down with writes frozen: they fail (the peer never got them)",
                    ));
                    out.push(FenceAction::Thaw { fail: true });
                }
            }
        }
        out
    }
}

fn log(level: Level, message: impl Into<String>) -> FenceAction {
    FenceAction::Log {
        level,
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(actions: &[FenceAction]) -> Vec<&'static str> {
        actions
            .iter()
            .filter_map(|a| match a {
                FenceAction::Freeze => Some("freeze"),
                FenceAction::Thaw { fail: false } => Some("thaw"),
                FenceAction::Thaw { fail: true } => Some("thaw-fail"),
                FenceAction::RunFenceHandler => Some("fence"),
                FenceAction::ScheduleRetry => Some("retry"),
                FenceAction::MarkPeerFenced => Some("mark"),
                FenceAction::RunUnfenceHandler => Some("unfence"),
                FenceAction::Log { .. } => None,
            })
            .collect()
    }

    #[test]
    fn exit_codes_follow_the_fence_peer_convention() {
        let fenced: Vec<_> = (0..9)
            .map(|c| Outcome::from_exit(Some(c)).peer_fenced())
            .collect();
        assert_eq!(
            fenced,
            [false, false, false, true, true, false, false, true, false]
        );
        assert!(!Outcome::from_exit(None).peer_fenced());
    }

    #[test]
    fn disabled_fencing_never_freezes() {
        let mut f = Fencer::new(false, false);
        assert!(f.handle(FenceEvent::PeerUnreachable).is_empty());
        assert!(!f.frozen());
        assert_eq!(f.promote_needs_fence(false), PromoteFence::NotNeeded);
    }

    #[test]
    fn a_lost_peer_freezes_until_the_handler_fences_it_then_unfences_after_sync() {
        let mut f = Fencer::new(true, false);
        assert_eq!(
            kinds(&f.handle(FenceEvent::PeerUnreachable)),
            ["freeze", "fence"]
        );
        assert!(f.frozen());
        // More lost writes while the handler runs change nothing.
        assert!(kinds(&f.handle(FenceEvent::PeerUnreachable)).is_empty());
        assert_eq!(
            kinds(&f.handle(FenceEvent::HandlerExited(Outcome::Fenced))),
            ["mark", "thaw"]
        );
        assert!(!f.frozen() && f.peer_fenced());
        // Further writes without the peer flow.
        assert!(kinds(&f.handle(FenceEvent::PeerUnreachable)).is_empty());
        // Unfence only once back in sync, and once.
        assert!(kinds(&f.handle(FenceEvent::PeerConnected)).is_empty());
        assert!(!f.peer_fenced());
        assert_eq!(kinds(&f.handle(FenceEvent::InSync)), ["unfence"]);
        assert!(kinds(&f.handle(FenceEvent::InSync)).is_empty());
        // The next loss freezes again.
        assert_eq!(
            kinds(&f.handle(FenceEvent::PeerUnreachable)),
            ["freeze", "fence"]
        );
    }

    #[test]
    fn a_failing_handler_keeps_writes_frozen_and_is_retried_not_looped() {
        let mut f = Fencer::new(true, false);
        f.handle(FenceEvent::PeerUnreachable);
        for code in [1, 5, 6] {
            let a = f.handle(FenceEvent::HandlerExited(Outcome::from_exit(Some(code))));
            assert_eq!(kinds(&a), ["retry"], "exit {code}");
            assert!(f.frozen());
            // Nothing runs until the retry is due.
            assert!(kinds(&f.handle(FenceEvent::PeerUnreachable)).is_empty());
            assert_eq!(kinds(&f.handle(FenceEvent::RetryDue)), ["fence"]);
            // A second RetryDue while the handler runs starts nothing.
            assert!(kinds(&f.handle(FenceEvent::RetryDue)).is_empty());
        }
        assert_eq!(
            f.phase,
            Phase::Frozen {
                running: true,
                attempts: 4
            }
        );
        assert_eq!(
            kinds(&f.handle(FenceEvent::HandlerExited(Outcome::Stonithed))),
            ["mark", "thaw"]
        );
    }

    #[test]
    fn the_peer_returning_or_the_operator_resumes_a_freeze() {
        let mut f = Fencer::new(true, false);
        f.handle(FenceEvent::PeerUnreachable);
        assert_eq!(kinds(&f.handle(FenceEvent::PeerConnected)), ["thaw"]);
        // The handler's late success still owes an unfence.
        f.handle(FenceEvent::HandlerExited(Outcome::Fenced));
        assert!(!f.frozen());
        assert_eq!(kinds(&f.handle(FenceEvent::InSync)), ["unfence"]);

        let mut f = Fencer::new(true, false);
        f.handle(FenceEvent::PeerUnreachable);
        f.handle(FenceEvent::HandlerExited(Outcome::Unreachable));
        assert_eq!(kinds(&f.handle(FenceEvent::Resume)), ["thaw"]);
        assert!(f.peer_fenced());
        assert!(kinds(&f.handle(FenceEvent::RetryDue)).is_empty());
        assert!(kinds(&f.handle(FenceEvent::Resume)).is_empty());
        // No fence was placed: nothing to lift.
        f.handle(FenceEvent::PeerConnected);
        assert!(kinds(&f.handle(FenceEvent::InSync)).is_empty());
    }

    #[test]
    fn shutdown_fails_held_writes() {
        let mut f = Fencer::new(true, false);
        f.handle(FenceEvent::PeerUnreachable);
        assert_eq!(kinds(&f.handle(FenceEvent::Shutdown)), ["thaw-fail"]);
        assert!(kinds(&f.handle(FenceEvent::Shutdown)).is_empty());
    }

    #[test]
    fn promote_without_the_peer_fences_it_first() {
        let mut f = Fencer::new(true, false);
        assert_eq!(f.promote_needs_fence(true), PromoteFence::NotNeeded);
        assert_eq!(f.promote_needs_fence(false), PromoteFence::RunHandler);
        let err = f
            .promote_fenced(&Outcome::PeerPrimary, false)
            .expect_err("refused");
        assert!(err.contains("the peer is Primary"), "{err}");
        assert!(!f.peer_fenced());
        let a = f.promote_fenced(&Outcome::Fenced, false).expect("ok");
        assert_eq!(kinds(&a), ["mark"]);
        assert_eq!(f.promote_needs_fence(false), PromoteFence::NotNeeded);
        // Writes without the peer then flow.
        assert!(kinds(&f.handle(FenceEvent::PeerUnreachable)).is_empty());

        let mut f = Fencer::new(true, false);
        let a = f
            .promote_fenced(&Outcome::Failed("exit status 1".into()), true)
            .expect("forced");
        assert!(kinds(&a).is_empty());
        assert!(kinds(&f.handle(FenceEvent::PeerUnreachable)).is_empty());
    }

    #[test]
    fn a_restarted_node_that_had_fenced_its_peer_owes_the_unfence() {
        let mut f = Fencer::new(true, true);
        assert_eq!(f.promote_needs_fence(false), PromoteFence::NotNeeded);
        f.handle(FenceEvent::PeerConnected);
        assert_eq!(kinds(&f.handle(FenceEvent::InSync)), ["unfence"]);
    }
}
