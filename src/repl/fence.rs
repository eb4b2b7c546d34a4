//! The shell around `core::fence`: holds writes while the fencer says
//! frozen, runs the fence-peer and unfence handlers as child processes
//! (bounded in time, killed by process group), and the `outdate` and
//! `resume-io` verbs.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use super::*;
use crate::core::fence::{FenceAction, FenceEvent, Fencer, Outcome, PromoteFence};

/// A write held by a freeze: called with `true` to fail it, `false` to
/// complete it.
pub(super) type Held = Box<dyn FnOnce(bool) + Send>;

/// Writes held while frozen, and the flag the data path reads.
#[derive(Default)]
pub(super) struct Freeze {
    pub(super) held: Mutex<Vec<Held>>,
    pub(super) thawed: Condvar,
}

impl Replica {
    /// Fencing is configured (`fencing = "resource-only"`).
    pub(super) fn fencing_on(&self) -> bool {
        self.peer
            .as_ref()
            .is_some_and(|p| p.fencing.policy == FencingPolicy::ResourceOnly)
    }

    /// Feeds `event` to the fencer and carries out what it asks.
    pub(super) fn fence(&self, event: FenceEvent) {
        if !self.fencing_on() {
            return;
        }
        let actions = lock(&self.fencer).handle(event);
        self.fence_actions(actions);
    }

    fn fence_actions(&self, actions: Vec<FenceAction>) {
        for action in actions {
            match action {
                FenceAction::Freeze => self.frozen.store(true, Ordering::SeqCst),
                FenceAction::Thaw { fail } => self.thaw(fail),
                FenceAction::RunFenceHandler => self.spawn_fence_handler(),
                FenceAction::ScheduleRetry => self.spawn_retry(),
                FenceAction::MarkPeerFenced => {
                    if let Err(e) = self.step(Event::PeerFenced) {
                        tracing::warn!(resource = %self.name, "recording the fenced peer: {e}");
                    }
                }
                FenceAction::RunUnfenceHandler => self.spawn_unfence_handler(),
                FenceAction::Log { level, message } => match level {
                    Level::Info => tracing::info!(resource = %self.name, "{message}"),
                    Level::Warn => tracing::warn!(resource = %self.name, "{message}"),
                    Level::Error => tracing::error!(resource = %self.name, "{message}"),
                },
            }
        }
        self.emit_if_changed();
    }

    fn thaw(&self, fail: bool) {
        let held = {
            let mut held = lock(&self.freeze.held);
            self.frozen.store(false, Ordering::SeqCst);
            self.freeze.thawed.notify_all();
            std::mem::take(&mut *held)
        };
        if !held.is_empty() {
            tracing::info!(resource = %self.name, writes = held.len(), fail, "releasing held writes");
        }
        for h in held {
            h(fail);
        }
    }

    /// A new write waits here while writes are frozen.
    pub(super) fn wait_thawed(&self) {
        let mut held = lock(&self.freeze.held);
        while self.frozen.load(Ordering::SeqCst) && !self.stopping.load(Ordering::SeqCst) {
            held = self
                .freeze
                .thawed
                .wait_timeout(held, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// A write (or barrier) could not reach the peer: with fencing on,
    /// its completion waits until the peer is fenced (or comes back).
    /// `complete` runs now if no freeze is needed.
    pub(super) fn hold(&self, complete: Held) {
        if !self.fencing_on() {
            return complete(false);
        }
        if self.stopping.load(Ordering::SeqCst) {
            // Shutting down (the session is failed under locks this must
            // not take): the peer never got the write and is not fenced.
            return complete(true);
        }
        self.fence(FenceEvent::PeerUnreachable);
        let mut held = lock(&self.freeze.held);
        if self.frozen.load(Ordering::SeqCst) {
            held.push(complete);
        } else {
            drop(held);
            complete(false);
        }
    }

    /// `hold` for a caller that waits: `Err(EIO)` if the held write is
    /// failed (the daemon shut down while frozen).
    pub(super) fn hold_here(&self) -> io::Result<()> {
        if !self.fencing_on() {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel();
        self.hold(Box::new(move |fail| {
            let _ = tx.send(fail);
        }));
        match rx.recv() {
            Ok(false) => Ok(()),
            Ok(true) | Err(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    /// Before promoting without a connected peer: fences it if fencing
    /// is on and it is not known fenced. `Err`: the promote is refused.
    pub(super) fn fence_before_promote(&self, force: bool) -> Result<(), VerbError> {
        if !self.fencing_on()
            || lock(&self.fencer).promote_needs_fence(false) == PromoteFence::NotNeeded
        {
            return Ok(());
        }
        tracing::warn!(resource = %self.name, "promoting without the peer: running the fence-peer handler first");
        let outcome = self.run_handler("fence-peer", self.fence_peer_command().as_deref());
        let actions = lock(&self.fencer)
            .promote_fenced(&outcome, force)
            .map_err(|message| crate::core::state::Refusal { message })?;
        self.fence_actions(actions);
        Ok(())
    }

    fn fence_peer_command(&self) -> Option<String> {
        self.peer
            .as_ref()
            .and_then(|p| p.fencing.fence_peer_handler.clone())
    }

    fn spawn_fence_handler(&self) {
        let Some(me) = self.me.upgrade() else { return };
        let spawned = std::thread::Builder::new()
            .name(format!("fence-{}", self.name))
            .spawn(move || {
                let outcome = me.run_handler("fence-peer", me.fence_peer_command().as_deref());
                me.fence(FenceEvent::HandlerExited(outcome));
            });
        if let Err(e) = spawned {
            tracing::error!(resource = %self.name, "cannot start the fence-peer handler thread: {e}");
            self.fence(FenceEvent::HandlerExited(Outcome::Failed(e.to_string())));
        }
    }

    fn spawn_retry(&self) {
        let me = self.me.clone();
        let wait = Duration::from_millis(self.peer.as_ref().map_or(5000, |p| p.fencing.retry_ms));
        let _ = std::thread::Builder::new()
            .name(format!("fence-retry-{}", self.name))
            .spawn(move || {
                let deadline = Instant::now() + wait;
                while Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                    match me.upgrade() {
                        Some(r) if !r.stopping.load(Ordering::SeqCst) => {}
                        _ => return,
                    }
                }
                if let Some(r) = me.upgrade() {
                    r.fence(FenceEvent::RetryDue);
                }
            });
    }

    fn spawn_unfence_handler(&self) {
        let Some(me) = self.me.upgrade() else { return };
        let Some(cmd) = self
            .peer
            .as_ref()
            .and_then(|p| p.fencing.unfence_peer_handler.clone())
        else {
            return;
        };
        let _ = std::thread::Builder::new()
            .name(format!("unfence-{}", self.name))
            .spawn(move || {
                let outcome = me.run_handler("unfence-peer", Some(&cmd));
                tracing::info!(resource = %me.name, "unfence-peer handler finished: {outcome:?}");
            });
    }

    /// Runs a handler with `sh -c` in its own process group, with the
    /// resource's names in its environment, killed (the whole group) if
    /// it outlives `fence_timeout_ms`. Its output goes to the daemon's.
    fn run_handler(&self, what: &str, cmd: Option<&str>) -> Outcome {
        let (Some(cmd), Some(p)) = (cmd, self.peer.as_ref()) else {
            return Outcome::Failed(format!("no {what} handler configured"));
        };
        let started = Instant::now();
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(cmd)
            .env("REPLBLK_RESOURCE", &self.name)
            .env("REPLBLK_NODE", &self.local_node)
            .env("REPLBLK_PEER", &p.peer_node)
            .env("REPLBLK_PEER_ADDRESS", p.peer_address.to_string())
            .env("REPLBLK_LOCAL_ADDRESS", p.local_address.to_string())
            .stdin(Stdio::null())
            .process_group(0)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => return Outcome::Failed(format!("cannot run {cmd:?}: {e}")),
        };
        tracing::info!(resource = %self.name, pid = child.id(), "{what} handler started: {cmd}");
        let timeout = Duration::from_millis(p.fencing.timeout_ms);
        let outcome = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Outcome::from_exit(status.code()),
                Ok(None) if started.elapsed() >= timeout => {
                    // SAFETY: kill(2) on the process group of our own child
                    // (it was made a group leader by process_group(0)).
                    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                    let _ = child.wait();
                    break Outcome::Failed(format!("timed out after {timeout:?}"));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => break Outcome::Failed(e.to_string()),
            }
        };
        tracing::info!(
            resource = %self.name,
            "{what} handler finished in {:?}: {}",
            started.elapsed(),
            outcome.describe()
        );
        outcome
    }

    /// A fencer for a node just attached: it remembers a peer fenced
    /// before the restart.
    pub(super) fn reset_fencer(&self, peer_fenced: bool) {
        *lock(&self.fencer) = Fencer::new(self.fencing_on(), peer_fenced);
    }

    /// Called when `status` changed: a pair back in sync lifts the fence.
    pub(super) fn fence_check_in_sync(&self, status: &ResourceStatus) {
        if status.connection == ConnState::Connected
            && status.replication == ReplState::Established
            && status.disk == DiskState::UpToDate
            && status.peer_disk == Some(DiskState::UpToDate)
        {
            self.fence(FenceEvent::InSync);
        }
    }

    /// `outdate`: marks this node's data Outdated.
    pub fn outdate(&self) -> Result<String, VerbError> {
        self.location()?;
        let _t = lock(&self.transition);
        let fx = self.verb_step(Event::Outdate)?;
        self.effects(&fx);
        Ok(format!("{} is {}", self.name, self.status().disk))
    }

    /// `resume-io`: releases writes frozen by fencing.
    pub fn resume_io(&self) -> Result<String, VerbError> {
        self.location()?;
        if !self.frozen.load(Ordering::SeqCst) {
            return Ok(format!("{}: writes are not frozen", self.name));
        }
        self.fence(FenceEvent::Resume);
        Ok(format!("{}: writes resumed", self.name))
    }
}
