//! Why an operator verb on a `Replica` (or an NBD client's admission) was
//! refused or failed. Each Display is the one line `replctl` prints and an
//! NBD client is shown; scripts and tests match on some of them, so the
//! wording is part of the interface (docs/control.md).

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::core::state::{DiskState, Refusal};
use crate::meta::MetaError;
use crate::store::OpenError;

#[derive(Debug, Error)]
pub enum VerbError {
    /// A verb about metadata or roles on a resource without a peer.
    #[error("resource {resource} is single-node: it has no metadata")]
    SingleNode { resource: String },
    /// `wait-sync` on a resource without a peer.
    #[error("single-node resource: nothing to sync with")]
    NothingToSync,
    #[error("resource {resource} is down: {reason}")]
    Down { resource: String, reason: String },
    #[error("{resource} is already up")]
    AlreadyUp { resource: String },
    #[error("{resource} is already down")]
    AlreadyDown { resource: String },
    #[error("create-md refused: {resource} is up; run `replctl down {resource}` first")]
    CreateMdWhileUp { resource: String },
    #[error("create-md refused: {0}")]
    CreateMd(MetaError),
    /// Reading or writing the metadata failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The backing store could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("size = {size} is larger than the {usable} usable bytes of {}", path.display())]
    SizeTooLarge {
        size: u64,
        usable: u64,
        path: PathBuf,
    },
    #[error("down refused: {resource} is Primary; demote it first")]
    DownWhilePrimary { resource: String },
    /// The role/disk/connection state machine said no (its own wording,
    /// e.g. `promote refused: local data is Inconsistent ...`).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Values a verb was given that make no sense (`resync-rate`).
    #[error("{message}")]
    BadRequest { message: String },
    #[error("promote refused: the peer is being promoted")]
    PeerPromoting,
    #[error("promote refused: the peer did not answer")]
    PeerSilent,
    #[error("promote refused: peer is Primary")]
    PeerPrimary,
    #[error("promote refused: the peer was being promoted at the same time")]
    PromoteRace,
    /// Replicated requests did not finish within the demote's wait; the
    /// node stays Primary.
    #[error("demote refused: {requests} request(s) still in flight after {waited:?}; the node stays Primary")]
    InFlight { requests: usize, waited: Duration },
    /// The bitmap could not be written before the role changed (the link
    /// did not settle); the node stays Primary.
    #[error("demote refused: the bitmap could not be written (the replication link did not settle); the node stays Primary")]
    BitmapUnwritten,
    #[error("resource is StandAlone{}", last_error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    StandAlone { last_error: Option<String> },
    /// An NBD client asked for a resource that is down here.
    #[error("resource {resource} is down on node {node}: {reason}")]
    NotServingDown {
        resource: String,
        node: String,
        reason: String,
    },
    /// An NBD client asked a Secondary; `primary` names the peer if it is
    /// the Primary.
    #[error(
        "resource {resource} is Secondary on node {node} (disk {disk:?}); {}",
        match primary {
            Some(p) => format!("connect to the Primary, {p}"),
            None => "no node is Primary; promote one with `replctl promote`".to_owned(),
        }
    )]
    NotServingSecondary {
        resource: String,
        node: String,
        disk: DiskState,
        primary: Option<String>,
    },
    /// An NBD client came while this node's promote is still under way
    /// (the role is Primary, the write path not yet switched over).
    #[error("resource {resource} is being promoted on node {node}; try again")]
    NotServingYet { resource: String, node: String },
}
