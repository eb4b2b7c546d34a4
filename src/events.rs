//! State-change notifications for `replctl events`: every change of a
//! resource's role, disk, connection or sync decision is broadcast to the
//! subscribed control connections, one JSON value per change.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::sync::lock;

/// Events buffered per subscriber; one that falls this far behind is
/// dropped (its stream ends) rather than slowing the daemon down.
const BACKLOG: usize = 4096;

#[derive(Default)]
pub struct Events {
    subscribers: Mutex<Vec<SyncSender<Arc<Value>>>>,
}

impl Events {
    pub fn new() -> Arc<Events> {
        Arc::new(Events::default())
    }

    /// A new stream of every event emitted from now on.
    pub fn subscribe(&self) -> Receiver<Arc<Value>> {
        let (tx, rx) = mpsc::sync_channel(BACKLOG);
        lock(&self.subscribers).push(tx);
        rx
    }

    /// Sends `event` to every subscriber, dropping those that are gone or
    /// too far behind.
    pub fn emit(&self, event: Value) {
        let event = Arc::new(event);
        lock(&self.subscribers).retain(|tx| match tx.try_send(event.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                tracing::warn!("an events subscriber fell {BACKLOG} events behind; closing it");
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subscribers_get_events_emitted_after_they_subscribe() {
        let events = Events::new();
        events.emit(json!({"n": 0}));
        let rx = events.subscribe();
        events.emit(json!({"n": 1}));
        assert_eq!(rx.try_recv().ok().map(|v| v["n"].clone()), Some(json!(1)));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_gone_subscriber_is_forgotten() {
        let events = Events::new();
        drop(events.subscribe());
        events.emit(json!({}));
        assert!(lock(&events.subscribers).is_empty());
    }
}
