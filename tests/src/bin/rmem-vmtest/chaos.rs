//! Chaos on the kernel path (the userfaultfd path's is `tests/tests/chaos.rs`):
//! a coordinator and five memory servers, each on a host of its own (a
//! network namespace in this guest, joined by a bridge), and the kernel
//! agent on another host, evicting the pages of two verifying programs:
//! one with the cluster's `ec=2+1`, one attached with two replicas of its
//! own. While those pages are remote, one server is killed for good (the
//! faults read the other copy or rebuild from the stripes, then the agent
//! rebuilds what was lost), another is stopped past its lease, a third is
//! cut off the network and healed, a fourth is drained, and the
//! coordinator restarts.
//!
//! Passes only if every page read back is right, no fetch failed (no
//! SIGBUS: the redundancy held throughout), the rebuild finished, and no
//! page is left on any server after each step (once every page came back)
//! and once the programs exit. Prints the figures.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rmem_agent::cluster::{Cluster, ClusterConfig};
use rmem_agent::kmod::{KernelAgent, KernelConfig};
use rmem_tests::netns::{COORD_PORT, Host, Network, start_coordinator, start_server, try_rmemctl};
use rmem_tests::suite::ensure;
use rmem_tests::wait_until;

use super::{Target, no_kernel_problems, no_sigbus};

const SERVERS: usize = 5;
/// The erasure-coded program's pages (1024 stripes of 2); the replicated
/// one has half as many.
const PAGES: usize = 2048;
/// The coordinator's flags. Leases of 2 s (a TCG guest is slow to
/// heartbeat), a server gone 40 s after its lease ran out (the stopped and
/// the cut server must not be declared gone while the program reads around
/// them, which took a TCG guest on a busy host over 13 s), and stripes of
/// two data pages and one parity page as the cluster's default.
const COORDINATOR: [&str; 6] = [
    "--lease",
    "2s",
    "--server-gone-after",
    "40s",
    "--redundancy",
    "ec=2+1",
];

pub fn chaos_case() -> Result<(), String> {
    rmem_tests::netns::available()?;
    // On a thread of its own: it moves into the agent's network namespace,
    // and the cases after this one run in the guest's.
    std::thread::spawn(run).join().unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(format!("the chaos thread panicked: {why}"))
    })
}

/// The cluster, as `rmemctl` on the agent's host sees it.
struct Ctl<'a> {
    client: &'a Host,
    coord: &'a Host,
}

impl Ctl<'_> {
    fn json(&self, args: &[&str]) -> Option<serde_json::Value> {
        try_rmemctl(self.client, self.coord, args).ok()
    }

    /// Pages server `name` holds.
    fn used(&self, name: &str) -> Option<u64> {
        self.json(&["stats"])?["servers"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)?["used_pages"]
            .as_u64()
    }

    /// Server `name`'s state (up, down, gone, draining).
    fn state(&self, name: &str) -> String {
        self.json(&["servers"])
            .and_then(|v| {
                v.as_array()?
                    .iter()
                    .find(|m| m["name"] == name)
                    .and_then(|m| m["state"].as_str().map(String::from))
            })
            .unwrap_or_default()
    }

    fn wait_state(&self, name: &str, want: &str, within: Duration) -> Result<(), String> {
        ensure(
            wait_until(within, || self.state(name) == want),
            format!("{name} is {:?}, not {want}", self.state(name)),
        )
    }
}

/// A verifying program, attached with its redundancy.
struct Program {
    target: Target,
    att: u64,
    pages: usize,
}

/// The verifying programs and the agent whose pages they are.
struct Workload {
    agent: KernelAgent,
    programs: Vec<Program>,
    version: u64,
    verified: u64,
}

impl Workload {
    /// Writes the next version of every page and evicts them all. Placement
    /// may refuse a moment after a failure (too few servers not suspected):
    /// the pages then stay in RAM and the eviction is tried again.
    fn write_and_evict(&mut self) -> Result<(), String> {
        self.version += 1;
        let total: usize = self.programs.iter().map(|p| p.pages).sum();
        for p in &mut self.programs {
            p.target.cmd(&format!("write {}", self.version))?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut last = Vec::new();
            for p in &self.programs {
                match self.agent.evict(p.att, p.target.addr, p.target.len()) {
                    Ok(_) => {}
                    Err(e) => last.push(e.to_string()),
                }
            }
            let in_use = self
                .agent
                .device()
                .info()
                .map_err(|e| e.to_string())?
                .pages_in_use;
            if in_use == total as u64 {
                return Ok(());
            }
            ensure(
                Instant::now() < deadline,
                format!(
                    "version {}: {in_use} of {total} pages evicted: {last:?}",
                    self.version
                ),
            )?;
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Reads part `part` of `parts` of every program back and checks it.
    fn check(&mut self, part: usize, parts: usize, what: &str) -> Result<(), String> {
        for p in &mut self.programs {
            let (from, to) = (p.pages * part / parts, p.pages * (part + 1) / parts);
            p.target
                .cmd(&format!(
                    "check-range {} {from} {}",
                    self.version,
                    to - from
                ))
                .map_err(|e| format!("{what}: {e}"))?;
            self.verified += (to - from) as u64;
            no_sigbus(p.target.pid(), what)?;
        }
        ensure(
            self.agent.stats().fetch_errors.load(Ordering::Relaxed) == 0,
            format!("{what}: a fetch failed"),
        )
    }
}

fn run() -> Result<(), String> {
    // The in-process agent's warnings go to the console.
    rmem_common::logging::init(Default::default(), "rmem_agent=warn");
    let started = Instant::now();
    let state = "/tmp/chaos-coordinator";
    let _ = std::fs::remove_dir_all(state);
    let mut net = Network::new();
    let coord = net.host();
    let hosts: Vec<Host> = (0..SERVERS).map(|_| net.host()).collect();
    let agent_host = net.host();
    let mut coord_k = start_coordinator(&mut net, &coord, state, &COORDINATOR);
    let endpoint = coord.at(COORD_PORT);
    let server_k: Vec<usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| start_server(&mut net, h, &coord, &format!("mem-{i}"), "64MiB"))
        .collect();
    let ctl = Ctl {
        client: &agent_host,
        coord: &coord,
    };

    // Every page came back: once their frees went through, no server
    // still running holds one. On failure, the servers' own words.
    let settled = |net: &Network, what: &str, alive: &[usize]| -> Result<(), String> {
        let held = || -> Vec<Option<u64>> {
            alive
                .iter()
                .map(|&i| ctl.used(&format!("mem-{i}")))
                .collect()
        };
        if wait_until(Duration::from_secs(60), || {
            held().iter().all(|u| *u == Some(0))
        }) {
            return Ok(());
        }
        let logs: Vec<String> = alive
            .iter()
            .map(|&i| {
                let log = net.daemon(server_k[i]).log_text();
                let tail: Vec<&str> = log.lines().rev().take(12).collect();
                format!(
                    "mem-{i}:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect();
        Err(format!(
            "{what}: servers mem-{alive:?} still hold {:?} pages\n{}",
            held(),
            logs.join("\n")
        ))
    };

    agent_host
        .enter()
        .map_err(|e| format!("entering the agent's host: {e}"))?;
    let mut cc = ClusterConfig::new(endpoint.clone());
    cc.name = Some("vm/chaos".into());
    let cluster = Cluster::connect(&cc).map_err(|e| e.to_string())?;
    let mut cfg = KernelConfig::in_cluster(cluster);
    cfg.request_timeout = Duration::from_secs(2);
    // Below the module's fault_timeout_ms (FAULT_TIMEOUT_MS).
    cfg.fault_timeout = Duration::from_secs(2);
    let agent = KernelAgent::start(cfg).map_err(|e| e.to_string())?;
    // Two programs: one with the cluster's ec=2+1, one attached with two
    // replicas of its own.
    let mut programs = Vec::new();
    for (pages, policy) in [
        (PAGES, None),
        (PAGES / 2, Some(rmem_common::Redundancy::Replicas(2))),
    ] {
        let target = Target::spawn_with(pages, &["nohuge"])?;
        let att = agent
            .attach_with(target.pid(), None, policy)
            .map_err(|e| e.to_string())?;
        programs.push(Program { target, att, pages });
    }
    ensure(
        agent.policy_of(programs[1].att).to_string() == "replicas=2"
            && agent.policy_of(programs[0].att).to_string() == "ec=2+1",
        "the attachments' policies",
    )?;
    let mut w = Workload {
        agent,
        programs,
        version: 1,
        verified: 0,
    };

    // 1. A server killed for good: faults rebuild their pages from the
    //    other two of each stripe; once the coordinator declares it gone,
    //    the agent rebuilds the lost slots elsewhere with no operator.
    w.write_and_evict()?;
    ensure(
        wait_until(Duration::from_secs(10), || {
            ctl.used("mem-0").is_some_and(|n| n > 0)
        }),
        "mem-0 holds no page of the program",
    )?;
    net.daemon_mut(server_k[0]).kill();
    let killed = Instant::now();
    w.check(0, 2, "reading with a server killed")?;
    ctl.wait_state("mem-0", "gone", Duration::from_secs(90))?;
    let declared = killed.elapsed();
    let mut most_at_risk = 0;
    ensure(
        wait_until(Duration::from_secs(120), || {
            ctl.json(&["status"]).is_some_and(|s| {
                most_at_risk = most_at_risk.max(s["pages_at_risk"].as_u64().unwrap_or(0));
                s["pages_at_risk"] == 0 && s["rebuild_pages_left"] == 0
            })
        }),
        format!("the rebuild did not finish: {:?}", ctl.json(&["status"])),
    )?;
    let rebuilt = killed.elapsed() - declared;
    w.check(1, 2, "reading after the rebuild")?;
    settled(&net, "after the kill", &[1, 2, 3, 4])?;

    // 2. A server stopped past its lease (not past the grace): faults go
    //    around it; it comes back on its own.
    w.write_and_evict()?;
    net.daemon(server_k[1]).signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(3));
    w.check(0, 1, "reading with a server stopped")?;
    let past_lease = wait_until(Duration::from_secs(10), || ctl.state("mem-1") != "up");
    net.daemon(server_k[1]).signal(libc::SIGCONT);
    ensure(past_lease, "the stopped server stayed up past its lease")?;
    ctl.wait_state("mem-1", "up", Duration::from_secs(30))?;
    settled(&net, "after the stop", &[1, 2, 3, 4])?;

    // 3. A server cut off the network, then healed.
    w.write_and_evict()?;
    hosts[2].cut();
    w.check(0, 1, "reading with a server cut off")?;
    hosts[2].heal();
    ctl.wait_state("mem-2", "up", Duration::from_secs(30))?;
    settled(&net, "after the cut", &[1, 2, 3, 4])?;

    // 4. A server drained while the pages are remote: they move off it and
    //    are read during and after.
    w.write_and_evict()?;
    try_rmemctl(&agent_host, &coord, &["drain", "mem-3"])?;
    w.check(0, 2, "reading during a drain")?;
    ensure(
        wait_until(Duration::from_secs(120), || ctl.used("mem-3") == Some(0)),
        format!(
            "the drained server still holds {:?} pages",
            ctl.used("mem-3")
        ),
    )?;
    w.check(1, 2, "reading after a drain")?;
    settled(&net, "after the drain", &[1, 2, 3, 4])?;

    // 5. The coordinator restarts (kill -9) while the pages are remote.
    w.write_and_evict()?;
    net.daemon_mut(coord_k).kill();
    w.check(0, 2, "reading with the coordinator down")?;
    coord_k = start_coordinator(&mut net, &coord, state, &COORDINATOR);
    ensure(
        wait_until(Duration::from_secs(60), || {
            ctl.json(&["status"]).is_some_and(|s| {
                s["servers_up"] == 3 && s["servers_draining"] == 1 && s["agents_up"] == 1
            })
        }),
        format!(
            "members did not carry on after the coordinator restarted: {:?}",
            ctl.json(&["status"])
        ),
    )?;
    w.check(1, 2, "reading after the coordinator restarted")?;
    w.write_and_evict()?;
    w.check(0, 1, "a round after the coordinator restarted")?;

    // The programs end: nothing is left on any server still running.
    let degraded = w.agent.stats().fetched_degraded.load(Ordering::Relaxed);
    for p in &mut w.programs {
        let pid = p.target.pid();
        p.target.cmd("exit")?;
        p.target.wait_exit()?;
        no_sigbus(pid, "the chaos")?;
        w.agent.detach(p.att).map_err(|e| e.to_string())?;
    }
    settled(&net, "after the program ended", &[1, 2, 3, 4])?;
    let (versions, verified) = (w.version, w.verified);
    drop(w);
    println!(
        "chaos (kernel path, ec=2+1 and replicas=2): {versions} versions, {verified} pages verified, \
         {degraded} fetches served degraded; dead server declared gone after {declared:.1?}, \
         rebuilt in {rebuilt:.1?} (at most {most_at_risk} pages at risk); whole case {:.1?}",
        started.elapsed()
    );
    let _ = coord_k;
    no_kernel_problems()
}
