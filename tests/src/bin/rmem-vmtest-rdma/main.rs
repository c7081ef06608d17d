//! The soft-RoCE suite, run inside three QEMU guests by `tests/vm/run.sh rdma`.
//!
//! The guests share one private Ethernet segment (10.0.0.0/24, a multicast
//! socket on the host's loopback) and each has an rxe device, `rxe0`, on its
//! `eth0`:
//!
//! | guest | address  | role                                             |
//! |-------|----------|--------------------------------------------------|
//! | 1     | 10.0.0.1 | node daemon (coordinator and memory server A)   |
//! | 2     | 10.0.0.2 | node daemon (memory server B)                    |
//! | 3     | 10.0.0.3 | node daemon and this driver (agent and clients)  |
//!
//! Two modes of this one binary:
//!
//! - `--role node --listen 10.0.0.N:7999` is the command daemon that lets the
//!   driver run programs on a guest.
//! - `--role driver` waits for the three daemons, runs the cases, prints one
//!   line per case and `N passed, M failed`, powers guests 1 and 2 off and
//!   exits 1 on any failure.
//!
//! # The command daemon's protocol
//!
//! TCP, one JSON object per line in each direction; a connection carries any
//! number of requests, each answered in order. Every answer has `"ok"`; a
//! failed request answers `{"ok":false,"error":"..."}`.
//!
//! | request                                                     | answer                                   |
//! |-------------------------------------------------------------|------------------------------------------|
//! | `{"op":"ping"}`                                             | `{"ok":true}`                            |
//! | `{"op":"start","name":N,"argv":[..],"env":{..}}`            | `{"ok":true,"pid":P}`                    |
//! | `{"op":"status","name":N}`                                  | `{"ok":true,"running":B,"code":C,"signal":S}` |
//! | `{"op":"stop","name":N,"timeout_ms":T}`                     | as status, plus `"killed":B`             |
//! | `{"op":"kill","name":N}`                                    | as status                                |
//! | `{"op":"log","name":N}`                                     | `{"ok":true,"text":"..."}`               |
//! | `{"op":"exec","argv":[..],"env":{..},"timeout_ms":T}`       | `{"ok":true,"code":C,"signal":S,"timed_out":B,"stdout":"..","stderr":".."}` |
//! | `{"op":"poweroff"}`                                         | `{"ok":true}`, then the daemon exits     |
//!
//! - `start` runs a named background process (argv[0] is looked up in PATH;
//!   `env` is added to the daemon's environment) with stdin from /dev/null
//!   and stdout and stderr into `/tmp/rmem-node/<name>.log`, which `log`
//!   returns (its last 64 KiB). A name may be reused once its process ended.
//! - `stop` sends SIGTERM, waits up to `timeout_ms` (default 10 s) and then
//!   sends SIGKILL (`"killed":true`); `kill` sends SIGKILL at once. Both reap.
//! - `code` is the exit code and `signal` the signal that ended the process,
//!   each `null` when it does not apply (both `null` while it runs).
//! - `exec` runs a command to completion: at most `timeout_ms` (default 60 s,
//!   then SIGKILL and `"timed_out":true`); stdout and stderr are kept up to
//!   their last 64 KiB each.
//! - `poweroff` kills every process the daemon started and exits with 0; the
//!   guest's /init then powers the guest off.
//!
//! The daemon runs any command as root for whoever connects, so it must never
//! be reachable from outside the test guests: it listens only on the guest's
//! address on the private segment (never on 0.0.0.0), and that segment exists
//! only between the three QEMU processes of one test run on the host's
//! loopback. It is a test fixture, not a service.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmem_tests::suite::{Suite, ensure};
use rmem_tests::wait_until;

mod rmem;
use serde_json::{Value, json};

/// The command daemon's TCP port.
const NODE_PORT: u16 = 7999;
/// Bound on the output kept of a command or a background process.
const OUTPUT_LIMIT: usize = 64 * 1024;
/// Where background processes write their output.
const LOG_DIR: &str = "/tmp/rmem-node";
/// The rxe device every guest's /init creates.
const RXE_DEV: &str = "rxe0";
/// Message size and iteration count of the perftest cases: under TCG one
/// 4 KiB RDMA READ takes tens of milliseconds, so few iterations.
const PERF_SIZE: &str = "4096";
const PERF_ITERS: &str = "50";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    match flag("--role").as_deref() {
        Some("node") => {
            let Some(listen) = flag("--listen") else {
                usage("--role node needs --listen ADDR:PORT (the guest's private address)")
            };
            let listen: SocketAddr = listen
                .parse()
                .unwrap_or_else(|e| usage(&format!("--listen {listen}: {e}")));
            if listen.ip().is_unspecified() {
                usage("--listen must name the guest's private address, not a wildcard");
            }
            if let Err(e) = daemon::serve(listen) {
                eprintln!("rmem-vmtest-rdma node: {e}");
                std::process::exit(1);
            }
        }
        Some("driver") => {
            let nodes = flag("--nodes").unwrap_or_else(|| "10.0.0.1,10.0.0.2,10.0.0.3".into());
            let ips: Vec<String> = nodes.split(',').map(str::to_owned).collect();
            if ips.len() != 3 {
                usage("--nodes takes three addresses: guest 1, 2 and 3");
            }
            driver(&ips);
        }
        Some("memlock-probe") => {
            let need =
                |name: &str| flag(name).unwrap_or_else(|| usage(&format!("{name} is required")));
            rmem::memlock_probe(&need("--server"), &need("--tenant"), &need("--token"));
        }
        _ => usage("--role node|driver|memlock-probe is required"),
    }
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "rmem-vmtest-rdma: {problem}\n\
         usage: rmem-vmtest-rdma --role node --listen 10.0.0.N:{NODE_PORT}\n       \
         rmem-vmtest-rdma --role driver [--nodes IP1,IP2,IP3]"
    );
    std::process::exit(2);
}

// ---------------------------------------------------------------------------
// The driver and its cases.
// ---------------------------------------------------------------------------

fn driver(ips: &[String]) -> ! {
    let nodes: Vec<Node> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| Node::new(&format!("node {}", i + 1), ip))
        .collect();
    let (n1, n3) = (&nodes[0], &nodes[2]);
    let mut suite = Suite::default();

    suite.case("the three node daemons answer", || {
        let start = Instant::now();
        for node in &nodes {
            let mut last = String::new();
            let up = wait_until(Duration::from_secs(300), || match node.ping() {
                Ok(()) => true,
                Err(e) => {
                    last = e;
                    false
                }
            });
            ensure(up, format!("{} does not answer: {last}", node.name))?;
        }
        println!(
            "nodes ready after {:.1?} (as seen by the driver)",
            start.elapsed()
        );
        Ok(())
    });
    if suite.failed > 0 {
        finish(suite, &nodes);
    }

    suite.case("the guests reach each other over eth0 (ping)", || {
        for from in &nodes {
            for to in &nodes {
                if from.ip != to.ip {
                    from.exec_ok(
                        &["ping", "-c", "1", "-W", "10", &to.ip],
                        Duration::from_secs(30),
                    )?;
                }
            }
        }
        Ok(())
    });

    suite.case("rxe is up on every guest", || {
        for node in &nodes {
            let links = node.exec_ok(&["rdma", "link", "show"], Duration::from_secs(30))?;
            let line = links
                .lines()
                .find(|l| l.contains(&format!("{RXE_DEV}/1")))
                .ok_or_else(|| format!("{}: no {RXE_DEV} in `rdma link`: {links:?}", node.name))?;
            ensure(
                line.contains("state ACTIVE") && line.contains("netdev eth0"),
                format!("{}: {line:?}", node.name),
            )?;
            let devices = node.exec_ok(&["ibv_devices"], Duration::from_secs(30))?;
            ensure(
                devices.contains(RXE_DEV),
                format!("{}: ibv_devices lists no {RXE_DEV}: {devices:?}", node.name),
            )?;
            let info = node.exec_ok(&["ibv_devinfo", "-d", RXE_DEV], Duration::from_secs(30))?;
            ensure(
                info.contains("PORT_ACTIVE"),
                format!("{}: ibv_devinfo shows no active port: {info:?}", node.name),
            )?;
        }
        Ok(())
    });

    let mut reference = rmem::Reference::default();
    suite.case("raw verbs: ib_read_lat 4 KiB between guests", || {
        let (p50, p99) = perftest_latency("ib_read_lat", n1, n3, 18515)?;
        println!("bench: ib_read_lat_4k_us p50={p50:.1} p99={p99:.1}");
        reference.read_p50_us = Some(p50);
        Ok(())
    });

    suite.case("raw verbs: ib_write_lat 4 KiB between guests", || {
        let (p50, p99) = perftest_latency("ib_write_lat", n1, n3, 18516)?;
        println!("bench: ib_write_lat_4k_us p50={p50:.1} p99={p99:.1}");
        reference.write_p50_us = Some(p50);
        Ok(())
    });

    rmem::cases(&mut suite, &nodes, reference);

    finish(suite, &nodes)
}

/// Prints the summary, powers guests 1 and 2 off and exits (1 on a failure).
fn finish(suite: Suite, nodes: &[Node]) -> ! {
    // Guest 3 powers itself off when this process ends (its /init does).
    for node in &nodes[..2] {
        if let Err(e) = node.poweroff() {
            println!("note: {} did not take poweroff: {e}", node.name);
        }
    }
    suite.finish()
}

/// Runs perftest's `tool` (ib_read_lat, ib_write_lat) with its server on
/// `server` and its client on `client`, and returns the typical (median)
/// and 99th-percentile latency in microseconds.
fn perftest_latency(
    tool: &str,
    server: &Node,
    client: &Node,
    port: u16,
) -> Result<(f64, f64), String> {
    let port_s = port.to_string();
    let server_gid = roce_v2_ipv4_gid_index(server)?.to_string();
    let client_gid = roce_v2_ipv4_gid_index(client)?.to_string();
    let args = |gid: &str| -> Vec<String> {
        [
            tool, "-d", RXE_DEV, "-x", gid, "-s", PERF_SIZE, "-n", PERF_ITERS, "-p", &port_s, "-F",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let server_argv = args(&server_gid);
    let server_argv: Vec<&str> = server_argv.iter().map(String::as_str).collect();
    server.start(tool, &server_argv, &[])?;
    let result = (|| {
        let listening = wait_until(Duration::from_secs(60), || {
            server.tcp_listening(port).unwrap_or(false)
                || !server.status(tool).map(|s| s.running).unwrap_or(false)
        });
        let status = server.status(tool)?;
        ensure(
            listening && status.running,
            format!(
                "the {tool} server is not listening on port {port} ({status}); its output: {}",
                server.log(tool).unwrap_or_default()
            ),
        )?;
        let mut client_argv = args(&client_gid);
        client_argv.push(server.ip.clone());
        let client_argv: Vec<&str> = client_argv.iter().map(String::as_str).collect();
        let out = client.exec(&client_argv, Duration::from_secs(600))?;
        ensure(
            out.success(),
            format!(
                "the {tool} client on {} ended with {}: {}{}; server said: {}",
                client.name,
                out.status,
                out.stdout,
                out.stderr,
                server.log(tool).unwrap_or_default()
            ),
        )?;
        let ended = wait_until(Duration::from_secs(60), || {
            server.status(tool).map(|s| !s.running).unwrap_or(true)
        });
        let status = server.status(tool)?;
        ensure(
            ended && status.code == Some(0),
            format!(
                "the {tool} server on {} did not end cleanly ({status}): {}",
                server.name,
                server.log(tool).unwrap_or_default()
            ),
        )?;
        parse_perftest_latency(&out.stdout).ok_or_else(|| {
            format!(
                "no latency figures in the {tool} client's output: {}",
                out.stdout
            )
        })
    })();
    if server.status(tool).map(|s| s.running).unwrap_or(false) {
        let _ = server.kill(tool);
    }
    result
}

/// The (t_typical, 99% percentile) columns of a perftest latency report:
///
/// ```text
///  #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec]
///  4096       50          40112.12       ...
/// ```
fn parse_perftest_latency(out: &str) -> Option<(f64, f64)> {
    let mut lines = out.lines().skip_while(|l| !l.contains("t_typical"));
    let header = lines.next()?;
    // The header's "99% percentile[usec]" is two words for one column.
    let columns: Vec<&str> = header
        .split_whitespace()
        .filter(|w| !w.starts_with("percentile"))
        .collect();
    let typical = columns.iter().position(|c| c.starts_with("t_typical"))?;
    let p99 = columns.iter().position(|c| *c == "99%")?;
    let row: Vec<f64> = lines
        .find(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.parse::<u64>().is_ok())
        })?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    Some((*row.get(typical)?, *row.get(p99)?))
}

/// The index of `node`'s RoCE v2 GID that holds its IPv4 address (perftest's
/// `-x`): rxe fills the GID table from the netdev's addresses, an IPv6
/// link-local one first, so the index is looked up, not assumed.
fn roce_v2_ipv4_gid_index(node: &Node) -> Result<u32, String> {
    // One grep for the whole table (a process per entry is slow under TCG):
    // "gids/1:0000:...:0a00:0001" and "gid_attrs/types/1:RoCE v2" lines; the
    // types of unused entries fail to read and are left out.
    let script = format!(
        "cd /sys/class/infiniband/{RXE_DEV}/ports/1 && \
         grep -H . gids/* gid_attrs/types/* 2>/dev/null; true"
    );
    let table = node.exec_ok(&["sh", "-c", &script], Duration::from_secs(60))?;
    let octets: Vec<u8> = node
        .ip
        .split('.')
        .map(|o| {
            o.parse()
                .map_err(|e| format!("{}: bad address {}: {e}", node.name, node.ip))
        })
        .collect::<Result<_, _>>()?;
    let [a, b, c, d] = octets[..] else {
        return Err(format!("{}: bad address {}", node.name, node.ip));
    };
    let want = format!("0000:0000:0000:0000:0000:ffff:{a:02x}{b:02x}:{c:02x}{d:02x}");
    let index = table
        .lines()
        .filter_map(|l| l.strip_prefix("gids/")?.split_once(':'))
        .find(|(_, gid)| gid.trim() == want)
        .and_then(|(i, _)| i.parse::<u32>().ok())
        .ok_or_else(|| format!("{}: no GID {want} in the GID table:\n{table}", node.name))?;
    let kind = table
        .lines()
        .find_map(|l| l.strip_prefix(&format!("gid_attrs/types/{index}:")))
        .unwrap_or("no type");
    ensure(
        kind.trim() == "RoCE v2",
        format!(
            "{}: GID {index} ({want}) is {kind:?}, not RoCE v2",
            node.name
        ),
    )?;
    Ok(index)
}

// ---------------------------------------------------------------------------
// The client of a node's command daemon.
// ---------------------------------------------------------------------------

/// One guest, driven through its command daemon.
#[derive(Debug, Clone)]
struct Node {
    /// "node 1", for messages.
    name: String,
    /// The guest's address on the private segment.
    ip: String,
}

/// How a process stands: running, or how it ended.
#[derive(Debug, Clone, Copy)]
struct ProcStatus {
    running: bool,
    code: Option<i32>,
    signal: Option<i32>,
}

impl ProcStatus {
    fn from_reply(v: &Value) -> Self {
        Self {
            running: v["running"].as_bool().unwrap_or(false),
            code: v["code"].as_i64().map(|c| c as i32),
            signal: v["signal"].as_i64().map(|s| s as i32),
        }
    }
}

impl std::fmt::Display for ProcStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.running, self.code, self.signal) {
            (true, _, _) => write!(f, "running"),
            (_, Some(c), _) => write!(f, "exit {c}"),
            (_, _, Some(s)) => write!(f, "signal {s}"),
            _ => write!(f, "unknown"),
        }
    }
}

/// What `exec` returns.
#[derive(Debug)]
struct ExecOutput {
    status: ProcStatus,
    timed_out: bool,
    stdout: String,
    stderr: String,
}

impl ExecOutput {
    fn success(&self) -> bool {
        !self.timed_out && self.status.code == Some(0)
    }
}

impl Node {
    fn new(name: &str, ip: &str) -> Self {
        Self {
            name: name.into(),
            ip: ip.into(),
        }
    }

    /// Sends one request and returns the answer; `wait` bounds how long the
    /// daemon may take to answer (beyond the request's own timeout).
    fn request(&self, req: &Value, wait: Duration) -> Result<Value, String> {
        let ctx = |what: &str, e: &dyn std::fmt::Display| {
            format!("{} ({}:{NODE_PORT}): {what}: {e}", self.name, self.ip)
        };
        let addr: SocketAddr = format!("{}:{NODE_PORT}", self.ip)
            .parse()
            .map_err(|e| ctx("address", &e))?;
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| ctx("connect", &e))?;
        stream
            .set_read_timeout(Some(wait + Duration::from_secs(30)))
            .map_err(|e| ctx("set timeout", &e))?;
        let mut line = req.to_string();
        line.push('\n');
        stream
            .write_all(line.as_bytes())
            .map_err(|e| ctx("send", &e))?;
        let mut answer = String::new();
        BufReader::new(stream)
            .read_line(&mut answer)
            .map_err(|e| ctx("receive", &e))?;
        let v: Value =
            serde_json::from_str(&answer).map_err(|e| ctx(&format!("answer {answer:?}"), &e))?;
        if v["ok"].as_bool() == Some(true) {
            Ok(v)
        } else {
            Err(format!(
                "{}: {} failed: {}",
                self.name,
                req["op"],
                v["error"].as_str().unwrap_or("no reason given")
            ))
        }
    }

    fn ping(&self) -> Result<(), String> {
        self.request(&json!({"op": "ping"}), Duration::ZERO)
            .map(drop)
    }

    /// Starts background process `name`.
    fn start(&self, name: &str, argv: &[&str], env: &[(&str, &str)]) -> Result<u32, String> {
        let env: serde_json::Map<String, Value> =
            env.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        let v = self.request(
            &json!({"op": "start", "name": name, "argv": argv, "env": env}),
            Duration::ZERO,
        )?;
        Ok(v["pid"].as_u64().unwrap_or(0) as u32)
    }

    fn status(&self, name: &str) -> Result<ProcStatus, String> {
        self.request(&json!({"op": "status", "name": name}), Duration::ZERO)
            .map(|v| ProcStatus::from_reply(&v))
    }

    /// SIGTERM, then SIGKILL after `timeout`.
    fn stop(&self, name: &str, timeout: Duration) -> Result<ProcStatus, String> {
        self.request(
            &json!({"op": "stop", "name": name, "timeout_ms": timeout.as_millis() as u64}),
            timeout,
        )
        .map(|v| ProcStatus::from_reply(&v))
    }

    fn kill(&self, name: &str) -> Result<ProcStatus, String> {
        self.request(
            &json!({"op": "kill", "name": name}),
            Duration::from_secs(10),
        )
        .map(|v| ProcStatus::from_reply(&v))
    }

    /// The last 64 KiB a background process wrote.
    fn log(&self, name: &str) -> Result<String, String> {
        let v = self.request(&json!({"op": "log", "name": name}), Duration::ZERO)?;
        Ok(v["text"].as_str().unwrap_or_default().to_owned())
    }

    /// Runs a command to completion (killed after `timeout`).
    fn exec(&self, argv: &[&str], timeout: Duration) -> Result<ExecOutput, String> {
        let v = self.request(
            &json!({"op": "exec", "argv": argv, "timeout_ms": timeout.as_millis() as u64}),
            timeout,
        )?;
        Ok(ExecOutput {
            status: ProcStatus::from_reply(&v),
            timed_out: v["timed_out"].as_bool().unwrap_or(false),
            stdout: v["stdout"].as_str().unwrap_or_default().to_owned(),
            stderr: v["stderr"].as_str().unwrap_or_default().to_owned(),
        })
    }

    /// Runs a command that must succeed and returns its stdout.
    fn exec_ok(&self, argv: &[&str], timeout: Duration) -> Result<String, String> {
        let out = self.exec(argv, timeout)?;
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(format!(
                "{}: `{}` ended with {}{}: {}{}",
                self.name,
                argv.join(" "),
                out.status,
                if out.timed_out { " (timed out)" } else { "" },
                out.stdout,
                out.stderr
            ))
        }
    }

    /// Whether a TCP socket listens on `port` (any address) on the node.
    fn tcp_listening(&self, port: u16) -> Result<bool, String> {
        let tcp = self.exec_ok(
            &["cat", "/proc/net/tcp", "/proc/net/tcp6"],
            Duration::from_secs(10),
        )?;
        let local = format!(":{port:04X}");
        // Fields: sl local_address rem_address st ...; st 0A is LISTEN.
        Ok(tcp.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&local) && f[3] == "0A"
        }))
    }

    fn poweroff(&self) -> Result<(), String> {
        self.request(&json!({"op": "poweroff"}), Duration::from_secs(10))
            .map(drop)
    }
}

// ---------------------------------------------------------------------------
// The command daemon.
// ---------------------------------------------------------------------------

mod daemon {
    use super::*;

    /// A background process the daemon started.
    #[derive(Debug)]
    struct Proc {
        child: Child,
        /// Set once reaped.
        ended: Option<ExitStatus>,
    }

    impl Proc {
        fn poll(&mut self) -> Option<ExitStatus> {
            if self.ended.is_none() {
                self.ended = self.child.try_wait().ok().flatten();
            }
            self.ended
        }

        fn signal(&self, sig: i32) {
            if self.ended.is_none() {
                // SAFETY: kill(2) on our own unreaped child, whose pid cannot
                // have been reused.
                unsafe { libc::kill(self.child.id() as i32, sig) };
            }
        }

        /// Waits up to `timeout` for the process to end.
        fn wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
            wait_until(timeout, || self.poll().is_some());
            self.ended
        }

        fn status_json(&mut self) -> Value {
            status_json(self.poll())
        }
    }

    type Registry = Arc<Mutex<HashMap<String, Arc<Mutex<Proc>>>>>;

    fn status_json(ended: Option<ExitStatus>) -> Value {
        json!({
            "ok": true,
            "running": ended.is_none(),
            "code": ended.and_then(|s| s.code()),
            "signal": ended.and_then(|s| s.signal()),
        })
    }

    pub fn serve(listen: SocketAddr) -> Result<(), String> {
        std::fs::create_dir_all(LOG_DIR).map_err(|e| format!("create {LOG_DIR}: {e}"))?;
        let listener = TcpListener::bind(listen).map_err(|e| format!("listen on {listen}: {e}"))?;
        eprintln!("rmem-vmtest-rdma node: listening on {listen}");
        let procs: Registry = Arc::default();
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let procs = procs.clone();
            std::thread::spawn(move || {
                if let Err(e) = connection(conn, &procs) {
                    eprintln!("rmem-vmtest-rdma node: connection: {e}");
                }
            });
        }
        Ok(())
    }

    fn connection(conn: TcpStream, procs: &Registry) -> std::io::Result<()> {
        let mut out = conn.try_clone()?;
        for line in BufReader::new(conn).lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let (answer, exit) = match serde_json::from_str::<Value>(&line) {
                Ok(req) => {
                    let exit = req["op"] == "poweroff";
                    let answer =
                        handle(&req, procs).unwrap_or_else(|e| json!({"ok": false, "error": e}));
                    (answer, exit)
                }
                Err(e) => (
                    json!({"ok": false, "error": format!("bad request: {e}")}),
                    false,
                ),
            };
            out.write_all(format!("{answer}\n").as_bytes())?;
            if exit {
                out.flush()?;
                eprintln!("rmem-vmtest-rdma node: poweroff requested");
                std::process::exit(0);
            }
        }
        Ok(())
    }

    fn handle(req: &Value, procs: &Registry) -> Result<Value, String> {
        let name = || {
            req["name"]
                .as_str()
                .filter(|n| {
                    !n.is_empty()
                        && n.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                })
                .ok_or_else(|| "\"name\" must be a non-empty [A-Za-z0-9._-] string".to_owned())
        };
        let find = |name: &str| {
            procs
                .lock()
                .expect("registry lock")
                .get(name)
                .cloned()
                .ok_or_else(|| format!("no process named {name:?}"))
        };
        let timeout = |default: Duration| {
            req["timeout_ms"]
                .as_u64()
                .map_or(default, Duration::from_millis)
        };
        match req["op"].as_str().unwrap_or_default() {
            "ping" => Ok(json!({"ok": true})),
            "start" => {
                let name = name()?;
                let mut registry = procs.lock().expect("registry lock");
                if let Some(p) = registry.get(name)
                    && p.lock().expect("proc lock").poll().is_none()
                {
                    return Err(format!("{name:?} is still running"));
                }
                let path = format!("{LOG_DIR}/{name}.log");
                let log =
                    std::fs::File::create(&path).map_err(|e| format!("create {path}: {e}"))?;
                let log2 = log.try_clone().map_err(|e| format!("{path}: {e}"))?;
                let child = command(req)?
                    .stdin(Stdio::null())
                    .stdout(log)
                    .stderr(log2)
                    .spawn()
                    .map_err(|e| format!("start {}: {e}", req["argv"]))?;
                let pid = child.id();
                registry.insert(
                    name.to_owned(),
                    Arc::new(Mutex::new(Proc { child, ended: None })),
                );
                Ok(json!({"ok": true, "pid": pid}))
            }
            "status" => Ok(find(name()?)?.lock().expect("proc lock").status_json()),
            "stop" => {
                let p = find(name()?)?;
                let mut p = p.lock().expect("proc lock");
                p.signal(libc::SIGTERM);
                let mut killed = false;
                if p.wait_for(timeout(Duration::from_secs(10))).is_none() {
                    p.signal(libc::SIGKILL);
                    killed = true;
                    p.wait_for(Duration::from_secs(10));
                }
                let mut answer = p.status_json();
                answer["killed"] = json!(killed);
                Ok(answer)
            }
            "kill" => {
                let p = find(name()?)?;
                let mut p = p.lock().expect("proc lock");
                p.signal(libc::SIGKILL);
                p.wait_for(Duration::from_secs(10));
                Ok(p.status_json())
            }
            "log" => {
                let name = name()?;
                let path = format!("{LOG_DIR}/{name}.log");
                let bytes = std::fs::read(&path).map_err(|e| format!("read {path}: {e}"))?;
                let tail = &bytes[bytes.len().saturating_sub(OUTPUT_LIMIT)..];
                Ok(json!({"ok": true, "text": String::from_utf8_lossy(tail)}))
            }
            "exec" => exec(req, timeout(Duration::from_secs(60))),
            "poweroff" => {
                let registry = procs.lock().expect("registry lock");
                for p in registry.values() {
                    let mut p = p.lock().expect("proc lock");
                    p.signal(libc::SIGKILL);
                    p.wait_for(Duration::from_secs(10));
                }
                Ok(json!({"ok": true}))
            }
            other => Err(format!("unknown op {other:?}")),
        }
    }

    /// The command of a request's `argv` and `env`.
    fn command(req: &Value) -> Result<Command, String> {
        let argv: Vec<&str> = req["argv"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let Some((prog, args)) = argv.split_first() else {
            return Err("\"argv\" must be a non-empty list of strings".into());
        };
        let mut cmd = Command::new(prog);
        cmd.args(args);
        if let Some(env) = req["env"].as_object() {
            for (k, v) in env {
                cmd.env(
                    k,
                    v.as_str()
                        .ok_or_else(|| format!("env {k} must be a string"))?,
                );
            }
        }
        Ok(cmd)
    }

    fn exec(req: &Value, timeout: Duration) -> Result<Value, String> {
        let mut child = command(req)?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("run {}: {e}", req["argv"]))?;
        let stdout = child
            .stdout
            .take()
            .map(|s| std::thread::spawn(move || read_tail(s)));
        let stderr = child
            .stderr
            .take()
            .map(|s| std::thread::spawn(move || read_tail(s)));
        let mut ended = None;
        let timed_out = !wait_until(timeout, || {
            ended = child.try_wait().ok().flatten();
            ended.is_some()
        });
        if timed_out {
            let _ = child.kill();
            ended = child.wait().ok();
        }
        // The readers end once every holder of the pipes (the command and
        // anything it left behind) closed them.
        let text = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
            h.and_then(|h| h.join().ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let mut answer = status_json(ended);
        answer["timed_out"] = json!(timed_out);
        answer["stdout"] = json!(text(stdout));
        answer["stderr"] = json!(text(stderr));
        Ok(answer)
    }

    /// Reads `r` to its end and keeps the last [`OUTPUT_LIMIT`] bytes.
    fn read_tail(mut r: impl Read) -> Vec<u8> {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    kept.extend_from_slice(&buf[..n]);
                    // Trim now and then, not at every read.
                    if kept.len() > 2 * OUTPUT_LIMIT {
                        kept.drain(..kept.len() - OUTPUT_LIMIT);
                    }
                }
            }
        }
        kept.drain(..kept.len().saturating_sub(OUTPUT_LIMIT));
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::parse_perftest_latency;

    #[test]
    fn parses_a_perftest_latency_report() {
        // ib_read_lat's report in a guest, tabs and all.
        let out = concat!(
            "---------------------------------------------------------------------------------------\n",
            " #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    ",
            "t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] \n",
            " 4096    50          2224.65        8661.42      4829.01  \t       5087.04     ",
            "\t1837.91\t\t8661.42 \t\t8661.42\n",
            "---------------------------------------------------------------------------------------\n",
            "Device not recognized to implement inline feature. Disabling it\n",
        );
        assert_eq!(parse_perftest_latency(out), Some((4829.01, 8661.42)));
        assert_eq!(parse_perftest_latency("Couldn't connect"), None);
    }
}
