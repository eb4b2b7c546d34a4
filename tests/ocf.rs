//! The OCF resource agent (`tools/ocf/replblk`) checked by `ocf-tester`
//! (package resource-agents) against a real pair: alpha's repld is
//! started, promoted, demoted and stopped by the agent, beta's by the
//! harness. Every process is stopped by PID and the directories removed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::pair::{Pair, ALPHA};
use common::run_tool;

/// Kills a repld the agent left running (by the PID in its pidfile).
struct PidFile(PathBuf);

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill(2) on the repld this test had the agent start.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/ocf/replblk")
}

fn agent_env(cmd: &mut Command, params: &[(&str, String)], action: &str) {
    cmd.arg(action).env("OCF_ROOT", "/usr/lib/ocf");
    for (k, v) in params {
        cmd.env(format!("OCF_RESKEY_{k}"), v);
    }
}

#[test]
fn the_agent_passes_ocf_tester_and_reports_roles_with_ocf_codes() {
    let mut pair = Pair::builder().start();
    pair.ok(ALPHA, &["demote", "r0"]);
    pair.stop(ALPHA);
    let dir = pair.dir.path().to_owned();
    let pidfile = dir.join("agent.pid");
    let _guard = PidFile(pidfile.clone());
    let params = [
        ("resource", "r0".to_string()),
        ("config", pair.alpha().config.display().to_string()),
        ("node", ALPHA.to_string()),
        ("repld", env!("CARGO_BIN_EXE_repld").to_string()),
        ("replctl", env!("CARGO_BIN_EXE_replctl").to_string()),
        ("logfile", dir.join("agent.log").display().to_string()),
        ("pidfile", pidfile.display().to_string()),
    ];
    let mut cmd = Command::new("ocf-tester");
    cmd.arg("-v").arg("-n").arg("replblk-test");
    for (k, v) in &params {
        cmd.arg("-o").arg(format!("{k}={v}"));
    }
    cmd.arg(agent());
    let (ok, out, err) = run_tool(&mut cmd);
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    assert!(
        ok,
        "ocf-tester failed:\n{out}\n{err}\n--- repld log:\n{log}"
    );
    assert!(out.contains("passed all tests"), "{out}");
    assert!(
        out.contains("Testing: promote"),
        "the promotable actions ran: {out}"
    );

    // The exit codes the cluster relies on, one by one.
    let run = |action: &str| {
        let mut c = Command::new(agent());
        agent_env(&mut c, &params, action);
        let out = c.output().expect("agent");
        let code = out.status.code();
        if !matches!(code, Some(0 | 7 | 8)) {
            eprintln!(
                "agent {action}: {code:?}\n{}{}\n--- repld log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
            );
        }
        code
    };
    assert_eq!(run("monitor"), Some(7), "stopped");
    assert_eq!(run("start"), Some(0));
    assert_eq!(run("monitor"), Some(0), "Secondary");
    assert_eq!(run("promote"), Some(0));
    assert_eq!(run("monitor"), Some(8), "Primary");
    // The peer is Primary: the agent's promote on beta (whose repld the
    // harness runs; the agent finds it through a pidfile) fails at once,
    // cleanly, without retrying.
    let beta_pidfile = dir.join("beta-agent.pid");
    std::fs::write(
        &beta_pidfile,
        pair.beta().pid().expect("beta runs").to_string(),
    )
    .expect("pidfile");
    let mut beta_params = params.clone();
    beta_params[1].1 = pair.beta().config.display().to_string();
    beta_params[2].1 = "beta".into();
    beta_params[6].1 = beta_pidfile.display().to_string();
    let mut c = Command::new(agent());
    agent_env(&mut c, &beta_params, "monitor");
    assert_eq!(c.status().expect("agent").code(), Some(0), "beta Secondary");
    let started = std::time::Instant::now();
    let mut c = Command::new(agent());
    agent_env(&mut c, &beta_params, "promote");
    let out = c.output().expect("agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("promote refused: the peer is Primary"),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "refused only after {:?}",
        started.elapsed()
    );
    std::fs::remove_file(&beta_pidfile).expect("rm");
    assert_eq!(run("demote"), Some(0));
    assert_eq!(run("monitor"), Some(0));
    assert_eq!(run("stop"), Some(0));
    assert_eq!(run("monitor"), Some(7));
    assert_eq!(run("stop"), Some(0), "stop is idempotent");
    // A resource the config does not have is a configuration error.
    let mut c = Command::new(agent());
    let mut bad = params.clone();
    bad[0].1 = "nope".into();
    agent_env(&mut c, &bad, "validate-all");
    let (ok, _, err) = run_tool(&mut c);
    assert!(!ok, "validate-all accepted a missing resource");
    assert!(err.contains("no resource nope"), "{err}");
}
