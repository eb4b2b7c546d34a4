//! The sync source's resync loop.

use super::*;

impl Replica {
    /// Sends every out-of-sync block to the peer (this node is the sync
    /// source), clearing each range once the peer acknowledged it, then
    /// tells the peer it is in sync and, once it confirmed, records the
    /// end of the sync. Application writes keep flowing meanwhile: the
    /// interval lock orders each resync chunk against them.
    ///
    /// This is the plain version: no rate control, no progress report
    /// (the resync issue adds those).
    pub(super) fn resync(&self, session: &Arc<Session>) {
        const CHUNK: u64 = 256 * 1024;
        let started = Instant::now();
        let total = lock(&self.oos).count();
        tracing::info!(resource = %self.name, peer = %session.peer, blocks = total, "resync started");
        loop {
            if !session.is_alive() || self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let next = lock(&self.oos).runs().next();
            let Some((offset, len)) = next else {
                break;
            };
            let len = len.min(CHUNK);
            let _range = self.intervals.lock(offset, len);
            let mut buf = vec![0u8; len as usize];
            let read = self
                .current_store()
                .and_then(|store| store.read_at(&mut buf, offset));
            if let Err(e) = read {
                tracing::error!(resource = %self.name, offset, "resync: reading the local disk failed: {e}");
                session.fail(&format!("resync read failed: {e}"));
                return;
            }
            let Some(slot) = session.send_write(offset, 0, &buf) else {
                return;
            };
            if session.wait(&slot, self.ack_timeout()) != Remote::Done {
                return;
            }
            lock(&self.oos).clear_range(offset, len);
            self.resync_sent.fetch_add(len, Ordering::Relaxed);
        }
        // Durable on the target before it may call itself UpToDate.
        let Some(barrier) = session.send_frame(Track::Barrier, |seq| Frame::Barrier { seq }) else {
            return;
        };
        if session.wait(&barrier, self.ack_timeout()) != Remote::Done {
            return;
        }
        let current = lock(&self.inner)
            .node
            .as_ref()
            .map_or(0, |n| n.gens().current);
        session.send_control(&Frame::SyncDone { current });
        // The target records the end first; its answer confirms it.
        if !self.confirm_state(session, 0) {
            return;
        }
        match self.step(Event::SyncFinished) {
            Ok(fx) => self.effects(&fx),
            Err(e) => {
                tracing::warn!(resource = %self.name, "resync finished, but: {e}");
                return;
            }
        }
        tracing::info!(
            resource = %self.name, peer = %session.peer, blocks = total,
            elapsed_ms = started.elapsed().as_millis() as u64, "resync finished"
        );
    }
}
