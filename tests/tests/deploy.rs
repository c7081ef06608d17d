//! What deploy/ ships, checked as operators use it: the systemd units pass
//! `systemd-analyze verify`, and the daemons speak the readiness protocol
//! their `Type=notify` units rely on.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rmem_tests::{Daemon, bin, target_dir};

fn deploy() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[test]
fn the_systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    for unit in ["rmem-server", "rmem-coordinator"] {
        bin(unit);
        // The units name the installed binary; verify checks it exists, so
        // point it at the one just built.
        let text =
            std::fs::read_to_string(deploy().join(format!("systemd/{unit}.service"))).unwrap();
        let installed = format!("/usr/local/bin/{unit}");
        assert!(
            text.contains(&installed),
            "{unit}.service does not run {installed}"
        );
        let built = target_dir().join(unit);
        std::fs::write(
            dir.path().join(format!("{unit}.service")),
            text.replace(&installed, built.to_str().unwrap()),
        )
        .unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("rmem-server.service"))
        .arg(dir.path().join("rmem-coordinator.service"))
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Unknown keys are only warnings: any complaint about our units fails.
    assert!(!stderr.contains(".service"), "{stderr}");
}

/// Starts `name` with NOTIFY_SOCKET pointing at a socket of the test's and
/// returns what it sent before and after SIGTERM.
fn notifications(name: &str, args: &[&str]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // SAFETY: set before any thread of this test reads the environment;
    // the variable is inherited by the daemon spawned next.
    unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
    let mut d = Daemon::spawn(name, args);
    // SAFETY: as above; the child has its copy.
    unsafe { std::env::remove_var("NOTIFY_SOCKET") };
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("no readiness notification");
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    d.signal(libc::SIGTERM);
    let n = sock.recv(&mut buf).expect("no stopping notification");
    let stopping = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(d.wait(Duration::from_secs(30)).is_some_and(|s| s.success()));
    (ready, stopping)
}

#[test]
fn the_daemons_notify_readiness_and_stopping() {
    let (r, s) = notifications(
        "rmem-server",
        &[
            "--log-format",
            "json",
            "--listen",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--capacity",
            "8MiB",
        ],
    );
    assert_eq!((r.as_str(), s.as_str()), ("READY=1", "STOPPING=1"));
    let (r, s) = notifications(
        "rmem-coordinator",
        &[
            "--log-format",
            "json",
            "--listen",
            "127.0.0.1:0",
            "--ephemeral",
        ],
    );
    assert_eq!((r.as_str(), s.as_str()), ("READY=1", "STOPPING=1"));
}
