//! Operations: `repld --check-config` on good and bad files, and the
//! shipped systemd unit checked by `systemd-analyze verify` (when the
//! machine has it).

mod common;

use std::path::Path;
use std::process::Command;

use common::pair::{Pair, BETA};
use common::run_tool;

fn check(config: &Path, node: &str) -> (bool, String, String) {
    run_tool(
        Command::new(env!("CARGO_BIN_EXE_repld"))
            .arg("--check-config")
            .arg("--config")
            .arg(config)
            .arg("--node")
            .arg(node),
    )
}

fn pair_config(dir: &Path, extra: &str) -> String {
    let d = dir.display();
    format!(
        "[nbd]\nlisten = \"127.0.0.1:0\"\n[control]\nsocket = \"{d}/ctl\"\n\
         [[resource]]\nname = \"r0\"\nsecret = \"s\"\n{extra}\
         [resource.on.alpha]\ndisk = \"{d}/a.img\"\naddress = \"127.0.0.1:7001\"\n\
         [resource.on.beta]\ndisk = \"{d}/b.img\"\naddress = \"127.0.0.1:7002\"\n"
    )
}

#[test]
fn check_config_accepts_a_good_file_and_names_what_is_wrong_in_bad_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["a.img", "b.img"] {
        std::fs::File::create(dir.path().join(f))
            .and_then(|f| f.set_len(1 << 20))
            .expect("disk");
    }
    let path = dir.path().join("replblk.toml");
    std::fs::write(&path, pair_config(dir.path(), "")).expect("write");
    let (ok, out, err) = check(&path, "alpha");
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("valid for node alpha: 1 resource(s)"), "{out}");
    assert!(out.contains("replicated with beta"), "{out}");
    // Nothing was bound or created: the control socket does not exist.
    assert!(!dir.path().join("ctl").exists());

    let cases: &[(&str, &str, &str)] = &[
        (
            "fencing = \"resource-only\"\n",
            "alpha",
            "needs fence_peer_handler",
        ),
        ("colour = \"blue\"\n", "alpha", "unknown field `colour`"),
        ("", "gamma", "no [resource.on.gamma] table"),
        ("fence_timeout_ms = 0\n", "alpha", "fence_timeout_ms"),
    ];
    for (extra, node, want) in cases {
        std::fs::write(&path, pair_config(dir.path(), extra)).expect("write");
        let (ok, out, err) = check(&path, node);
        assert!(!ok, "{extra:?} on {node} was accepted: {out}");
        assert!(err.starts_with("repld: "), "{err}");
        assert!(err.contains(want), "{extra:?}: wanted {want:?} in {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
    // A missing disk.
    std::fs::write(&path, pair_config(dir.path(), "")).expect("write");
    std::fs::remove_file(dir.path().join("b.img")).expect("rm");
    let (ok, _, err) = check(&path, "beta");
    assert!(!ok);
    assert!(
        err.contains("b.img") && err.contains("No such file"),
        "{err}"
    );
    // A missing file.
    let (ok, _, err) = check(&dir.path().join("nope.toml"), "alpha");
    assert!(!ok);
    assert!(err.contains("cannot read config file"), "{err}");
}

#[test]
fn systemd_unit_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/systemd/repld.service");
    let text = std::fs::read_to_string(&unit).expect("unit");
    assert!(text.contains("ExecStartPre=/usr/local/sbin/repld --check-config"));
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed: only the unit's text was checked");
        return;
    }
    // verify wants the binaries to exist: point them at the built one.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("repld.service");
    std::fs::write(
        &copy,
        text.replace("/usr/local/sbin/repld", env!("CARGO_BIN_EXE_repld")),
    )
    .expect("write");
    let (ok, out, err) = run_tool(Command::new("systemd-analyze").arg("verify").arg(&copy));
    assert!(ok, "systemd-analyze verify failed:\n{out}\n{err}");
    assert!(
        !err.contains("repld.service:"),
        "systemd-analyze complained about the unit:\n{err}"
    );
}

fn curl(url: &str) -> (bool, String) {
    let (ok, out, err) =
        run_tool(Command::new("curl").args(["-sS", "-f", "--max-time", "10", url]));
    (ok, format!("{out}{err}"))
}

/// The value of the sample `line_start` (metric name and labels) in a
/// scrape, if present.
fn sample(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start) && l[line_start.len()..].starts_with(' '))
        .and_then(|l| l[line_start.len()..].trim().parse().ok())
}

#[test]
fn prometheus_metrics_are_served_to_a_real_http_client() {
    let pair = Pair::builder().metrics().start();
    let alpha = pair.alpha().metrics_addr.expect("metrics address");
    let url = format!("http://{alpha}/metrics");
    let (ok, out, err) = run_tool(Command::new("qemu-io").args([
        "-f",
        "raw",
        &pair.primary_uri(),
        "-c",
        "write -P 0x7e 0 1M",
        "-c",
        "read -P 0x7e 0 1M",
        "-c",
        "flush",
    ]));
    assert!(ok && !out.contains("fail"), "{out}{err}");

    // The replication round trip appears once a keepalive was answered.
    let deadline = std::time::Instant::now() + common::WAIT;
    let text = loop {
        let (ok, text) = curl(&url);
        assert!(ok, "curl {url}: {text}");
        if text.contains("replblk_replication_rtt_seconds{resource=\"r0\"}") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "no rtt in:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let r = |s: &str| sample(&text, s).unwrap_or_else(|| panic!("no {s} in:\n{text}"));
    assert!(r("replblk_nbd_requests_total{resource=\"r0\",op=\"write\"}") >= 1.0);
    assert!(r("replblk_nbd_bytes_total{resource=\"r0\",op=\"write\"}") >= 1048576.0);
    assert!(r("replblk_nbd_bytes_total{resource=\"r0\",op=\"read\"}") >= 1048576.0);
    assert!(r("replblk_nbd_requests_total{resource=\"r0\",op=\"flush\"}") >= 1.0);
    assert_eq!(
        r("replblk_nbd_errors_total{resource=\"r0\",op=\"write\"}"),
        0.0
    );
    assert!(r("replblk_nbd_request_duration_seconds_count{resource=\"r0\",op=\"write\"}") >= 1.0);
    assert_eq!(r("replblk_role{resource=\"r0\",role=\"Primary\"}"), 1.0);
    assert_eq!(
        r("replblk_connection_state{resource=\"r0\",state=\"Connected\"}"),
        1.0
    );
    assert_eq!(
        r("replblk_disk_state{resource=\"r0\",state=\"UpToDate\"}"),
        1.0
    );
    assert_eq!(
        r("replblk_peer_disk_state{resource=\"r0\",state=\"UpToDate\"}"),
        1.0
    );
    assert_eq!(r("replblk_out_of_sync_bytes{resource=\"r0\"}"), 0.0);
    assert_eq!(r("replblk_io_frozen{resource=\"r0\"}"), 0.0);
    assert!(r("replblk_replication_rtt_seconds{resource=\"r0\"}") > 0.0);
    assert!(text.contains("# TYPE replblk_nbd_request_duration_seconds histogram"));
    assert!(text.trim_end().ends_with("# EOF"));

    // The Secondary reports its own role; out-of-sync bytes show on the
    // Primary once the peer is gone.
    let beta = pair.beta().metrics_addr.expect("metrics address");
    let (ok, btext) = curl(&format!("http://{beta}/metrics"));
    assert!(ok, "{btext}");
    assert_eq!(
        sample(&btext, "replblk_role{resource=\"r0\",role=\"Secondary\"}"),
        Some(1.0)
    );
    pair.ok(BETA, &["disconnect", "r0"]);
    let (ok, out, err) = run_tool(Command::new("qemu-io").args([
        "-f",
        "raw",
        &pair.primary_uri(),
        "-c",
        "write -P 0x7f 4M 64k",
    ]));
    assert!(ok && !out.contains("fail"), "{out}{err}");
    let (_, text) = curl(&url);
    assert_eq!(
        sample(&text, "replblk_out_of_sync_bytes{resource=\"r0\"}"),
        Some(65536.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "replblk_connection_state{resource=\"r0\",state=\"Connected\"}"
        ),
        Some(0.0)
    );
    // Anything but GET /metrics.
    let (ok, text) = curl(&format!("http://{alpha}/other"));
    assert!(!ok && text.contains("404"), "{text}");
}
