//! The NBD frontend: the exports clients can open, the fixed-newstyle
//! handshake (`handshake`) and the transmission phase (`transmission`).
//!
//! Everything here is blocking code run on a connection's own threads; see
//! `docs/architecture.md` for why the data path does not use an async
//! runtime.

pub mod client;
pub mod handshake;
pub mod netlink;
pub mod transmission;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use replblk_proto::nbd::tflags;

use crate::config::Access;
use crate::store::Store;

/// Largest READ or WRITE payload accepted (the spec's portable maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Block sizes advertised through `NBD_INFO_BLOCK_SIZE`.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;

/// One volume clients can open by name.
pub struct Export {
    pub name: String,
    pub description: String,
    pub read_only: bool,
    pub store: Arc<dyn Store>,
    /// Request counters and latencies, when metrics are on.
    pub metrics: Option<&'static crate::metrics::IoMetrics>,
    /// Who may open it; replaced when the configuration is reloaded.
    pub access: RwLock<Access>,
}

impl Export {
    /// The current access rules.
    pub fn access(&self) -> Access {
        self.access
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_access(&self, access: Access) {
        *self.access.write().unwrap_or_else(|p| p.into_inner()) = access;
    }

    pub fn size(&self) -> u64 {
        self.store.size()
    }

    /// Transmission flags advertised for this export.
    pub fn transmission_flags(&self) -> u16 {
        let mut flags = tflags::HAS_FLAGS
            | tflags::SEND_FLUSH
            | tflags::SEND_FUA
            | tflags::CAN_MULTI_CONN
            | tflags::SEND_CACHE;
        if self.read_only {
            flags |= tflags::READ_ONLY;
        } else {
            flags |= tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES;
        }
        flags
    }
}

/// The exports of one daemon, by name, plus the one served for "".
#[derive(Default, Clone)]
pub struct Exports {
    by_name: BTreeMap<String, Arc<Export>>,
    default: Option<String>,
}

impl Exports {
    pub fn new(exports: Vec<Arc<Export>>, default: Option<String>) -> Exports {
        Exports {
            by_name: exports.into_iter().map(|e| (e.name.clone(), e)).collect(),
            default,
        }
    }

    /// Looks an export up by the name a client sent ("" is the default).
    pub fn find(&self, name: &str) -> Option<&Arc<Export>> {
        let name = if name.is_empty() {
            self.default.as_deref()?
        } else {
            name
        };
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.by_name.values()
    }
}
