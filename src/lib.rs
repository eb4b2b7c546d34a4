//! replblk: a userspace, DRBD-like replicated block device served over NBD.
//!
//! Module map:
//! - `config`: the TOML configuration, parsed strictly, resolved per node.
//! - `store`: local storage behind the `Store` trait (file/block device,
//!   and an in-memory fake for tests).
//! - `bitmap`: the out-of-sync bitmap (pure).
//! - `meta`: crash-safe on-disk metadata (superblocks, bitmap area).
//! - `repl`: synchronous replication to the peer: the write path on the
//!   Primary (`Replica`, a `Store`), the peer link and its handshake, and
//!   the apply loop on the Secondary.
//! - `net`: one stream type over TCP and unix sockets.
//! - `nbd`: the NBD frontend: exports, handshake, transmission phase.
//! - `server`: NBD listeners, connection lifecycle, graceful shutdown.
//! - `control`: the control socket `replctl` talks to, and its messages
//!   and client side, shared with `replctl`.
//! - `daemon`: what `repld` runs: logging, signals, the demo pair.
//!
//! Wire formats live in the `replblk-proto` crate, which does no I/O.

pub mod attach;
pub mod bitmap;
pub mod checksum;
pub mod config;
pub mod control;
pub mod core;
pub mod daemon;
pub mod events;
pub mod faults;
pub mod meta;
pub mod metrics;
pub mod nbd;
pub mod net;
pub mod repl;
pub mod server;
pub mod store;
pub mod sync;
pub mod tls;
