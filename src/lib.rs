//! replblk: a userspace, DRBD-like replicated block device served over NBD.
//!
//! Module map:
//! - `config`: the TOML configuration, parsed strictly and validated.
//! - `store`: local storage behind the `Store` trait (file/block device,
//!   and an in-memory fake for tests).
//! - `net`: one stream type over TCP and unix sockets.
//! - `nbd`: the NBD frontend: exports, handshake, transmission phase.
//! - `server`: listeners, connection lifecycle, graceful shutdown.
//! - `daemon`: what `repld` runs: logging, signals, the demo.
//!
//! Wire formats live in the `replblk-proto` crate, which does no I/O.

pub mod config;
pub mod daemon;
pub mod nbd;
pub mod net;
pub mod server;
pub mod store;
