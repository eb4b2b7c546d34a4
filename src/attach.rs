//! `replctl attach`: the kernel's NBD client that follows the Primary.
//!
//! The tool performs the NBD handshake itself, hands the connected socket
//! to the kernel with `NBD_CMD_CONNECT` (with a per-request timeout and a
//! dead-connection timeout), and stays running: when the kernel reports
//! the link dead (`NBD_CMD_LINK_DEAD`), it finds the node that is Primary
//! now by handshaking with all listed addresses at once (the first that
//! admits us wins; Secondaries refuse, naming the Primary, which the tool
//! logs if that address is missing from its list) and gives the kernel
//! the new socket with `NBD_CMD_RECONFIGURE`. Meanwhile the kernel holds
//! the block I/O and re-sends what was in flight on the dead link (once
//! those requests reach their timeout), so applications see a pause, not
//! an error. This relies on two properties of replblk: the new
//! Primary holds every write the old one acknowledged (protocol C), and a
//! request executed twice (sent, executed, the reply lost, sent again) is
//! harmless for WRITE, TRIM and WRITE_ZEROES at the same offset.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::nbd::client::{self, ExportInfo};
use crate::nbd::netlink::{self, ConnectParams, NbdNetlink, NetlinkError};

/// The default NBD port.
pub const NBD_PORT: u16 = 10809;

/// What `nbd://HOST:PORT,HOST2:PORT/EXPORT` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` each, in the order given.
    pub hosts: Vec<String>,
    pub export: String,
}

/// Parses `nbd://HOST[:PORT][,HOST[:PORT]...]/EXPORT` (IPv6 hosts in
/// brackets; the port defaults to 10809).
pub fn parse_uri(uri: &str) -> Result<Target, String> {
    let rest = uri
        .strip_prefix("nbd://")
        .ok_or_else(|| format!("{uri:?}: expected nbd://HOST:PORT[,HOST:PORT...]/EXPORT"))?;
    let (hosts, export) = rest.split_once('/').unwrap_or((rest, ""));
    let mut out = Vec::new();
    for h in hosts.split(',') {
        if h.is_empty() {
            return Err(format!("{uri:?}: empty host in the address list"));
        }
        let has_port = if let Some(close) = h.rfind(']') {
            if !h.starts_with('[') {
                return Err(format!("{uri:?}: bad IPv6 host {h:?}"));
            }
            h[close + 1..].starts_with(':')
        } else {
            if h.matches(':').count() > 1 {
                return Err(format!("{uri:?}: IPv6 host {h:?} needs brackets"));
            }
            h.contains(':')
        };
        if has_port {
            let port = &h[h.rfind(':').expect("has a colon") + 1..];
            if port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(format!("{uri:?}: bad port in {h:?}"));
            }
            out.push(h.to_owned());
        } else {
            out.push(format!("{h}:{NBD_PORT}"));
        }
    }
    Ok(Target {
        hosts: out,
        export: export.to_owned(),
    })
}

/// What a Secondary's refusal says about the Primary: "... connect to
/// the Primary, NODE" or "... connect to the Primary, NODE (nbd ADDR)".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    pub node: String,
    pub nbd: Option<String>,
}

pub fn primary_named(message: &str) -> Option<Hint> {
    let (_, rest) = message.split_once("connect to the Primary, ")?;
    let node = rest.split([' ', ',', ';', '(']).next()?.trim();
    if node.is_empty() {
        return None;
    }
    let nbd = rest
        .split_once("(nbd ")
        .and_then(|(_, a)| a.split_once(')'))
        .map(|(a, _)| a.trim().to_owned());
    Some(Hint {
        node: node.to_owned(),
        nbd,
    })
}

#[derive(Debug, Clone)]
pub struct Options {
    pub index: u32,
    pub block_size: u64,
    /// Kernel per-request timeout: requests unanswered this long on a dead
    /// link are re-sent on the next socket.
    pub timeout: Duration,
    /// How long the kernel holds I/O while no link is up.
    pub dead_conn_timeout: Duration,
    /// Limit for TCP connect plus handshake, per address.
    pub connect_timeout: Duration,
    /// Pause between two rounds over the address list.
    pub retry_interval: Duration,
    /// Where the attach process writes its PID (for `replctl detach`).
    pub pid_file: Option<PathBuf>,
}

/// One successful dial.
pub struct Dialed {
    pub stream: TcpStream,
    pub info: ExportInfo,
    pub addr: SocketAddr,
    pub host: String,
}

/// Connects and handshakes with every listed host at once; the first that
/// admits us wins (the others' connections are closed as they finish), so
/// a silent address costs nothing while another answers. Returns the
/// failures, in list order, if none admits us.
pub fn dial(target: &Target, opts: &Options) -> Result<Dialed, Vec<String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, host) in target.hosts.iter().enumerate() {
        let (tx, host, export, opts) = (
            tx.clone(),
            host.clone(),
            target.export.clone(),
            opts.clone(),
        );
        // Each attempt ends within the connect timeout.
        std::thread::spawn(move || {
            let r = dial_one(&host, &export, &opts).map_err(|e| format!("{host}: {e:#}"));
            let _ = tx.send((i, r));
        });
    }
    drop(tx);
    let mut errors = vec![None; target.hosts.len()];
    for (i, r) in rx {
        match r {
            Ok(d) => return Ok(d),
            Err(e) => errors[i] = Some(e),
        }
    }
    Err(errors.into_iter().flatten().collect())
}

/// Primaries that refusals name by an NBD address missing from `hosts`
/// (worth telling the operator: the list may be out of date).
pub fn unlisted_primaries(errors: &[String], hosts: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for e in errors {
        if let Some(Hint {
            node,
            nbd: Some(addr),
        }) = primary_named(e)
        {
            if !hosts.contains(&addr) && !out.iter().any(|o: &String| o.contains(&addr)) {
                out.push(format!("{node} ({addr})"));
            }
        }
    }
    out
}

fn dial_one(host: &str, export: &str, opts: &Options) -> Result<Dialed> {
    let addrs: Vec<SocketAddr> = host
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .collect();
    let mut last = None;
    for addr in addrs {
        match try_addr(addr, export, opts) {
            Ok((stream, info)) => {
                return Ok(Dialed {
                    stream,
                    info,
                    addr,
                    host: host.to_owned(),
                })
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("{host} resolves to no address")))
}

fn try_addr(addr: SocketAddr, export: &str, opts: &Options) -> Result<(TcpStream, ExportInfo)> {
    let mut stream = TcpStream::connect_timeout(&addr, opts.connect_timeout)?;
    stream.set_read_timeout(Some(opts.connect_timeout))?;
    stream.set_write_timeout(Some(opts.connect_timeout))?;
    stream.set_nodelay(true)?;
    let info = client::handshake(&mut stream, export)?;
    // The kernel does its own timing from here on.
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok((stream, info))
}

fn log(msg: impl AsRef<str>) {
    eprintln!("replctl attach: {}", msg.as_ref());
}

/// The default PID file of the attach process for `/dev/nbdINDEX`.
pub fn default_pid_file(index: u32) -> PathBuf {
    PathBuf::from(format!("/run/replblk/attach-nbd{index}.pid"))
}

struct PidFile(Option<PathBuf>);

impl PidFile {
    fn create(path: Option<&Path>) -> Result<PidFile> {
        let Some(path) = path else {
            return Ok(PidFile(None));
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(PidFile(Some(path.to_owned())))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Attaches `/dev/nbdINDEX` and follows the Primary until the device is
/// disconnected (`replctl detach`) or `stop` is set (SIGTERM/SIGINT; the
/// device then stays attached, no longer followed).
pub fn run(target: &Target, opts: &Options, stop: &AtomicBool) -> Result<()> {
    let mut nl = NbdNetlink::open()?;
    // Subscribe before connecting so no event is missed.
    let mut events = nl.subscribe()?;
    let first = dial(target, opts).map_err(|errors| {
        anyhow::anyhow!(
            "no node admitted us to export {:?}:\n  {}",
            target.export,
            errors.join("\n  ")
        )
    })?;
    let size = first.info.size;
    let params = ConnectParams {
        index: opts.index,
        size,
        block_size: opts.block_size,
        server_flags: u64::from(first.info.flags),
        client_flags: 0,
        timeout: opts.timeout,
        dead_conn_timeout: opts.dead_conn_timeout,
        backend: format!("replblk:{}", target.export),
    };
    let backend = params.backend.clone();
    let fd = first.stream.as_raw_fd();
    let index = match nl.connect(&params, &[fd]) {
        Ok(index) => index,
        // A device this tool attached to the same export before (its
        // attach process died or was restarted): follow it again. The
        // link may have died meanwhile, unseen: offer the kernel the new
        // socket (it keeps a live link and drops the socket otherwise).
        Err(NetlinkError::Kernel { err, .. })
            if err.raw_os_error() == Some(libc::EBUSY)
                && device_backend(opts.index).as_deref() == Some(backend.as_str()) =>
        {
            log(format!(
                "/dev/nbd{} is already attached to {backend}; adopting it",
                opts.index
            ));
            nl.reconfigure(opts.index, &backend, &[fd])
                .with_context(|| format!("adopting /dev/nbd{}", opts.index))?;
            opts.index
        }
        Err(e) => {
            return Err(e).with_context(|| format!("attaching /dev/nbd{}", opts.index));
        }
    };
    // The kernel holds its own reference to the socket.
    drop(first.stream);
    let _pid = PidFile::create(opts.pid_file.as_deref())?;
    log(format!(
        "/dev/nbd{index} attached to {} ({}, {size} bytes); following the Primary over {}",
        first.host,
        first.addr,
        target.hosts.join(", ")
    ));

    while !stop.load(Ordering::Relaxed) {
        let evs = events.wait(Duration::from_secs(1))?;
        let dead = evs
            .iter()
            .any(|(c, i)| *c == netlink::cmd::LINK_DEAD && *i == Some(index));
        if !dead {
            match nl.status(index)? {
                Some(true) => continue,
                _ => {
                    log(format!("/dev/nbd{index} is disconnected; exiting"));
                    return Ok(());
                }
            }
        }
        let died = Instant::now();
        log(format!(
            "/dev/nbd{index}: link dead; looking for the Primary"
        ));
        let mut rounds = 0u64;
        loop {
            if stop.load(Ordering::Relaxed) {
                log("stopped while reconnecting; the device stays attached but is not followed");
                return Ok(());
            }
            match dial(target, opts) {
                Ok(d) if d.info.size != size => {
                    log(format!(
                        "{} ({}) exports {} bytes, not {size}; not using it",
                        d.host, d.addr, d.info.size
                    ));
                }
                Ok(d) => match nl.reconfigure(index, &backend, &[d.stream.as_raw_fd()]) {
                    Ok(()) => {
                        log(format!(
                            "/dev/nbd{index} reconnected to {} ({}) {} ms after the link died",
                            d.host,
                            d.addr,
                            died.elapsed().as_millis()
                        ));
                        break;
                    }
                    Err(e) if rounds.is_multiple_of(10) => {
                        log(format!("NBD_CMD_RECONFIGURE with {}: {e}", d.addr))
                    }
                    Err(_) => {}
                },
                Err(errors) => {
                    // Every tenth round, so a long outage does not flood.
                    if rounds.is_multiple_of(10) {
                        log(format!("no Primary yet:\n  {}", errors.join("\n  ")));
                        for p in unlisted_primaries(&errors, &target.hosts) {
                            log(format!(
                                "a refusal names the Primary {p}, which is not in the address list"
                            ));
                        }
                    }
                }
            }
            if nl.status(index)? != Some(true) {
                log(format!("/dev/nbd{index} is disconnected; exiting"));
                return Ok(());
            }
            rounds += 1;
            std::thread::sleep(opts.retry_interval);
        }
    }
    log(format!(
        "stopped; /dev/nbd{index} stays attached but is no longer followed"
    ));
    Ok(())
}

/// The backend identifier of a connected `/dev/nbdINDEX` (sysfs).
fn device_backend(index: u32) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/backend"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// `replctl detach`: `NBD_CMD_DISCONNECT`, then stops the attach process
/// named in the PID file if it still runs.
pub fn detach(index: u32, pid_file: &Path) -> Result<()> {
    let mut nl = NbdNetlink::open()?;
    match nl.status(index)? {
        Some(true) => {}
        Some(false) => bail!("/dev/nbd{index} is not connected"),
        None => bail!("the kernel has no /dev/nbd{index}"),
    }
    nl.disconnect(index)
        .with_context(|| format!("disconnecting /dev/nbd{index}"))?;
    if let Ok(text) = std::fs::read_to_string(pid_file) {
        if let Ok(pid) = text.trim().parse::<i32>() {
            if pid > 0 && is_attach_process(pid) {
                // SAFETY: kill(2) on a PID read from our own PID file,
                // checked to be a replctl process.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
    Ok(())
}

fn is_attach_process(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let s = String::from_utf8_lossy(&c);
            s.contains("replctl") && s.contains("attach")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let t = parse_uri("nbd://alpha:10809,beta:10810/r0").unwrap();
        assert_eq!(t.hosts, vec!["alpha:10809", "beta:10810"]);
        assert_eq!(t.export, "r0");
        let t = parse_uri("nbd://alpha,[::1]:7000,[fe80::1]/").unwrap();
        assert_eq!(
            t.hosts,
            vec!["alpha:10809", "[::1]:7000", "[fe80::1]:10809"]
        );
        assert_eq!(t.export, "");
        assert!(parse_uri("nbd://a:0/r0").is_err());
        assert!(parse_uri("nbd://a:x/r0").is_err());
        assert!(parse_uri("nbd://a,,b/r0").is_err());
        assert!(parse_uri("nbd://::1/r0").is_err());
        assert!(parse_uri("http://a/r0").is_err());
    }

    #[test]
    fn refusal_names_the_primary() {
        let m =
            "resource r0 is Secondary on node alpha (disk UpToDate); connect to the Primary, beta";
        let hint = |node: &str, nbd: Option<&str>| Hint {
            node: node.into(),
            nbd: nbd.map(str::to_owned),
        };
        assert_eq!(primary_named(m), Some(hint("beta", None)));
        let m = "resource r0 is Secondary on node alpha (disk UpToDate); \
                 connect to the Primary, beta (nbd 10.0.0.2:10809)";
        assert_eq!(primary_named(m), Some(hint("beta", Some("10.0.0.2:10809"))));
        assert_eq!(primary_named("no node is Primary; promote one"), None);
    }

    #[test]
    fn refusals_naming_an_unlisted_primary_are_reported_once() {
        let hosts = vec!["10.0.0.1:10809".to_owned(), "10.0.0.2:10809".to_owned()];
        let listed = "10.0.0.1:10809: server refused export \"r0\" (NBD_REP_ERR_POLICY): \
                      resource r0 is Secondary on node a (disk UpToDate); \
                      connect to the Primary, b (nbd 10.0.0.2:10809)";
        assert!(unlisted_primaries(&[listed.to_owned()], &hosts).is_empty());
        let moved = listed.replace("10.0.0.2:10809)", "10.0.0.9:10809)");
        assert_eq!(
            unlisted_primaries(&[moved.clone(), moved], &hosts),
            vec!["b (10.0.0.9:10809)"]
        );
    }

    fn opts() -> Options {
        Options {
            index: 0,
            block_size: 512,
            timeout: Duration::from_secs(5),
            dead_conn_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(2),
            retry_interval: Duration::from_millis(100),
            pid_file: None,
        }
    }

    #[test]
    fn dial_reports_every_host_that_failed() {
        // Two ports nobody listens on (bound, then released).
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let target = Target {
            hosts: ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
            export: "r0".into(),
        };
        let errors = dial(&target, &opts()).err().expect("nothing listens");
        assert_eq!(errors.len(), 2);
        assert!(errors[0].contains(&ports[0].to_string()), "{errors:?}");
    }
}
