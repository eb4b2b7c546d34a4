//! Prometheus metrics on an optional HTTP address (`[metrics] listen`).
//!
//! The exposition text is produced by the `prometheus-client` crate's
//! OpenMetrics encoder. What the data path records costs a few relaxed
//! atomic additions per request and no lock: per export and NBD command,
//! a request count, a byte count, an error count and a latency histogram
//! whose buckets are atomics (the crate's own histogram takes a mutex per
//! observation). Everything about replication (roles, disk and
//! connection states, out-of-sync bytes, the replication round trip,
//! resync progress, fencing) is read from the resources when scraped.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::core::state::{ConnState, DiskState, ReplState, Role};
use crate::repl::Replica;

/// The NBD commands counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Trim,
    WriteZeroes,
    Flush,
    Cache,
    Other,
}

impl Op {
    const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::Trim,
        Op::WriteZeroes,
        Op::Flush,
        Op::Cache,
        Op::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::Flush => "flush",
            Op::Cache => "cache",
            Op::Other => "other",
        }
    }
}

/// Upper bounds of the latency buckets, in nanoseconds (25 µs to 10 s).
const BOUNDS_NS: [u64; 18] = [
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A histogram of durations with atomic buckets: observing is lock-free.
#[derive(Debug, Default)]
pub struct AtomicHistogram {
    /// Per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// (sum in seconds, count, cumulative buckets with upper bounds).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.buckets.len());
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let bound = BOUNDS_NS
                .get(i)
                .map_or(f64::INFINITY, |&ns| ns as f64 / 1e9);
            buckets.push((bound, cumulative));
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, cumulative, buckets)
    }
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[derive(Debug, Default)]
struct OpMetrics {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latency: AtomicHistogram,
}

/// What the NBD frontend records for one export.
#[derive(Debug, Default)]
pub struct IoMetrics {
    ops: [OpMetrics; Op::ALL.len()],
}

impl IoMetrics {
    /// One request done: `bytes` moved (0 for a flush), failed or not,
    /// and how long from its arrival to its reply.
    pub fn record(&self, op: Op, bytes: u64, ok: bool, elapsed: Duration) {
        let m = &self.ops[op as usize];
        m.requests.fetch_add(1, Ordering::Relaxed);
        m.bytes.fetch_add(bytes, Ordering::Relaxed);
        if !ok {
            m.errors.fetch_add(1, Ordering::Relaxed);
        }
        m.latency.observe(elapsed);
    }

    /// The recorder of a new export; lives as long as the process.
    pub fn leak() -> &'static IoMetrics {
        Box::leak(Box::default())
    }
}

/// Reads everything at scrape time.
struct ReplblkCollector {
    node: String,
    exports: Vec<(String, &'static IoMetrics)>,
    replicas: Vec<Arc<Replica>>,
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, &str)>, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        m.encode_family(labels)?.encode_gauge(v)?;
    }
    Ok(())
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, &str)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        m.encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(v, None)?;
    }
    Ok(())
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

impl Collector for ReplblkCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let node = self.node.as_str();
        gauge(
            &mut encoder,
            "replblk_info",
            "This daemon: node name and version.",
            &[(
                vec![("node", node), ("version", env!("CARGO_PKG_VERSION"))],
                1.0,
            )],
        )?;

        // NBD requests, per export and command.
        let mut requests = Vec::new();
        let mut bytes = Vec::new();
        let mut errors = Vec::new();
        for (name, m) in &self.exports {
            for op in Op::ALL {
                let o = &m.ops[op as usize];
                let labels = vec![("resource", name.as_str()), ("op", op.label())];
                requests.push((labels.clone(), o.requests.load(Ordering::Relaxed)));
                bytes.push((labels.clone(), o.bytes.load(Ordering::Relaxed)));
                errors.push((labels, o.errors.load(Ordering::Relaxed)));
            }
        }
        counter(
            &mut encoder,
            "replblk_nbd_requests",
            "NBD requests completed, by export and command.",
            &requests,
        )?;
        counter(
            &mut encoder,
            "replblk_nbd_bytes",
            "Bytes read, written, trimmed or zeroed by NBD requests.",
            &bytes,
        )?;
        counter(
            &mut encoder,
            "replblk_nbd_errors",
            "NBD requests answered with an error.",
            &errors,
        )?;
        {
            let mut m = encoder.encode_descriptor(
                "replblk_nbd_request_duration_seconds",
                "Time from an NBD request's arrival to its reply (a replicated write: both copies).",
                None,
                MetricType::Histogram,
            )?;
            for (name, io) in &self.exports {
                for op in Op::ALL {
                    let labels = [("resource", name.as_str()), ("op", op.label())];
                    io.ops[op as usize]
                        .latency
                        .encode(m.encode_family(&labels)?)?;
                }
            }
        }

        // Replication state, per replicated resource.
        let statuses: Vec<_> = self
            .replicas
            .iter()
            .filter(|r| r.is_replicated())
            .map(|r| (r.status(), r.resync_bytes()))
            .collect();
        let mut up = Vec::new();
        let mut role = Vec::new();
        let mut disk = Vec::new();
        let mut peer_disk = Vec::new();
        let mut conn = Vec::new();
        let mut repl = Vec::new();
        let mut oos = Vec::new();
        let mut rtt = Vec::new();
        let mut frozen = Vec::new();
        let mut fenced = Vec::new();
        let mut resync = Vec::new();
        for (s, resynced) in &statuses {
            let r = s.name.as_str();
            up.push((vec![("resource", r)], flag(s.up)));
            for (v, name) in [(Role::Primary, "Primary"), (Role::Secondary, "Secondary")] {
                role.push((vec![("resource", r), ("role", name)], flag(s.role == v)));
            }
            for (v, name) in DISK_STATES {
                disk.push((vec![("resource", r), ("state", name)], flag(s.disk == v)));
                peer_disk.push((
                    vec![("resource", r), ("state", name)],
                    flag(s.peer_disk == Some(v)),
                ));
            }
            for (v, name) in [
                (ConnState::StandAlone, "StandAlone"),
                (ConnState::Connecting, "Connecting"),
                (ConnState::Connected, "Connected"),
            ] {
                conn.push((
                    vec![("resource", r), ("state", name)],
                    flag(s.connection == v),
                ));
            }
            for (v, name) in [
                (ReplState::Off, "Off"),
                (ReplState::Established, "Established"),
                (ReplState::SyncSource, "SyncSource"),
                (ReplState::SyncTarget, "SyncTarget"),
            ] {
                repl.push((
                    vec![("resource", r), ("state", name)],
                    flag(s.replication == v),
                ));
            }
            oos.push((vec![("resource", r)], s.out_of_sync_bytes as f64));
            if let Some(us) = s.ping_rtt_us {
                rtt.push((vec![("resource", r)], us as f64 / 1e6));
            }
            frozen.push((vec![("resource", r)], flag(s.io_frozen)));
            fenced.push((vec![("resource", r)], flag(s.peer_fenced)));
            resync.push((vec![("resource", r)], *resynced));
        }
        gauge(
            &mut encoder,
            "replblk_up",
            "The resource's disk is attached.",
            &up,
        )?;
        gauge(
            &mut encoder,
            "replblk_role",
            "1 for the node's current role.",
            &role,
        )?;
        gauge(
            &mut encoder,
            "replblk_disk_state",
            "1 for the local disk's state.",
            &disk,
        )?;
        gauge(
            &mut encoder,
            "replblk_peer_disk_state",
            "1 for the peer's disk state as it last reported it (all 0 when unknown).",
            &peer_disk,
        )?;
        gauge(
            &mut encoder,
            "replblk_connection_state",
            "1 for the link's state.",
            &conn,
        )?;
        gauge(
            &mut encoder,
            "replblk_replication_state",
            "1 for what the connected pair is doing.",
            &repl,
        )?;
        gauge(
            &mut encoder,
            "replblk_out_of_sync_bytes",
            "Bytes the peer may not have (marked out of sync).",
            &oos,
        )?;
        gauge(
            &mut encoder,
            "replblk_replication_rtt_seconds",
            "Round trip of the last keepalive on the replication link (absent while not connected).",
            &rtt,
        )?;
        gauge(
            &mut encoder,
            "replblk_io_frozen",
            "1 while writes are held because the peer was lost and is not fenced yet.",
            &frozen,
        )?;
        gauge(
            &mut encoder,
            "replblk_peer_fenced",
            "1 while the peer is known fenced or outdated.",
            &fenced,
        )?;
        counter(
            &mut encoder,
            "replblk_resync_sent_bytes",
            "Bytes this node sent to its peer as resync source (rate() gives the resync rate).",
            &resync,
        )?;
        Ok(())
    }
}

impl std::fmt::Debug for ReplblkCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplblkCollector")
            .field("node", &self.node)
            .field("exports", &self.exports.len())
            .field("replicas", &self.replicas.len())
            .finish()
    }
}

const DISK_STATES: [(DiskState, &str); 5] = [
    (DiskState::Diskless, "Diskless"),
    (DiskState::Inconsistent, "Inconsistent"),
    (DiskState::Outdated, "Outdated"),
    (DiskState::Consistent, "Consistent"),
    (DiskState::UpToDate, "UpToDate"),
];

/// The exposition text for the exports and resources of this node.
pub fn render(
    node: &str,
    exports: &[(String, &'static IoMetrics)],
    replicas: &[Arc<Replica>],
) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ReplblkCollector {
        node: node.to_owned(),
        exports: exports.to_vec(),
        replicas: replicas.to_vec(),
    }));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// The HTTP endpoint: `GET /metrics` (any other path: 404). Serves one
/// scrape at a time; a client gets 5 s to send its request.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    pub fn start(
        listen: SocketAddr,
        node: String,
        exports: Vec<(String, &'static IoMetrics)>,
        replicas: Vec<Arc<Replica>>,
    ) -> io::Result<MetricsServer> {
        let listener = TcpListener::bind(listen).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen for metrics on {listen}: {e}"),
            )
        })?;
        let addr = listener.local_addr()?;
        tracing::info!("serving Prometheus metrics on http://{addr}/metrics");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    if let Err(e) = serve(conn, &node, &exports, &replicas) {
                        tracing::debug!("metrics request: {e}");
                    }
                }
            })?;
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    conn: TcpStream,
    node: &str,
    exports: &[(String, &'static IoMetrics)],
    replicas: &[Arc<Replica>],
) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?.take(16 * 1024));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The headers are not needed; read them so the client sees a clean
    // close.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut conn = conn;
    let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => match render(node, exports, replicas) {
            Ok(text) => (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(_) => (
                "500 Internal Server Error",
                "text/plain",
                "encoding failed\n".into(),
            ),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_an_infinite_last_one() {
        let h = AtomicHistogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(25));
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_secs(20));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 20.000065).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (25e-6, 2));
        assert_eq!(buckets[1], (50e-6, 3));
        assert_eq!(buckets[BOUNDS_NS.len() - 1].1, 3);
        assert_eq!(buckets[BOUNDS_NS.len()], (f64::INFINITY, 4));
    }

    #[test]
    fn render_uses_the_openmetrics_encoder() {
        let io = IoMetrics::leak();
        io.record(Op::Write, 4096, true, Duration::from_micros(40));
        io.record(Op::Write, 4096, false, Duration::from_micros(40));
        let text = render("alpha", &[("r0".into(), io)], &[]).expect("render");
        assert!(
            text.contains("replblk_nbd_requests_total{resource=\"r0\",op=\"write\"} 2"),
            "{text}"
        );
        assert!(text.contains("replblk_nbd_bytes_total{resource=\"r0\",op=\"write\"} 8192"));
        assert!(text.contains("replblk_nbd_errors_total{resource=\"r0\",op=\"write\"} 1"));
        assert!(
            text.contains(
                "replblk_nbd_request_duration_seconds_bucket{le=\"0.00005\",resource=\"r0\",op=\"write\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE replblk_nbd_request_duration_seconds histogram"));
        assert!(text.trim_end().ends_with("# EOF"));
    }
}
