//! Test hosts with their own network identities: one network namespace per
//! host, each joined by a veth pair to a bridge that lives in a namespace of
//! its own, so nothing is added to the machine's own network stack. A
//! host's link can be cut and healed (its bridge-side end set down/up).
//! Dropping the [`Network`] kills what runs in it and deletes every
//! namespace (which deletes the veths and the bridge).
//!
//! Needs root and iproute2 (`ip`).

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::Daemon;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e} (is iproute2 installed?)"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this process can make network namespaces (root and `ip`).
pub fn available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Err("network-namespace tests need root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("network-namespace tests need iproute2 (`ip`)".into()),
    }
}

/// A private network of hosts.
#[derive(Debug)]
pub struct Network {
    prefix: String,
    switch: String,
    hosts: Vec<String>,
    daemons: Vec<Daemon>,
}

/// One host of a [`Network`].
#[derive(Debug, Clone)]
pub struct Host {
    pub netns: String,
    pub addr: Ipv4Addr,
    /// Bridge-side end of the host's link.
    link: String,
    switch: String,
}

impl Network {
    /// A new, empty network. Names are short (interface names are at most
    /// 15 bytes) and unique per process and call.
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "r{:x}{:x}",
            std::process::id() & 0xffff,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let switch = format!("{prefix}sw");
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        Self {
            prefix,
            switch,
            hosts: Vec::new(),
            daemons: Vec::new(),
        }
    }

    /// Adds host number `hosts.len() + 1` at 10.77.0.N/24.
    pub fn host(&mut self) -> Host {
        let n = self.hosts.len() + 1;
        assert!(n < 250, "too many hosts");
        let netns = format!("{}h{n}", self.prefix);
        let link = format!("{}v{n}", self.prefix);
        let addr = Ipv4Addr::new(10, 77, 0, n as u8);
        ip(&["netns", "add", &netns]);
        self.hosts.push(netns.clone());
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&[
            "link",
            "add",
            &link,
            "netns",
            &self.switch,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ]);
        ip(&["-n", &self.switch, "link", "set", &link, "master", "br0"]);
        ip(&["-n", &self.switch, "link", "set", &link, "up"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        Host {
            netns,
            addr,
            link,
            switch: self.switch.clone(),
        }
    }

    /// Starts workspace binary `name` on `host`; it is killed with the
    /// network.
    pub fn spawn(&mut self, host: &Host, name: &str, args: &[&str]) -> usize {
        self.daemons.push(Daemon::spawn_in(&host.netns, name, args));
        self.daemons.len() - 1
    }

    /// Starts `program` (a real component such as etcd, from the system)
    /// on `host`, labelled `name`; it is killed with the network.
    pub fn spawn_program(
        &mut self,
        host: &Host,
        name: &str,
        program: &str,
        args: &[&str],
    ) -> usize {
        self.daemons
            .push(Daemon::spawn_program_in(&host.netns, name, program, args));
        self.daemons.len() - 1
    }

    pub fn daemon(&self, k: usize) -> &Daemon {
        &self.daemons[k]
    }

    pub fn daemon_mut(&mut self, k: usize) -> &mut Daemon {
        &mut self.daemons[k]
    }
}

impl Default for Network {
    fn default() -> Self {
        Self::new()
    }
}

impl Host {
    /// Cuts the host off the network (its processes keep running).
    pub fn cut(&self) {
        ip(&["-n", &self.switch, "link", "set", &self.link, "down"]);
    }

    /// Reconnects a cut host.
    pub fn heal(&self) {
        ip(&["-n", &self.switch, "link", "set", &self.link, "up"]);
    }

    /// Moves the calling thread into the host's network namespace; the
    /// threads it starts afterwards are there too (an in-process agent
    /// started on it runs on this host).
    pub fn enter(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let ns = std::fs::File::open(format!("/run/netns/{}", self.netns))?;
        // SAFETY: setns on an open namespace file; it changes only the
        // calling thread's network namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// `addr:port` on this host.
    pub fn at(&self, port: u16) -> String {
        format!("{}:{port}", self.addr)
    }

    /// Runs a workspace binary on this host to completion.
    pub fn run(&self, name: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(crate::bin(name))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {name} in {}: {e}", self.netns))
    }
}

/// Port the suites' coordinators listen on.
pub const COORD_PORT: u16 = 7470;

/// `rmemctl --output json ARGS`, run on `client` against the coordinator on
/// `coord`; the error if it failed (the coordinator is restarting, say).
pub fn try_rmemctl(
    client: &Host,
    coord: &Host,
    args: &[&str],
) -> Result<serde_json::Value, String> {
    try_rmemctl_at(client, &coord.at(COORD_PORT), args)
}

/// As [`try_rmemctl`], against `endpoint` (one or several coordinator
/// replicas, comma-separated).
pub fn try_rmemctl_at(
    client: &Host,
    endpoint: &str,
    args: &[&str],
) -> Result<serde_json::Value, String> {
    let mut all = vec![
        "--endpoint",
        endpoint,
        "--output",
        "json",
        "--timeout",
        "2s",
    ];
    all.extend_from_slice(args);
    let out = client.run("rmemctl", &all);
    if !out.status.success() {
        return Err(format!(
            "rmemctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("rmemctl {args:?}: {e}"))
}

/// As [`try_rmemctl`], failing the test if `rmemctl` fails.
pub fn rmemctl(client: &Host, coord: &Host, args: &[&str]) -> serde_json::Value {
    try_rmemctl(client, coord, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts `rmem-coordinator` on `host` (1 s leases, 2 s invalidation
/// deadline, 1 MiB placement chunks, state in `state`) with `extra` flags
/// (one of those three given there replaces the default), and waits until it
/// serves; its daemon index.
pub fn start_coordinator(net: &mut Network, host: &Host, state: &str, extra: &[&str]) -> usize {
    let listen = host.at(COORD_PORT);
    let mut args = vec![
        "--log-format",
        "json",
        "--listen",
        &listen,
        "--state-dir",
        state,
        // The namespaces' network is the test's own.
        "--insecure",
    ];
    for (flag, value) in [
        ("--lease", "1s"),
        ("--invalidation-deadline", "2s"),
        ("--placement-chunk", "1MiB"),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    let k = net.spawn(host, "rmem-coordinator", &args);
    assert!(
        net.daemon(k)
            .wait_for_log("coordinator ready", std::time::Duration::from_secs(30))
            .is_some(),
        "coordinator did not start:\n{}",
        net.daemon(k).log_text()
    );
    k
}

/// Starts `rmem-server` on `host` (data port 7480, admin 7481) with
/// `capacity`, joining the coordinator on `coord` as `name`, and waits until
/// it joined; its daemon index.
pub fn start_server(
    net: &mut Network,
    host: &Host,
    coord: &Host,
    name: &str,
    capacity: &str,
) -> usize {
    let endpoint = coord.at(COORD_PORT);
    let k = net.spawn(
        host,
        "rmem-server",
        &[
            "--log-format",
            "json",
            "--listen",
            &host.at(7480),
            "--grpc",
            &host.at(7481),
            "--capacity",
            capacity,
            "--coordinator",
            &endpoint,
            "--name",
            name,
            "--insecure",
        ],
    );
    assert!(
        net.daemon(k)
            .wait_for_log("joined the cluster", std::time::Duration::from_secs(30))
            .is_some(),
        "server {name} did not join:\n{}",
        net.daemon(k).log_text()
    );
    k
}

impl Drop for Network {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            d.kill();
        }
        for ns in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
