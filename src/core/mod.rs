//! The pure core: roles, disk and connection states, generation
//! identifiers and the decision taken when two nodes meet. No I/O here;
//! the shells (`repl`, `meta`, `control`) feed it events and carry out
//! the actions it returns.

use serde::{Deserialize, Serialize};

pub mod actlog;
pub mod datapath;
pub mod fence;
pub(crate) mod le;
pub mod split_brain;
pub mod stable;
pub mod state;
pub mod uuid;

#[cfg(test)]
mod sim;

pub use state::{
    Action, ConnState, DiskState, Event, Level, Node, PeerInfo, Refusal, ReplState, Role,
};
pub use uuid::{compare, Decision, Rule, UuidView, Verdict};

/// How many older current UUIDs are remembered.
pub const HISTORY: usize = 2;

/// The current UUID of metadata that was just created and never used:
/// two such nodes hold no data anybody wrote, so they need no sync.
pub const UUID_JUST_CREATED: u64 = 4;

/// A node's generation identifiers, as DRBD keeps them. `current`
/// names the data generation this node holds; `bitmap` is the current
/// UUID the peer had when this node started recording out-of-sync
/// blocks for it (0 when the bitmap is empty/unused); `history` holds
/// earlier current UUIDs, newest first. 0 means "none".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generations {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; HISTORY],
}

/// Persistent flag bits kept in the superblock and sent to the peer.
pub mod flags {
    /// The data is not in the middle of a sync (it is a valid image of
    /// some point in time).
    pub const CONSISTENT: u32 = 1 << 0;
    /// The data was the newest generation when last known (UpToDate).
    pub const UP_TO_DATE: u32 = 1 << 1;
    /// The node is Primary (set on promote, cleared on demote).
    pub const PRIMARY: u32 = 1 << 2;
    /// The node was Primary when it went down uncleanly.
    pub const CRASHED_PRIMARY: u32 = 1 << 3;
    /// The daemon shut down cleanly (cleared while the resource is up).
    pub const CLEAN_SHUTDOWN: u32 = 1 << 4;
    /// The peer is known to be Outdated (it cannot be promoted without
    /// force), so this node may consider itself UpToDate alone.
    pub const PEER_OUTDATED: u32 = 1 << 5;
    /// The bitmap cannot be trusted; the next sync must be a full one.
    pub const FULL_SYNC: u32 = 1 << 6;
    /// The data is Outdated: a newer generation exists on the peer.
    pub const OUTDATED: u32 = 1 << 7;
    /// The node was Primary when its bitmap UUID was set (it lost the
    /// peer while Primary); clear for a node promoted while apart. The
    /// split-brain policy `discard-younger-primary` compares it.
    pub const BITMAP_PRIMARY: u32 = 1 << 8;
    /// The bitmap is kept on disk and writes go through the activity
    /// log: after a crash, the persisted bitmap plus the extents in the
    /// log are all that can differ (set while the log is in use).
    pub const ACTIVITY_LOG: u32 = 1 << 9;
    /// Every bit defined above.
    pub const KNOWN: u32 = (1 << 10) - 1;
}
