//! The Secondary's side of a session: frames applied in wire order,
//! plain writes acknowledged in batches, durable ones after a flush.

use super::*;

impl Replica {
    pub(super) fn receive_as_secondary<'s>(
        &'s self,
        session: &'s Arc<Session>,
        scope: &'s std::thread::Scope<'s, '_>,
    ) -> Result<ModeEnd, LinkError> {
        let store = self
            .current_store()
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        // Durability requests (FUA writes, barriers) that arrive while
        // more frames are already buffered go to a flusher thread that
        // fdatasyncs once per batch and then acknowledges the batch, so the
        // receiver keeps applying later writes meanwhile. One that arrives
        // with nothing behind it is flushed here: no hand-off, and nothing
        // waits to be applied (see `durable_here`).
        let (to_flusher, flush_queue) = mpsc::sync_channel::<u64>(FLUSH_QUEUE);
        let flusher_session = session.clone();
        let flusher_store = store.clone();
        scope.spawn(move || {
            while let Ok(first) = flush_queue.recv() {
                let mut batch = vec![first];
                batch.extend(flush_queue.try_iter());
                let status = match flusher_store.flush() {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::error!("flush on the secondary failed: {e}");
                        crate::nbd::transmission::io_errno(e)
                    }
                };
                for seq in batch {
                    flusher_session.send_control(&Frame::Ack { seq, status });
                }
            }
        });
        let mut reader = session.reader();
        // Frames a submitter read while this node was still Primary.
        for (kind, body) in session.take_stash() {
            match self.apply(session, &*store, kind, &body)? {
                Applied::Nothing => {}
                Applied::Done { seq, .. } => {
                    // Durable or not: flush before acknowledging, rarely.
                    let status = match store.flush() {
                        Ok(()) => 0,
                        Err(e) => crate::nbd::transmission::io_errno(e),
                    };
                    session.send_control(&Frame::Ack { seq, status });
                }
                Applied::Failed { seq, status } => {
                    session.send_control(&Frame::Ack { seq, status })
                }
            }
        }
        let mut body = Vec::new();
        // Acks are batched: written when no further frame is already
        // buffered, i.e. just before the receiver could block on the socket.
        let mut acks = BytesMut::with_capacity(4096);
        let result = loop {
            if reader.buffer().is_empty() && !acks.is_empty() {
                session.send_raw(&acks);
                acks.clear();
            }
            if self.role() != Role::Secondary {
                break Ok(ModeEnd::RoleChanged);
            }
            let kind = match link::read_raw(&mut *reader, &mut body) {
                Ok(k) => k,
                Err(e) => break Err(e),
            };
            if !session.is_alive() {
                break Ok(ModeEnd::Over(
                    session.reason().unwrap_or_else(|| "shutting down".into()),
                ));
            }
            match self.apply(session, &*store, kind, &body) {
                Ok(Applied::Nothing) => {}
                Ok(Applied::Done { seq, durable: true }) if reader.buffer().is_empty() => {
                    // Acks of earlier writes need not wait for the flush.
                    if !acks.is_empty() {
                        session.send_raw(&acks);
                        acks.clear();
                    }
                    let status = match store.flush() {
                        Ok(()) => 0,
                        Err(e) => {
                            tracing::error!(resource = %self.name, "flush on the secondary failed: {e}");
                            crate::nbd::transmission::io_errno(e)
                        }
                    };
                    Frame::Ack { seq, status }.encode(&mut acks);
                }
                Ok(Applied::Done { seq, durable: true }) => {
                    if to_flusher.send(seq).is_err() {
                        break Err(LinkError::Protocol("flusher stopped".into()));
                    }
                }
                Ok(Applied::Done {
                    seq,
                    durable: false,
                }) => Frame::Ack { seq, status: 0 }.encode(&mut acks),
                Ok(Applied::Failed { seq, status }) => Frame::Ack { seq, status }.encode(&mut acks),
                Err(e) => break Err(e),
            }
        };
        if !acks.is_empty() {
            session.send_raw(&acks);
        }
        drop(to_flusher);
        result
    }

    fn check_seq(session: &Session, seq: u64) -> Result<(), LinkError> {
        let expected = session.expected_seq.load(Ordering::Relaxed);
        if seq != expected {
            return Err(LinkError::Protocol(format!(
                "sequence number {seq} where {expected} was due"
            )));
        }
        session.expected_seq.store(expected + 1, Ordering::Relaxed);
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), LinkError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(LinkError::Protocol(format!(
                "range {offset}+{len} is outside the {}-byte device",
                self.size()
            ))),
        }
    }

    /// Applies one frame received by the Secondary.
    fn apply(
        &self,
        session: &Session,
        store: &dyn Store,
        kind: u16,
        body: &[u8],
    ) -> Result<Applied, LinkError> {
        let protocol = |e: replblk_proto::DecodeError| LinkError::Protocol(e.to_string());
        let (seq, durable, result) = if kind == repl_kind::WRITE {
            // The hot path: decoded in place, no copy of the payload.
            let w = WriteRef::decode_body(body).map_err(protocol)?;
            Self::check_seq(session, w.seq)?;
            self.check_range(w.offset, w.payload.len() as u64)?;
            if !w.crc_ok() {
                // Nothing from this frame is written; the primary marks the
                // range out of sync when the link drops.
                return Err(LinkError::Protocol(format!(
                    "crc32c mismatch in write seq {} at offset {} ({} bytes)",
                    w.seq,
                    w.offset,
                    w.payload.len()
                )));
            }
            let r = store.write_at(w.payload, w.offset, false);
            (w.seq, w.flags & data_flags::FUA != 0, r)
        } else {
            match Frame::decode_body(kind, body).map_err(protocol)? {
                Frame::Trim {
                    seq,
                    offset,
                    length,
                    flags,
                } => {
                    Self::check_seq(session, seq)?;
                    self.check_range(offset, length)?;
                    let r = store.trim(offset, length);
                    (seq, flags & data_flags::FUA != 0, r)
                }
                Frame::WriteZeroes {
                    seq,
                    offset,
                    length,
                    flags,
                } => {
                    Self::check_seq(session, seq)?;
                    self.check_range(offset, length)?;
                    let r = store.write_zeroes(offset, length, flags & data_flags::NO_HOLE == 0);
                    (seq, flags & data_flags::FUA != 0, r)
                }
                Frame::Barrier { seq } => {
                    Self::check_seq(session, seq)?;
                    (seq, true, Ok(()))
                }
                // Acks reach a Secondary that is a sync source.
                Frame::Ack { seq, status } => {
                    session.acknowledge(seq, status, &mut Batch::default())?;
                    return Ok(Applied::Nothing);
                }
                other => {
                    session.handle_control(other, "Primary")?;
                    return Ok(Applied::Nothing);
                }
            }
        };
        match result {
            Ok(()) => Ok(Applied::Done { seq, durable }),
            Err(e) => {
                tracing::error!(resource = %self.name, seq, "applying a replicated write failed: {e}");
                Ok(Applied::Failed {
                    seq,
                    status: crate::nbd::transmission::io_errno(e),
                })
            }
        }
    }
}

/// What the Secondary did with one frame.
enum Applied {
    /// Not a data frame (ping, pong).
    Nothing,
    /// Applied; `durable` requests are acknowledged after a flush.
    Done { seq: u64, durable: bool },
    /// The local storage failed; acknowledged with this errno.
    Failed { seq: u64, status: u32 },
}
