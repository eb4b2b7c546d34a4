//! The daemon's configuration: one TOML file, parsed with serde, every key
//! documented in `docs/config.md` and `examples/replblk.toml`.
//!
//! Parsing is strict (unknown keys are errors, so a typo never silently
//! falls back to a default) and validation happens here, before anything is
//! opened or bound, so a bad file gives one clear message and no side effects.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::repl::rate::RateSettings;

/// Granularity every export size must be a multiple of.
pub const SIZE_ALIGN: u64 = 4096;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

fn default_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 10809)))
}
fn default_handshake_timeout_ms() -> u64 {
    10_000
}
fn default_send_timeout_ms() -> u64 {
    30_000
}
fn default_workers() -> usize {
    8
}
fn default_max_connections() -> usize {
    256
}
fn default_shutdown_timeout_ms() -> u64 {
    30_000
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub nbd: NbdConfig,
    /// Per-node settings, by node name (`[nodes.alpha]`).
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeConfig>,
    #[serde(default)]
    pub replication: ReplicationConfig,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Resync rate control and checksums, for every resource that does
    /// not override them in its own `[resource.resync]`.
    #[serde(default)]
    pub resync: ResyncOptions,
    #[serde(default, rename = "resource")]
    pub resources: Vec<ResourceConfig>,
}

/// `[nodes.NAME]`: what differs between the nodes sharing this file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Overrides `[nbd] listen` on this node.
    #[serde(default, deserialize_with = "de_opt_addr_opt")]
    pub nbd_listen: Option<Option<SocketAddr>>,
    /// Overrides `[nbd] unix_socket` on this node.
    #[serde(default)]
    pub unix_socket: Option<PathBuf>,
    /// Overrides `[control] socket` on this node.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Overrides `[metrics] listen` on this node (`""` turns it off).
    #[serde(default, deserialize_with = "de_opt_addr_opt")]
    pub metrics_listen: Option<Option<SocketAddr>>,
}

/// `[metrics]`: the optional Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `GET /metrics` on this address; off when absent or `""`.
    #[serde(default, deserialize_with = "de_opt_addr")]
    pub listen: Option<SocketAddr>,
}

/// `fencing`: what a Primary does when it loses its peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FencingPolicy {
    /// Writes go on locally, marked out of sync (the default).
    #[default]
    DontCare,
    /// New writes wait, and the fence-peer handler runs, until the peer
    /// is known to be fenced or outdated (DRBD's `resource-only`).
    ResourceOnly,
}

/// `on_io_error`: what a node does when its local disk (or metadata)
/// fails a read, write or flush.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoErrorPolicy {
    /// The disk is detached (Diskless) and the node goes on with the
    /// peer's copy: the failed request is retried on the peer (the
    /// default; DRBD's `on-io-error detach`).
    #[default]
    Detach,
    /// The error goes to the NBD client (or, on a Secondary, back to the
    /// Primary, which marks the range out of sync); the disk stays.
    PassOn,
}

fn default_fence_timeout_ms() -> u64 {
    60_000
}
fn default_fence_retry_ms() -> u64 {
    5_000
}

/// A replicated resource's fencing settings, resolved for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FencingConfig {
    pub policy: FencingPolicy,
    /// Shell command run (`sh -c`) to fence the peer.
    pub fence_peer_handler: Option<String>,
    /// Shell command run once the pair is back in sync after a fence.
    pub unfence_peer_handler: Option<String>,
    pub timeout_ms: u64,
    pub retry_ms: u64,
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/replblk/repld.sock")
}

/// `[control]`: the socket `replctl` talks to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    #[serde(default = "default_control_socket")]
    pub socket: PathBuf,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: default_control_socket(),
        }
    }
}

fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_ping_interval_ms() -> u64 {
    1_000
}
fn default_ping_timeout_ms() -> u64 {
    5_000
}
fn default_reconnect_max_ms() -> u64 {
    5_000
}
fn default_ack_timeout_ms() -> u64 {
    30_000
}
fn default_transfer_log_max() -> usize {
    1 << 20
}
fn default_transfer_log_max_age_ms() -> u64 {
    30_000
}

/// The most writes `transfer_log_max` may keep (24 bytes each).
pub const TRANSFER_LOG_LIMIT: usize = 1 << 24;

/// `[replication]`: peer link timing, shared by every resource.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// TCP connect plus handshake must finish within this time.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// A Ping is sent this often.
    #[serde(default = "default_ping_interval_ms")]
    pub ping_interval_ms: u64,
    /// No frame from the peer for this long: the peer is lost.
    #[serde(default = "default_ping_timeout_ms")]
    pub ping_timeout_ms: u64,
    /// Reconnect backoff doubles from 100 ms up to this.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// A replicated write not acknowledged within this time drops the
    /// connection (the peer is alive but not writing).
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// Writes the peer acknowledged but no barrier made durable yet, kept
    /// by the Primary (24 bytes each) before it sends a barrier of its own.
    #[serde(default = "default_transfer_log_max")]
    pub transfer_log_max: usize,
    /// The Primary also sends a barrier once its transfer log has held
    /// writes this long.
    #[serde(default = "default_transfer_log_max_age_ms")]
    pub transfer_log_max_age_ms: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            connect_timeout_ms: default_connect_timeout_ms(),
            ping_interval_ms: default_ping_interval_ms(),
            ping_timeout_ms: default_ping_timeout_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
            ack_timeout_ms: default_ack_timeout_ms(),
            transfer_log_max: default_transfer_log_max(),
            transfer_log_max_age_ms: default_transfer_log_max_age_ms(),
        }
    }
}

/// `[resource.on.NAME]`: one node's side of a resource.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceOnNode {
    /// Backing file or block device on that node.
    pub disk: PathBuf,
    /// Replication address of that node for this resource.
    pub address: SocketAddr,
    /// Where the metadata (superblock, bitmap, activity log) lives:
    /// `"internal"` (the default: at the end of `disk`, which shrinks the
    /// exported size) or the path of a separate file or block device.
    #[serde(default)]
    pub meta_disk: Option<PathBuf>,
    /// That node's certificate (PEM) for the peer link over TLS: its peer
    /// accepts exactly this certificate (pinned).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// That node's private key for `tls_cert`, read only on that node.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

/// Where a replicated resource keeps its metadata on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaDisk {
    /// At the end of the backing disk.
    Internal,
    /// In a separate file or device, from offset 0.
    External(PathBuf),
}

/// `[nbd]`: how NBD clients reach this daemon.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    /// TCP address to listen on; `listen = ""` disables TCP.
    #[serde(default = "default_listen", deserialize_with = "de_opt_addr")]
    pub listen: Option<SocketAddr>,
    /// Optional unix-domain socket path to listen on as well.
    #[serde(default)]
    pub unix_socket: Option<PathBuf>,
    /// A client must finish option haggling within this time.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// A client that does not take a reply for this long is disconnected.
    #[serde(default = "default_send_timeout_ms")]
    pub send_timeout_ms: u64,
    /// Requests served in parallel on one connection.
    #[serde(default = "default_workers")]
    pub workers_per_connection: usize,
    /// Connections (in handshake or transmission) accepted at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// On SIGTERM, how long to wait for in-flight requests to finish.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// TLS on the TCP listener: `off` (STARTTLS unsupported), `allow`
    /// (offered; exports with `tls = "require"` or `allowed_clients` need
    /// it) or `require` (no export in clear).
    #[serde(default)]
    pub tls: TlsMode,
    /// The server's certificate chain (PEM), for `tls` other than `off`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM); refused when group or others may read it.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) client certificates are verified against.
    /// Without it a client certificate is identified by its fingerprint
    /// only.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
}

/// `tls = "off" | "allow" | "require"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    Off,
    Allow,
    Require,
}

/// An address range (`10.0.0.0/8`, `2001:db8::/32`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = ip
            .trim()
            .parse()
            .map_err(|e| format!("bad address range {text:?}: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("bad prefix length in {text:?} (0 to {max})"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is in the range (IPv4-mapped IPv6 addresses count as
    /// their IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Who may open one export (see `docs/security.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Only over TLS.
    pub tls_required: bool,
    /// Client certificate identities (subject or `sha256:` fingerprint);
    /// empty: any client (that meets the rest).
    pub allowed_clients: Vec<String>,
    /// Client address ranges; empty: any address. Unix-socket clients are
    /// local and not subject to it.
    pub allowed_addresses: Vec<Cidr>,
}

/// A shared secret: never printed.
#[derive(Clone, Default)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            listen: default_listen(),
            unix_socket: None,
            handshake_timeout_ms: default_handshake_timeout_ms(),
            send_timeout_ms: default_send_timeout_ms(),
            workers_per_connection: default_workers(),
            max_connections: default_max_connections(),
            shutdown_timeout_ms: default_shutdown_timeout_ms(),
            tls: TlsMode::Off,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
        }
    }
}

/// `[[resource]]`: one exported volume.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    /// Export name clients ask for (`nbd://host:port/NAME`).
    pub name: String,
    /// Backing file or block device for a single-node resource. It must
    /// exist; replblk never creates or resizes it. Replicated resources
    /// name their disks in `[resource.on.NODE]` instead.
    #[serde(default)]
    pub disk: Option<PathBuf>,
    /// Bytes to export; defaults to the whole backing store. Must be a
    /// multiple of 4096 and no larger than the backing store.
    #[serde(default)]
    pub size: Option<u64>,
    /// Refuse writes, trims and zeroing.
    #[serde(default)]
    pub read_only: bool,
    /// Free text shown by `nbdinfo --list`.
    #[serde(default)]
    pub description: String,
    /// Serve clients that ask for the empty export name ("").
    #[serde(default)]
    pub default: bool,
    /// Shared secret the two nodes prove to each other (HMAC-SHA256).
    /// Prefer `secret_file`: a secret here is in every copy of the file.
    #[serde(default)]
    pub secret: Option<String>,
    /// A file holding the shared secret, readable by its owner only.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Overrides `[nbd] tls` for this export: `require` serves it over
    /// TLS only.
    #[serde(default)]
    pub tls: Option<TlsMode>,
    /// Client certificate identities that may open this export: subjects
    /// (`CN=app1, O=Example`, needs `[nbd] tls_ca`) or fingerprints
    /// (`sha256:...`). Implies TLS with a client certificate.
    #[serde(default)]
    pub allowed_clients: Vec<String>,
    /// Address ranges (CIDR) clients may connect from.
    #[serde(default)]
    pub allowed_addresses: Vec<String>,
    /// Per-node disks and replication addresses (exactly two nodes).
    #[serde(default)]
    pub on: BTreeMap<String, ResourceOnNode>,
    /// Automatic split-brain resolution when both nodes are Secondary:
    /// `disconnect` (the default), `discard-zero-changes`,
    /// `discard-younger-primary`, `discard-least-changes`.
    #[serde(default)]
    pub after_sb_0pri: crate::core::split_brain::After0Pri,
    /// Automatic split-brain resolution when one node is Primary:
    /// `disconnect` (the default), `discard-secondary`, `consensus`.
    #[serde(default)]
    pub after_sb_1pri: crate::core::split_brain::After1Pri,
    /// What a Primary does when it loses its peer.
    #[serde(default)]
    pub fencing: FencingPolicy,
    /// Command that fences the peer (run with `sh -c`; see docs/config.md).
    #[serde(default)]
    pub fence_peer_handler: Option<String>,
    /// Command that lifts the fence once the peer has resynced.
    #[serde(default)]
    pub unfence_peer_handler: Option<String>,
    /// The fence-peer handler is killed after this long (counts as failed).
    #[serde(default = "default_fence_timeout_ms")]
    pub fence_timeout_ms: u64,
    /// A failed fence-peer handler runs again after this long.
    #[serde(default = "default_fence_retry_ms")]
    pub fence_retry_ms: u64,
    /// Replicated resources: 4 MiB extents in the activity log's hot set
    /// (0 disables the log: a crash then means a full resync).
    #[serde(default)]
    pub al_extents: Option<u32>,
    /// What happens when the local disk or metadata fails.
    #[serde(default)]
    pub on_io_error: IoErrorPolicy,
    /// Overrides of `[resync]` for this resource.
    #[serde(default)]
    pub resync: ResyncOptions,
}

/// `[resync]` and `[resource.resync]`: how a resync runs. Absent keys of a
/// resource take the global value, absent global ones the default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncOptions {
    /// How far ahead the controller plans: the depth of the rate
    /// limiter's bucket, and how long after the last application write
    /// the resync still yields to it (at most 100 ms).
    pub c_plan_ahead_ms: Option<u64>,
    /// Resync data in flight (sent, not yet acknowledged) at most, KiB.
    pub c_fill_target_kib: Option<u64>,
    /// Resync rate at most, MiB/s; 0 means no limit.
    pub c_max_rate_mib: Option<u64>,
    /// Resync rate while the application writes, MiB/s: the sync yields
    /// to the application down to this rate, never below.
    pub c_min_rate_mib: Option<u64>,
    /// Checksum-based resync: `"none"` (send every out-of-sync block) or
    /// `"xxh3-128"` (the target sends checksums of its blocks, the
    /// source sends only the blocks that differ).
    pub csums_alg: Option<String>,
}

/// The resolved resync settings of one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResyncConfig {
    pub rate: RateSettings,
    /// Checksum-based resync.
    pub csums: bool,
}

impl ResyncOptions {
    /// `self` over `global` over the defaults.
    fn resolve(&self, global: &ResyncOptions, what: &str) -> Result<ResyncConfig, ConfigError> {
        let d = RateSettings::default();
        let pick = |a: Option<u64>, b: Option<u64>| a.or(b);
        let mib = 1u64 << 20;
        let rate = RateSettings {
            plan_ahead_ms: pick(self.c_plan_ahead_ms, global.c_plan_ahead_ms)
                .unwrap_or(d.plan_ahead_ms),
            fill_target: pick(self.c_fill_target_kib, global.c_fill_target_kib)
                .map_or(d.fill_target, |k| k.saturating_mul(1024)),
            max_rate: pick(self.c_max_rate_mib, global.c_max_rate_mib)
                .map_or(d.max_rate, |m| m.saturating_mul(mib)),
            min_rate: pick(self.c_min_rate_mib, global.c_min_rate_mib)
                .map_or(d.min_rate, |m| m.saturating_mul(mib)),
        };
        rate.check()
            .map_err(|m| ConfigError::Invalid(format!("{what}: {m}")))?;
        let alg = self
            .csums_alg
            .as_deref()
            .or(global.csums_alg.as_deref())
            .unwrap_or("none");
        let csums = match alg {
            "none" => false,
            "xxh3-128" => true,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "{what}: csums_alg = {other:?} is not one of \"none\", \"xxh3-128\""
                )))
            }
        };
        Ok(ResyncConfig { rate, csums })
    }
}

/// The peer side of a replicated resource, as seen from this node.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub local_node: String,
    pub local_address: SocketAddr,
    pub peer_node: String,
    pub peer_address: SocketAddr,
    /// The peer's NBD listen address, when the file gives a concrete one
    /// (not a wildcard, not port 0): named in refusals so clients can
    /// find the Primary.
    pub peer_nbd: Option<SocketAddr>,
    pub secret: Secret,
    /// Where the secret is read from at start (`secret_file`), if not
    /// inline.
    pub secret_file: Option<PathBuf>,
    /// The peer link's TLS files: (own cert, own key, peer's cert).
    pub tls_files: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Built from `tls_files` at start (`NodeView::load_secrets`).
    pub tls: Option<crate::tls::PeerTls>,
    pub timing: ReplicationConfig,
    /// Automatic split-brain policies; both nodes must agree.
    pub split_brain: crate::core::split_brain::Policy,
    pub fencing: FencingConfig,
    pub resync: ResyncConfig,
}

/// A resource resolved for one node.
#[derive(Debug, Clone)]
pub struct LocalResource {
    pub name: String,
    pub disk: PathBuf,
    pub size: Option<u64>,
    pub read_only: bool,
    pub description: String,
    /// Replicated resources only: where the metadata is.
    pub meta: Option<MetaDisk>,
    /// Activity-log hot set in 4 MiB extents (0: no activity log).
    pub al_extents: u32,
    /// What happens when the local disk or metadata fails.
    pub on_io_error: IoErrorPolicy,
    pub peer: Option<PeerConfig>,
    pub access: Access,
}

/// Everything one node needs from the shared file.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub node: String,
    pub nbd: NbdConfig,
    pub control_socket: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub resources: Vec<LocalResource>,
    pub default_resource: Option<String>,
}

fn de_opt_addr_opt<'de, D>(de: D) -> Result<Option<Option<SocketAddr>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    de_opt_addr(de).map(Some)
}

fn de_opt_addr<'de, D>(de: D) -> Result<Option<SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let s = String::deserialize(de)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("bad socket address {s:?}: {e}")))
}

impl NodeView {
    /// Reads what the config only points at: shared secrets from their
    /// files and the peer link's certificates and keys, refusing files
    /// with secrets that others may read.
    pub fn load_secrets(&mut self) -> Result<(), ConfigError> {
        for r in &mut self.resources {
            let Some(peer) = &mut r.peer else { continue };
            let what = |e: String| ConfigError::Invalid(format!("resource {:?}: {e}", r.name));
            if let Some(path) = &peer.secret_file {
                peer.secret = Secret(crate::tls::read_secret_file(path).map_err(what)?);
            }
            if let Some((cert, key, peer_cert)) = &peer.tls_files {
                peer.tls = Some(crate::tls::PeerTls::new(cert, key, peer_cert).map_err(what)?);
            }
        }
        Ok(())
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates the text of a config file.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.resources.is_empty() {
            return invalid("no [[resource]] defined; nothing to export".into());
        }
        if self.nbd.listen.is_none() && self.nbd.unix_socket.is_none() {
            return invalid(
                "[nbd] has neither listen nor unix_socket; clients could not connect".into(),
            );
        }
        if self.nbd.workers_per_connection == 0 || self.nbd.workers_per_connection > 256 {
            return invalid(format!(
                "[nbd] workers_per_connection = {} must be between 1 and 256",
                self.nbd.workers_per_connection
            ));
        }
        if self.nbd.max_connections == 0 {
            return invalid("[nbd] max_connections must be at least 1".into());
        }
        if self.nbd.send_timeout_ms == 0 {
            return invalid("[nbd] send_timeout_ms must be at least 1".into());
        }
        if self.nbd.handshake_timeout_ms == 0 {
            return invalid("[nbd] handshake_timeout_ms must be at least 1".into());
        }
        let r = &self.replication;
        if r.transfer_log_max == 0 || r.transfer_log_max > TRANSFER_LOG_LIMIT {
            return invalid(format!(
                "[replication] transfer_log_max = {} must be between 1 and {TRANSFER_LOG_LIMIT}",
                r.transfer_log_max
            ));
        }
        if r.transfer_log_max_age_ms == 0 {
            return invalid("[replication] transfer_log_max_age_ms must be at least 1".into());
        }
        let mut names = HashSet::new();
        let mut defaults = 0;
        for r in &self.resources {
            if r.name.is_empty() {
                return invalid("a [[resource]] has an empty name".into());
            }
            if r.name.len() > replblk_proto::nbd::MAX_STRING
                || r.name.chars().any(|c| c.is_control() || c == '/')
            {
                return invalid(format!(
                    "resource name {:?} must be at most 4096 bytes, without '/' or control characters",
                    r.name
                ));
            }
            if !names.insert(r.name.as_str()) {
                return invalid(format!("resource {:?} is defined twice", r.name));
            }
            if let Some(size) = r.size {
                if size == 0 || size % SIZE_ALIGN != 0 {
                    return invalid(format!(
                        "resource {:?}: size = {size} is not a positive multiple of 4 KiB",
                        r.name
                    ));
                }
            }
            if let Some(n) = r.al_extents {
                let max = crate::core::actlog::max_extents(crate::meta::AL_BLOCKS as u32);
                let min = crate::core::actlog::MIN_EXTENTS;
                if n != 0 && !(min..=max).contains(&n) {
                    return invalid(format!(
                        "resource {:?}: al_extents = {n} must be 0 (no activity log) or between {min} and {max}",
                        r.name
                    ));
                }
            }
            if r.default {
                defaults += 1;
            }
            match (&r.disk, r.on.len()) {
                (Some(_), 0) => {}
                (None, 0) => {
                    return invalid(format!(
                        "resource {:?} has no disk (set `disk`, or `[resource.on.NODE]` tables)",
                        r.name
                    ))
                }
                (Some(_), _) => {
                    return invalid(format!(
                        "resource {:?} sets both `disk` and `on` tables; use one",
                        r.name
                    ))
                }
                (None, 1) => {}
                (None, 2) => {
                    if r.secret.as_deref().unwrap_or("").is_empty() && r.secret_file.is_none() {
                        return invalid(format!(
                            "resource {:?} is replicated between two nodes but has no \
                             `secret_file` (or `secret`)",
                            r.name
                        ));
                    }
                    let certs = r.on.values().filter(|o| o.tls_cert.is_some()).count();
                    if certs == 1 {
                        return invalid(format!(
                            "resource {:?}: only one node has a tls_cert; the peer link uses \
                             TLS when both have one",
                            r.name
                        ));
                    }
                    if let Some((node, _)) =
                        r.on.iter()
                            .find(|(_, o)| o.tls_cert.is_some() != o.tls_key.is_some())
                    {
                        return invalid(format!(
                            "resource {:?} on {node:?}: tls_cert and tls_key go together",
                            r.name
                        ));
                    }
                }
                (None, n) => {
                    return invalid(format!(
                        "resource {:?} names {n} nodes; replblk replicates between exactly two",
                        r.name
                    ))
                }
            }
            if !r.on.is_empty() {
                let max = replblk_proto::repl::MAX_NAME;
                if let Some(long) = std::iter::once(&r.name)
                    .chain(r.on.keys())
                    .find(|n| n.len() > max || n.is_empty())
                {
                    return invalid(format!(
                        "resource {:?}: name {long:?} must be 1 to {max} bytes for replication",
                        r.name
                    ));
                }
            }
            if r.fencing == FencingPolicy::ResourceOnly {
                if r.on.len() != 2 {
                    return invalid(format!(
                        "resource {:?}: fencing = \"resource-only\" needs a replicated resource",
                        r.name
                    ));
                }
                if r.fence_peer_handler
                    .as_deref()
                    .unwrap_or("")
                    .trim()
                    .is_empty()
                {
                    return invalid(format!(
                        "resource {:?}: fencing = \"resource-only\" needs fence_peer_handler \
                         (the command that fences the peer)",
                        r.name
                    ));
                }
            }
            if r.fence_timeout_ms == 0 || r.fence_retry_ms == 0 {
                return invalid(format!(
                    "resource {:?}: fence_timeout_ms and fence_retry_ms must be at least 1",
                    r.name
                ));
            }
            for (node, on) in &r.on {
                if on.meta_disk.as_deref() == Some(on.disk.as_path()) {
                    return invalid(format!(
                        "resource {:?} on {node:?}: meta_disk is the data disk; \
                         use meta_disk = \"internal\" for metadata at its end",
                        r.name
                    ));
                }
            }
        }
        if defaults > 1 {
            return invalid("more than one resource has default = true".into());
        }
        self.resync.resolve(&ResyncOptions::default(), "[resync]")?;
        for r in &self.resources {
            r.resync.resolve(
                &self.resync,
                &format!("resource {:?} [resource.resync]", r.name),
            )?;
        }
        self.validate_security()
    }

    fn validate_security(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let nbd = &self.nbd;
        if nbd.tls != TlsMode::Off && (nbd.tls_cert.is_none() || nbd.tls_key.is_none()) {
            return invalid(format!(
                "[nbd] tls = \"{}\" needs tls_cert and tls_key",
                if nbd.tls == TlsMode::Allow {
                    "allow"
                } else {
                    "require"
                }
            ));
        }
        if nbd.tls == TlsMode::Require && nbd.listen.is_none() {
            return invalid("[nbd] tls = \"require\" but no TCP listener".into());
        }
        for r in &self.resources {
            if r.secret.is_some() && r.secret_file.is_some() {
                return invalid(format!(
                    "resource {:?} sets both secret and secret_file; use secret_file",
                    r.name
                ));
            }
            let needs_tls = r.tls == Some(TlsMode::Require) || !r.allowed_clients.is_empty();
            if needs_tls && nbd.tls == TlsMode::Off {
                return invalid(format!(
                    "resource {:?} needs TLS (tls = \"require\" or allowed_clients) but \
                     [nbd] tls = \"off\"",
                    r.name
                ));
            }
            if r.tls == Some(TlsMode::Off) && nbd.tls == TlsMode::Require {
                return invalid(format!(
                    "resource {:?}: tls = \"off\" cannot loosen [nbd] tls = \"require\"",
                    r.name
                ));
            }
            for id in &r.allowed_clients {
                if crate::tls::parse_fingerprint(id).is_some() {
                    continue;
                }
                if !id.contains('=') {
                    return invalid(format!(
                        "resource {:?}: allowed client {id:?} is neither a subject \
                         (CN=...) nor a sha256 fingerprint",
                        r.name
                    ));
                }
                if nbd.tls_ca.is_none() {
                    return invalid(format!(
                        "resource {:?}: allowed client subject {id:?} needs [nbd] tls_ca \
                         (without a CA anyone can make a certificate with that subject; \
                         use its sha256 fingerprint instead)",
                        r.name
                    ));
                }
            }
            for a in &r.allowed_addresses {
                if let Err(e) = Cidr::parse(a) {
                    return invalid(format!("resource {:?}: {e}", r.name));
                }
            }
        }
        Ok(())
    }

    /// Where node `node` listens for NBD, if that is a concrete address.
    fn nbd_listen_of(&self, node: &str) -> Option<SocketAddr> {
        let listen = match self.nodes.get(node).and_then(|o| o.nbd_listen) {
            Some(l) => l,
            None => self.nbd.listen,
        }?;
        (!listen.ip().is_unspecified() && listen.port() != 0).then_some(listen)
    }

    /// Resolves the shared file for the node called `node`.
    pub fn for_node(&self, node: &str) -> Result<NodeView, ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let overrides = self.nodes.get(node).cloned().unwrap_or_default();
        let mut nbd = self.nbd.clone();
        if let Some(listen) = overrides.nbd_listen {
            nbd.listen = listen;
        }
        if overrides.unix_socket.is_some() {
            nbd.unix_socket = overrides.unix_socket;
        }
        if nbd.listen.is_none() && nbd.unix_socket.is_none() {
            return invalid(format!(
                "node {node:?} has neither an NBD listen address nor a unix socket"
            ));
        }
        let mut resources = Vec::new();
        for r in &self.resources {
            let (disk, peer, meta) = if let Some(disk) = &r.disk {
                (disk.clone(), None, None)
            } else {
                let Some(mine) = r.on.get(node) else {
                    return invalid(format!(
                        "resource {:?} has no [resource.on.{node}] table for this node \
                         (start repld with --node NAME; nodes here: {})",
                        r.name,
                        r.on.keys().cloned().collect::<Vec<_>>().join(", ")
                    ));
                };
                let peer =
                    r.on.iter()
                        .find(|(n, _)| n.as_str() != node)
                        .map(|(n, p)| PeerConfig {
                            local_node: node.to_owned(),
                            local_address: mine.address,
                            peer_node: n.clone(),
                            peer_address: p.address,
                            peer_nbd: self.nbd_listen_of(n),
                            secret: Secret(r.secret.clone().unwrap_or_default()),
                            secret_file: r.secret_file.clone(),
                            tls_files: match (&mine.tls_cert, &mine.tls_key, &p.tls_cert) {
                                (Some(c), Some(k), Some(pc)) => {
                                    Some((c.clone(), k.clone(), pc.clone()))
                                }
                                _ => None,
                            },
                            tls: None,
                            timing: self.replication.clone(),
                            split_brain: crate::core::split_brain::Policy {
                                after_sb_0pri: r.after_sb_0pri,
                                after_sb_1pri: r.after_sb_1pri,
                            },
                            fencing: FencingConfig {
                                policy: r.fencing,
                                fence_peer_handler: r.fence_peer_handler.clone(),
                                unfence_peer_handler: r.unfence_peer_handler.clone(),
                                timeout_ms: r.fence_timeout_ms,
                                retry_ms: r.fence_retry_ms,
                            },
                            resync: ResyncConfig::default(),
                        });
                let peer = match peer {
                    Some(mut p) => {
                        p.resync = r.resync.resolve(
                            &self.resync,
                            &format!("resource {:?} [resource.resync]", r.name),
                        )?;
                        Some(p)
                    }
                    None => None,
                };
                let meta = peer.as_ref().map(|_| match &mine.meta_disk {
                    Some(p) if p.as_os_str() != "internal" => MetaDisk::External(p.clone()),
                    _ => MetaDisk::Internal,
                });
                (mine.disk.clone(), peer, meta)
            };
            resources.push(LocalResource {
                name: r.name.clone(),
                disk,
                size: r.size,
                read_only: r.read_only,
                description: r.description.clone(),
                meta,
                peer,
                al_extents: r.al_extents.unwrap_or(crate::core::actlog::DEFAULT_EXTENTS),
                on_io_error: r.on_io_error,
                access: self.access(r),
            });
        }
        Ok(NodeView {
            node: node.to_owned(),
            nbd,
            control_socket: overrides
                .control_socket
                .unwrap_or_else(|| self.control.socket.clone()),
            metrics_listen: overrides.metrics_listen.unwrap_or(self.metrics.listen),
            resources,
            default_resource: self.default_resource().map(str::to_owned),
        })
    }

    /// Who may open resource `r`'s export (validated: the ranges parse).
    pub fn access(&self, r: &ResourceConfig) -> Access {
        Access {
            // `[nbd] tls = "require"` is the TCP listener's rule (enforced
            // in the handshake); this is the export's own.
            tls_required: r.tls == Some(TlsMode::Require) || !r.allowed_clients.is_empty(),
            allowed_clients: r.allowed_clients.clone(),
            allowed_addresses: r
                .allowed_addresses
                .iter()
                .filter_map(|a| Cidr::parse(a).ok())
                .collect(),
        }
    }

    /// The resource served to clients asking for the empty name: the one
    /// marked `default`, or the only one.
    pub fn default_resource(&self) -> Option<&str> {
        match self.resources.iter().find(|r| r.default) {
            Some(r) => Some(&r.name),
            None if self.resources.len() == 1 => Some(&self.resources[0].name),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[[resource]]\nname = \"r0\"\ndisk = \"/tmp/x\"\n";

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert_eq!(c.nbd.listen, default_listen());
        assert_eq!(c.nbd.workers_per_connection, 8);
        assert_eq!(c.default_resource(), Some("r0"));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::parse(&format!("{MINIMAL}colour = \"blue\"\n")).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = Config::parse(&format!("[nbd]\nlisten_addr = \"x\"\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn size_must_be_a_multiple_of_4k() {
        let err = Config::parse(&format!("{MINIMAL}size = 4097\n")).unwrap_err();
        assert!(err.to_string().contains("multiple of 4 KiB"), "{err}");
        assert!(Config::parse(&format!("{MINIMAL}size = 8192\n")).is_ok());
    }

    #[test]
    fn on_io_error_defaults_to_detach_and_takes_pass_on() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert_eq!(c.resources[0].on_io_error, IoErrorPolicy::Detach);
        let c = Config::parse(&format!("{MINIMAL}on_io_error = \"pass-on\"\n")).expect("valid");
        assert_eq!(c.resources[0].on_io_error, IoErrorPolicy::PassOn);
        let err = Config::parse(&format!("{MINIMAL}on_io_error = \"ignore\"\n")).unwrap_err();
        assert!(err.to_string().contains("on_io_error"), "{err}");
    }

    #[test]
    fn al_extents_is_zero_or_within_the_log_capacity() {
        for bad in [1, 15, 23_809, u32::MAX] {
            let err = Config::parse(&format!("{MINIMAL}al_extents = {bad}\n")).unwrap_err();
            assert!(err.to_string().contains("al_extents"), "{err}");
        }
        for good in [0, 16, 1237, 23_808] {
            let c = Config::parse(&format!("{MINIMAL}al_extents = {good}\n")).expect("valid");
            assert_eq!(c.resources[0].al_extents, Some(good));
        }
        let c = Config::parse(MINIMAL).expect("valid");
        let view = c.for_node("any").expect("resolves");
        assert_eq!(view.resources[0].al_extents, 1237);
    }

    #[test]
    fn duplicate_names_and_missing_resources_are_rejected() {
        assert!(Config::parse("").is_err());
        let err = Config::parse(&format!("{MINIMAL}{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
    }

    #[test]
    fn empty_listen_disables_tcp_but_needs_a_unix_socket() {
        let err = Config::parse(&format!("[nbd]\nlisten = \"\"\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("neither"), "{err}");
        let c = Config::parse(&format!(
            "[nbd]\nlisten = \"\"\nunix_socket = \"/tmp/s\"\n{MINIMAL}"
        ))
        .expect("valid");
        assert!(c.nbd.listen.is_none());
    }

    #[test]
    fn bad_addresses_are_reported() {
        let err = Config::parse(&format!("[nbd]\nlisten = \"nowhere\"\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("nowhere"), "{err}");
    }

    #[test]
    fn the_shipped_example_parses_and_resolves_for_both_nodes() {
        let text = include_str!("../examples/replblk.toml");
        let config = Config::parse(text).expect("examples/replblk.toml is valid");
        for node in ["alpha", "beta"] {
            let view = config.for_node(node).expect("resolves");
            let r = &view.resources[0];
            assert_eq!(r.meta, Some(MetaDisk::Internal), "{node}");
            assert!(r.peer.is_some(), "{node}");
        }
    }

    #[test]
    fn the_peers_concrete_nbd_address_is_known_for_refusals() {
        let text = "[nodes.a]\nnbd_listen = \"10.0.0.1:10809\"\n\
                    [nodes.b]\nnbd_listen = \"0.0.0.0:10809\"\n\
                    [[resource]]\nname = \"r0\"\nsecret = \"s\"\n\
                    [resource.on.a]\ndisk = \"/d/a\"\naddress = \"127.0.0.1:1\"\n\
                    [resource.on.b]\ndisk = \"/d/b\"\naddress = \"127.0.0.1:2\"\n";
        let c = Config::parse(text).expect("valid");
        let peer_nbd = |node: &str| {
            let view = c.for_node(node).expect("resolves");
            view.resources[0].peer.as_ref().expect("peer").peer_nbd
        };
        assert_eq!(peer_nbd("b"), Some("10.0.0.1:10809".parse().unwrap()));
        // A wildcard says nothing about where clients reach the node.
        assert_eq!(peer_nbd("a"), None);
    }

    #[test]
    fn meta_disk_is_internal_by_default_or_a_path_but_never_the_data_disk() {
        let base = "[[resource]]\nname = \"r0\"\nsecret = \"s\"\n\
                    [resource.on.a]\ndisk = \"/d/a\"\naddress = \"127.0.0.1:1\"\n";
        let b = |extra: &str| {
            format!("{base}{extra}[resource.on.b]\ndisk = \"/d/b\"\naddress = \"127.0.0.1:2\"\n")
        };
        let c = Config::parse(&b("meta_disk = \"/m/a\"\n")).expect("valid");
        assert_eq!(
            c.for_node("a").expect("a").resources[0].meta,
            Some(MetaDisk::External("/m/a".into()))
        );
        assert_eq!(
            c.for_node("b").expect("b").resources[0].meta,
            Some(MetaDisk::Internal)
        );
        let c = Config::parse(&b("meta_disk = \"internal\"\n")).expect("valid");
        assert_eq!(
            c.for_node("a").expect("a").resources[0].meta,
            Some(MetaDisk::Internal)
        );
        let err = Config::parse(&b("meta_disk = \"/d/a\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("meta_disk is the data disk"), "{err}");
        // Roles are runtime state now: the old key is refused by name.
        let with_primary = b("").replacen("secret", "primary = \"a\"\nsecret", 1);
        let err = Config::parse(&with_primary).unwrap_err().to_string();
        assert!(err.contains("unknown field `primary`"), "{err}");
    }

    #[test]
    fn split_brain_policies_default_to_disconnect_and_bad_values_are_named() {
        use crate::core::split_brain::{After0Pri, After1Pri};
        let base = |keys: &str| {
            format!(
                "[[resource]]\nname = \"r0\"\nsecret = \"s\"\n{keys}\
                 [resource.on.a]\ndisk = \"/d/a\"\naddress = \"127.0.0.1:1\"\n\
                 [resource.on.b]\ndisk = \"/d/b\"\naddress = \"127.0.0.1:2\"\n"
            )
        };
        let peer = |text: &str| {
            Config::parse(text)
                .expect("valid")
                .for_node("a")
                .expect("a")
                .resources[0]
                .peer
                .clone()
                .expect("replicated")
        };
        assert!(peer(&base("")).split_brain.is_manual());
        let p = peer(&base(
            "after_sb_0pri = \"discard-younger-primary\"\nafter_sb_1pri = \"consensus\"\n",
        ));
        assert_eq!(
            p.split_brain.after_sb_0pri,
            After0Pri::DiscardYoungerPrimary
        );
        assert_eq!(p.split_brain.after_sb_1pri, After1Pri::Consensus);
        let err = Config::parse(&base("after_sb_0pri = \"discard-everything\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("discard-everything") && err.contains("discard-least-changes"),
            "{err}"
        );
        // Only the 0pri values exist for 0pri.
        assert!(Config::parse(&base("after_sb_0pri = \"discard-secondary\"\n")).is_err());
    }

    #[test]
    fn fencing_needs_a_handler_and_resolves_per_node() {
        let pair = "[[resource]]\nname = \"r0\"\nsecret = \"s\"\n";
        let on = "[resource.on.a]\ndisk = \"/d/a\"\naddress = \"127.0.0.1:1\"\n\
                  [resource.on.b]\ndisk = \"/d/b\"\naddress = \"127.0.0.1:2\"\n";
        let err = Config::parse(&format!("{pair}fencing = \"resource-only\"\n{on}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs fence_peer_handler"), "{err}");
        let err = Config::parse(&format!("{pair}fencing = \"stonith\"\n{on}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("stonith"), "{err}");
        let c = Config::parse(&format!(
            "[metrics]\nlisten = \"127.0.0.1:9942\"\n[nodes.b]\nmetrics_listen = \"\"\n\
             {pair}fencing = \"resource-only\"\nfence_peer_handler = \"/bin/true\"\n{on}"
        ))
        .expect("valid");
        let a = c.for_node("a").expect("a");
        assert_eq!(
            a.metrics_listen,
            Some("127.0.0.1:9942".parse().expect("addr"))
        );
        assert_eq!(c.for_node("b").expect("b").metrics_listen, None);
        let f = &a.resources[0].peer.as_ref().expect("peer").fencing;
        assert_eq!(f.policy, FencingPolicy::ResourceOnly);
        assert_eq!(f.fence_peer_handler.as_deref(), Some("/bin/true"));
        assert_eq!((f.timeout_ms, f.retry_ms), (60_000, 5_000));
        // Off by default.
        assert_eq!(Config::parse(MINIMAL).expect("valid").metrics.listen, None);
    }

    #[test]
    fn resync_settings_resolve_resource_over_global_over_defaults() {
        let base = "[[resource]]\nname = \"r0\"\nsecret = \"s\"\n\
                    [resource.on.a]\ndisk = \"/d/a\"\naddress = \"127.0.0.1:1\"\n\
                    [resource.on.b]\ndisk = \"/d/b\"\naddress = \"127.0.0.1:2\"\n";
        let c = Config::parse(base).expect("valid");
        let p = c.for_node("a").expect("a").resources[0]
            .peer
            .clone()
            .expect("peer");
        assert_eq!(p.resync, ResyncConfig::default());
        let text = format!(
            "[resync]\nc_max_rate_mib = 200\nc_min_rate_mib = 20\n{base}\
             [resource.resync]\nc_min_rate_mib = 5\ncsums_alg = \"xxh3-128\"\n"
        );
        let c = Config::parse(&text).expect("valid");
        let p = c.for_node("b").expect("b").resources[0]
            .peer
            .clone()
            .expect("peer");
        assert_eq!(p.resync.rate.max_rate, 200 << 20);
        assert_eq!(p.resync.rate.min_rate, 5 << 20);
        assert!(p.resync.csums);
        let err = Config::parse(&format!("[resync]\ncsums_alg = \"md4\"\n{base}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("md4"), "{err}");
        let err = Config::parse(&format!(
            "[resync]\nc_max_rate_mib = 1\nc_min_rate_mib = 2\n{base}"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("below"), "{err}");
        let err = Config::parse(&format!("[resync]\nc_rate = 1\n{base}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("c_rate"), "{err}");
    }
}
