//! Disk fault injection, for tests only.
//!
//! Off unless `repld` is started with `REPLD_FAULTS` naming a fault-spec
//! file: then every resource's local store is wrapped in a [`FaultStore`]
//! and its metadata writes are checked too, and a thread re-reads the file
//! whenever it changes, so a test arms and disarms faults at run time by
//! rewriting it. Nothing here is reachable from the network or the
//! control socket: only whoever may set `repld`'s environment and write
//! the file can inject a fault. Without the variable the data path pays
//! nothing (the store is not wrapped) and a metadata write pays one
//! atomic load.
//!
//! The file holds one rule per line (`#` starts a comment):
//!
//! ```text
//! RESOURCE data|meta read|write|flush OFFSET LENGTH|end EIO|ENOSPC|<errno>
//! ```
//!
//! An operation fails with the rule's errno when its target, kind and
//! resource match and its byte range overlaps `[OFFSET, OFFSET+LENGTH)`
//! (flushes have no range: a flush rule matches every flush). `data` is
//! the exported device (offsets as the client sees them); `meta` is the
//! metadata (offsets within the metadata area: the superblock slots, the
//! bitmap and the activity log all count as writes; their fdatasync as a
//! flush). Once a reload is done the daemon writes the text it loaded to
//! `<file>.loaded`, so a test knows its rules are armed.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use crate::store::Store;

/// The environment variable naming the fault-spec file.
pub const ENV: &str = "REPLD_FAULTS";

/// How often the spec file is looked at.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Data,
    Meta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub resource: String,
    pub target: Target,
    pub op: Op,
    pub offset: u64,
    /// `u64::MAX`: to the end.
    pub len: u64,
    pub errno: i32,
}

impl Rule {
    fn matches(&self, resource: &str, target: Target, op: Op, offset: u64, len: u64) -> bool {
        if self.resource != resource || self.target != target || self.op != op {
            return false;
        }
        if op == Op::Flush {
            return true;
        }
        let end = offset.saturating_add(len.max(1));
        let rule_end = self.offset.saturating_add(self.len);
        offset < rule_end && self.offset < end
    }
}

/// Parses a fault-spec text (see the module documentation).
pub fn parse(text: &str) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
        let f: Vec<&str> = line.split_whitespace().collect();
        let [resource, target, op, offset, len, errno] = f[..] else {
            return Err(bad("expected 6 fields"));
        };
        let target = match target {
            "data" => Target::Data,
            "meta" => Target::Meta,
            _ => return Err(bad("target must be data or meta")),
        };
        let op = match op {
            "read" => Op::Read,
            "write" => Op::Write,
            "flush" => Op::Flush,
            _ => return Err(bad("operation must be read, write or flush")),
        };
        let offset = offset.parse().map_err(|_| bad("bad offset"))?;
        let len = match len {
            "end" => u64::MAX,
            l => l.parse().map_err(|_| bad("bad length"))?,
        };
        let errno = match errno {
            "EIO" => libc::EIO,
            "ENOSPC" => libc::ENOSPC,
            e => match e.parse::<i32>() {
                Ok(v) if v > 0 => v,
                _ => return Err(bad("errno must be EIO, ENOSPC or a positive number")),
            },
        };
        rules.push(Rule {
            resource: resource.to_owned(),
            target,
            op,
            offset,
            len,
            errno,
        });
    }
    Ok(rules)
}

struct Registry {
    armed: AtomicBool,
    rules: RwLock<Arc<Vec<Rule>>>,
    hits: AtomicU64,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// Starts fault injection if `REPLD_FAULTS` is set (called once by
/// `repld` at startup, before any resource opens its disk).
pub fn init_from_env() {
    let Some(path) = std::env::var_os(ENV).map(PathBuf::from) else {
        return;
    };
    if REGISTRY
        .set(Registry {
            armed: AtomicBool::new(false),
            rules: RwLock::new(Arc::new(Vec::new())),
            hits: AtomicU64::new(0),
        })
        .is_err()
    {
        return;
    }
    tracing::warn!(
        path = %path.display(),
        "disk fault injection is enabled ({ENV}): for testing only"
    );
    reload(&path);
    let spawned = std::thread::Builder::new()
        .name("fault-spec".into())
        .spawn(move || {
            let mut last = std::fs::read_to_string(&path).ok();
            loop {
                std::thread::sleep(POLL);
                let now = std::fs::read_to_string(&path).ok();
                if now != last {
                    reload(&path);
                    last = now;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("fault injection: cannot start the spec reader: {e}");
    }
}

fn reload(path: &Path) {
    let Some(reg) = REGISTRY.get() else {
        return;
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let rules = match parse(&text) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(path = %path.display(), "fault spec ignored: {e}");
            return;
        }
    };
    tracing::warn!(rules = rules.len(), "fault injection: spec loaded");
    reg.armed.store(!rules.is_empty(), Ordering::SeqCst);
    *reg.rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
    let mut loaded = path.as_os_str().to_owned();
    loaded.push(".loaded");
    if let Err(e) = std::fs::write(&loaded, text) {
        tracing::error!(
            "fault injection: cannot write {}: {e}",
            loaded.to_string_lossy()
        );
    }
}

/// Whether fault injection is enabled in this process.
pub fn enabled() -> bool {
    REGISTRY.get().is_some()
}

/// Faults injected since startup.
pub fn hits() -> u64 {
    REGISTRY.get().map_or(0, |r| r.hits.load(Ordering::Relaxed))
}

/// The injected error for an operation, if an armed rule matches.
pub fn check(resource: &str, target: Target, op: Op, offset: u64, len: u64) -> io::Result<()> {
    let Some(reg) = REGISTRY.get() else {
        return Ok(());
    };
    if !reg.armed.load(Ordering::Relaxed) {
        return Ok(());
    }
    let rules = reg.rules.read().unwrap_or_else(|p| p.into_inner()).clone();
    match rules
        .iter()
        .find(|r| r.matches(resource, target, op, offset, len))
    {
        Some(r) => {
            reg.hits.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                resource,
                ?target,
                ?op,
                offset,
                len,
                errno = r.errno,
                "injected fault"
            );
            Err(io::Error::from_raw_os_error(r.errno))
        }
        None => Ok(()),
    }
}

/// A local store whose operations fail as the armed rules say.
pub struct FaultStore {
    inner: Arc<dyn Store>,
    resource: String,
}

/// `store` wrapped in a [`FaultStore`] when fault injection is enabled.
pub fn wrap(resource: &str, store: Arc<dyn Store>) -> Arc<dyn Store> {
    if enabled() {
        Arc::new(FaultStore {
            inner: store,
            resource: resource.to_owned(),
        })
    } else {
        store
    }
}

impl FaultStore {
    fn check(&self, op: Op, offset: u64, len: u64) -> io::Result<()> {
        check(&self.resource, Target::Data, op, offset, len)
    }
}

impl Store for FaultStore {
    fn as_dyn(&self) -> &dyn Store {
        self
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(Op::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        self.check(Op::Write, offset, buf.len() as u64)?;
        if durable {
            self.check(Op::Flush, offset, buf.len() as u64)?;
        }
        self.inner.write_at(buf, offset, durable)
    }
    fn flush(&self) -> io::Result<()> {
        self.check(Op::Flush, 0, 0)?;
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(Op::Write, offset, len)?;
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.check(Op::Write, offset, len)?;
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.cache(offset, len)
    }
    fn reads_as_zeroes(&self, offset: u64, len: u64) -> bool {
        self.inner.reads_as_zeroes(offset, len)
    }
    fn writes_direct(&self) -> bool {
        self.inner.writes_direct()
    }
    fn start_writeback(&self, offset: u64, len: u64) {
        self.inner.start_writeback(offset, len);
    }
    fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(Op::Write, offset, buf.len() as u64)?;
        self.inner.write_direct(buf, offset)
    }
    fn read_bulk(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(Op::Read, offset, buf.len() as u64)?;
        self.inner.read_bulk(buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_lines_parse_and_bad_ones_name_the_line() {
        let rules = parse(
            "# comment\n\nr0 data write 4096 8192 EIO\nr0 meta flush 0 end ENOSPC # trailing\nr1 data read 0 end 5\n",
        )
        .expect("valid");
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].op, Op::Write);
        assert_eq!(rules[1].len, u64::MAX);
        assert_eq!(rules[1].errno, libc::ENOSPC);
        assert_eq!(rules[2].errno, 5);
        for bad in [
            "r0 data write 0 1",
            "r0 disk write 0 1 EIO",
            "r0 data erase 0 1 EIO",
            "r0 data write x 1 EIO",
            "r0 data write 0 1 EWHAT",
        ] {
            let err = parse(&format!("\n{bad}\n")).unwrap_err();
            assert!(err.starts_with("line 2"), "{err}");
        }
    }

    #[test]
    fn rules_match_overlapping_ranges_of_their_own_kind_only() {
        let r = &parse("r0 data write 4096 4096 EIO").expect("valid")[0];
        assert!(r.matches("r0", Target::Data, Op::Write, 4096, 1));
        assert!(r.matches("r0", Target::Data, Op::Write, 0, 4097));
        assert!(r.matches("r0", Target::Data, Op::Write, 8191, 100));
        assert!(!r.matches("r0", Target::Data, Op::Write, 0, 4096));
        assert!(!r.matches("r0", Target::Data, Op::Write, 8192, 4096));
        assert!(!r.matches("r0", Target::Data, Op::Read, 4096, 4096));
        assert!(!r.matches("r0", Target::Meta, Op::Write, 4096, 4096));
        assert!(!r.matches("r1", Target::Data, Op::Write, 4096, 4096));
        let f = &parse("r0 data flush 0 1 EIO").expect("valid")[0];
        assert!(f.matches("r0", Target::Data, Op::Flush, 0, 0));
        let end = &parse("r0 data read 0 end EIO").expect("valid")[0];
        assert!(end.matches("r0", Target::Data, Op::Read, u64::MAX - 10, 5));
    }

    #[test]
    fn without_the_environment_nothing_is_injected_or_wrapped() {
        // The unit-test process never sets REPLD_FAULTS.
        assert!(!enabled());
        assert!(check("r0", Target::Data, Op::Write, 0, 1).is_ok());
    }
}
