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
    let units = ["rmem-server", "rmem-coordinator", "rmem-agent", "rmem-kmod"];
    for unit in units {
        let mut text =
            std::fs::read_to_string(deploy().join(format!("systemd/{unit}.service"))).unwrap();
        if unit != "rmem-kmod" {
            bin(unit);
            // The units name the installed binary; verify checks it exists,
            // so point it at the one just built.
            let installed = format!("/usr/local/bin/{unit}");
            assert!(
                text.contains(&installed),
                "{unit}.service does not run {installed}"
            );
            text = text.replace(&installed, target_dir().join(unit).to_str().unwrap());
        }
        // The module's tools, where this host lacks them (a container has
        // no dkms): verify checks that every command exists.
        for tool in ["/usr/sbin/dkms", "/usr/sbin/depmod", "/usr/sbin/modprobe"] {
            if !Path::new(tool).exists() {
                text = text.replace(tool, "/bin/true");
            }
        }
        std::fs::write(dir.path().join(format!("{unit}.service")), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units.map(|u| dir.path().join(format!("{u}.service"))))
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Unknown keys are only warnings: any complaint about our units fails.
    assert!(!stderr.contains(".service"), "{stderr}");
}

#[test]
fn the_example_configs_pass_check_config() {
    for (daemon, args, file) in [
        ("rmem-server", &["--check-config"][..], "rmem-server.toml"),
        (
            "rmem-coordinator",
            &["--check-config"][..],
            "rmem-coordinator.toml",
        ),
        (
            "rmem-agent",
            &["serve", "--check-config"][..],
            "rmem-agent.toml",
        ),
    ] {
        let out = Command::new(bin(daemon))
            .args(args)
            .arg("--config")
            .arg(deploy().join(file))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{daemon} --check-config {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
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
