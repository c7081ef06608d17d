//! Harness for rmem's integration tests.
//!
//! - [`bin`] builds (once per test process) and locates a workspace binary,
//!   so `cargo test` always runs the current code.
//! - [`Daemon`] runs a binary as a child process that is killed when the
//!   handle drops or the test process dies, parses its JSON log lines, and
//!   can be stopped with SIGTERM or killed with SIGKILL on purpose.
//! - [`wait_until`] polls a condition with a deadline instead of sleeping.
//! - [`netns`]: hosts with their own network stacks (network namespaces on
//!   a private bridge) whose links can be cut.
//! - [`suite`]: the case runner of the suites that run inside QEMU guests.

pub mod metrics;
pub mod netns;
pub mod pki;
pub mod suite;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Directory of the profile this test binary was built with
/// (`target/debug` or `target/release`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Path of workspace binary `name`. The first call in a test process runs
/// `cargo build --workspace --bins` with the tests' profile (a no-op when
/// they are current), so tests never run a stale binary.
///
/// With `RMEM_BIN_DIR` set (e.g. inside a VM guest, where there is no cargo)
/// the binaries are taken from that directory as they are.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("RMEM_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--workspace", "--bins"]);
        // The daemons this test build was made with: with RDMA when the
        // tests have it (`cargo test --all-features`), so the binaries are
        // the ones already built rather than rebuilt without it.
        if cfg!(feature = "rdma") {
            cmd.arg("--all-features");
        }
        if target_dir().ends_with("release") {
            cmd.arg("--release");
        }
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
        // Not the variables cargo sets for this test process: build scripts
        // that watch them (ring's watches CARGO_MANIFEST_DIR) would make
        // this build differ from `cargo build`'s and rebuild half the tree.
        for (k, _) in std::env::vars_os() {
            if let Some(k) = k.to_str()
                && [
                    "CARGO_MANIFEST_",
                    "CARGO_PKG_",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "OUT_DIR",
                ]
                .iter()
                .any(|p| k.starts_with(p))
            {
                cmd.env_remove(k);
            }
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
    });
    let path = target_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// `rmemctl ARGS` on this host: its standard output, failing the test if
/// it fails.
pub fn rmemctl_ok(args: &[&str]) -> String {
    let out = Command::new(bin("rmemctl"))
        .args(args)
        .output()
        .expect("rmemctl runs");
    assert!(
        out.status.success(),
        "rmemctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `cond` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A daemon running as a child process.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Option<Child>,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Daemon {
    /// Starts workspace binary `name` with `args`. Its stderr must carry
    /// JSON log lines (pass `--log-format json`).
    pub fn spawn(name: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new(bin(name));
        cmd.args(args);
        Self::spawn_command(name, cmd)
    }

    /// Starts workspace binary `name` inside network namespace `netns`.
    pub fn spawn_in(netns: &str, name: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns]).arg(bin(name)).args(args);
        Self::spawn_command(name, cmd)
    }

    /// Starts `program` (not a workspace binary: a real component such as
    /// etcd) inside network namespace `netns`, labelled `name`.
    pub fn spawn_program_in(netns: &str, name: &str, program: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, program]).args(args);
        Self::spawn_command(name, cmd)
    }

    /// Starts `program` (not a workspace binary: a real component such as
    /// etcd) with `args`, labelled `name`.
    pub fn spawn_program(name: &str, program: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Self::spawn_command(name, cmd)
    }

    fn spawn_command(name: &str, mut cmd: Command) -> Self {
        cmd
            // RMEM_TEST_RUST_LOG=debug shows more when debugging a test.
            .env(
                "RUST_LOG",
                std::env::var("RMEM_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let die_with_parent = || {
            // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and reads
            // no memory; the kernel kills the child if this test process
            // dies without running destructors.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the closure only makes one async-signal-safe syscall, as
        // pre_exec requires between fork and exec.
        unsafe { cmd.pre_exec(die_with_parent) };
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = logs.clone();
        let label = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("RMEM_TEST_ECHO").is_some() {
                    eprintln!("[{label}] {line}");
                }
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(v);
            }
        });
        Self {
            name: name.to_string(),
            child: Some(child),
            logs,
        }
    }

    /// The first log line whose message is `message`, waiting up to
    /// `timeout` for it.
    pub fn wait_for_log(&self, message: &str, timeout: Duration) -> Option<serde_json::Value> {
        let mut found = None;
        wait_until(timeout, || {
            found = self.find_log(message);
            found.is_some()
        });
        found
    }

    /// The first log line with this message so far.
    pub fn find_log(&self, message: &str) -> Option<serde_json::Value> {
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.iter()
            .find(|v| v["fields"]["message"] == message)
            .cloned()
    }

    /// Every log line with this message so far.
    pub fn logs_with(&self, message: &str) -> Vec<serde_json::Value> {
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.iter()
            .filter(|v| v["fields"]["message"] == message)
            .cloned()
            .collect()
    }

    /// Every raw stderr line so far (JSON or not), for failure messages.
    pub fn log_text(&self) -> String {
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.iter().map(|v| format!("{v}\n")).collect()
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(r, 0, "kill {} failed", self.name);
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// The process id, while it runs.
    pub fn process_id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the running process (`VmRSS` of
    /// `/proc/PID/status`), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.process_id().expect("the daemon is running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
    }

    /// SIGTERM, then waits for a graceful exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(timeout)
            .unwrap_or_else(|| panic!("{} did not exit after SIGTERM", self.name))
    }

    /// SIGKILL: an unclean stop.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `rmem-server`.
#[derive(Debug)]
pub struct ServerProcess {
    pub daemon: Daemon,
    pub data: SocketAddr,
    pub grpc: SocketAddr,
}

impl ServerProcess {
    /// Starts `rmem-server` with extra `args` (on ephemeral loopback ports
    /// unless `args` name `--listen` / `--grpc`) and waits until it is ready.
    pub fn start(args: &[&str]) -> Self {
        let mut all = vec!["--log-format", "json"];
        for (flag, default) in [("--listen", "127.0.0.1:0"), ("--grpc", "127.0.0.1:0")] {
            if !args.contains(&flag) {
                all.extend([flag, default]);
            }
        }
        all.extend_from_slice(args);
        let daemon = Daemon::spawn("rmem-server", &all);
        let ready = daemon
            .wait_for_log("memory server ready", Duration::from_secs(30))
            .unwrap_or_else(|| panic!("rmem-server did not become ready:\n{}", daemon.log_text()));
        let addr = |k: &str| -> SocketAddr {
            ready["fields"][k]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no {k} address in {ready}"))
        };
        Self {
            data: addr("data"),
            grpc: addr("grpc"),
            daemon,
        }
    }

    /// Starts a server of `capacity` that joins the cluster of
    /// `coordinator` as `name`.
    pub fn join(coordinator: &str, name: &str, capacity: &str) -> Self {
        Self::start(&[
            "--capacity",
            capacity,
            "--coordinator",
            coordinator,
            "--name",
            name,
        ])
    }

    /// Client settings for this server.
    pub fn client_config(&self) -> rmem_client::ClientConfig {
        rmem_client::ClientConfig::new(self.data.to_string())
    }
}

/// Pages each of `servers` holds now.
pub fn used(servers: &[ServerProcess]) -> Vec<u64> {
    servers
        .iter()
        .map(|s| {
            rmem_client::BlockingConnection::connect(&s.client_config())
                .unwrap()
                .stat()
                .unwrap()
                .used_pages
        })
        .collect()
}

/// The servers' use once the agents have stopped moving pages: the same
/// reading three times in a row, 300 ms apart (at most 30 s).
pub fn settled(servers: &[ServerProcess]) -> Vec<u64> {
    let mut last = used(servers);
    let mut same = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while same < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let now = used(servers);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// A running `rmem-coordinator` (ephemeral state, loopback).
#[derive(Debug)]
pub struct CoordinatorProcess {
    pub daemon: Daemon,
    pub addr: SocketAddr,
}

impl CoordinatorProcess {
    /// Starts `rmem-coordinator --ephemeral` on an ephemeral loopback port
    /// (unless `args` give `--listen`) with extra `args` and waits until it
    /// is ready.
    pub fn start(args: &[&str]) -> Self {
        let mut all = vec!["--log-format", "json", "--ephemeral"];
        if !args.contains(&"--listen") {
            all.extend(["--listen", "127.0.0.1:0"]);
        }
        all.extend_from_slice(args);
        let daemon = Daemon::spawn("rmem-coordinator", &all);
        let ready = daemon
            .wait_for_log("coordinator ready", Duration::from_secs(30))
            .unwrap_or_else(|| panic!("coordinator did not start:\n{}", daemon.log_text()));
        let addr = ready["fields"]["addr"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no address in {ready}"));
        Self { daemon, addr }
    }
}

/// A real etcd (Debian's `etcd-server`, installed by tests/run.sh), one
/// member on loopback ports of its own, its data in a temporary directory.
#[derive(Debug)]
pub struct Etcd {
    pub daemon: Daemon,
    /// Its client URL, `http://127.0.0.1:PORT` (`https://` with TLS).
    pub url: String,
    /// With TLS: the CA and a client certificate etcd accepts.
    pub tls: Option<EtcdTls>,
    _dir: tempfile::TempDir,
}

/// How a client reaches an etcd started with [`Etcd::start_tls`].
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: std::path::PathBuf,
    pub client: pki::Leaf,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Starts etcd serving clients over TLS only, and checking their
    /// certificates (`--client-cert-auth`), from a CA of its own.
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        assert!(
            Command::new("etcd").arg("--version").output().is_ok(),
            "etcd is not installed: tests/run.sh installs Debian's etcd-server"
        );
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port()
        };
        let (client, peer) = (free(), free());
        let dir = tempfile::tempdir().expect("temporary directory");
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let data = dir.path().join("data");
        let mut tls_args: Vec<String> = Vec::new();
        let tls = tls.then(|| {
            let pki = pki::Pki::new(dir.path());
            let server = pki.issue("etcd", &["IP:127.0.0.1"]);
            let client = pki.issue("rmem-coordinator", &[]);
            for (flag, path) in [
                ("--cert-file", &server.cert),
                ("--key-file", &server.key),
                ("--trusted-ca-file", &pki.ca()),
            ] {
                tls_args.push(flag.into());
                tls_args.push(path.to_str().expect("utf-8 path").into());
            }
            tls_args.push("--client-cert-auth".into());
            EtcdTls {
                ca: pki.ca(),
                client,
            }
        });
        let initial_cluster = format!("rmem-test={peer_url}");
        let mut args: Vec<&str> = tls_args.iter().map(String::as_str).collect();
        args.extend_from_slice(&[
            "--name",
            "rmem-test",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &initial_cluster,
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
            // As docs/DEPLOY.md asks of an etcd holding rmem's state.
            "--auto-compaction-mode",
            "revision",
            "--auto-compaction-retention",
            "1000",
        ]);
        let daemon = Daemon::spawn_program("etcd", "etcd", &args);
        let etcd = Self {
            daemon,
            url,
            tls,
            _dir: dir,
        };
        let healthy = wait_until(Duration::from_secs(30), || {
            etcd.etcdctl(&["endpoint", "health"])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        assert!(healthy, "etcd did not start:\n{}", etcd.daemon.log_text());
        etcd
    }

    /// An `etcdctl` command against this etcd (with its client
    /// certificate under TLS).
    fn etcdctl(&self, args: &[&str]) -> Command {
        let mut c = Command::new("etcdctl");
        c.arg("--endpoints").arg(&self.url);
        if let Some(t) = &self.tls {
            c.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client.cert)
                .arg("--key")
                .arg(&t.client.key);
        }
        c.args(args).env("ETCDCTL_API", "3");
        c
    }

    /// `etcdctl ARGS` against this etcd; its standard output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args).output().expect("etcdctl runs");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Deterministic page contents for (handle, version): every 8-byte word
/// differs, so a page mixed from two versions or two handles is detected.
pub fn pattern(handle: u64, version: u64) -> rmem_client::Page {
    let mut p = [0u8; rmem_client::PAGE_SIZE];
    let mut x = handle.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ version.rotate_left(32)
        ^ 0xD1B5_4A32_D192_ED03;
    for chunk in p.chunks_exact_mut(8) {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        chunk.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    p[..8].copy_from_slice(&handle.to_le_bytes());
    p[8..16].copy_from_slice(&version.to_le_bytes());
    p
}
