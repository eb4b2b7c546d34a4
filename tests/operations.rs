//! Operations: `repld --check-config` on good and bad files, and the
//! shipped systemd unit checked by `systemd-analyze verify` (when the
//! machine has it).

mod common;

use std::path::Path;
use std::process::Command;

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
