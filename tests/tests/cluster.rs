//! A whole cluster on loopback: a coordinator, memory servers that join
//! it, and regions that get their capacity from it. Placement, interval
//! registration, freeing through invalidation, draining a server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rmem_agent::cluster::{Cluster, ClusterConfig};
use rmem_agent::{RegionConfig, RemoteRegion};
use rmem_client::{BlockingConnection, PAGE_SIZE};
use rmem_tests::{Daemon, ServerProcess, bin, settled, used, wait_until};

struct Coordinator {
    _daemon: Option<Daemon>,
    addr: SocketAddr,
}

impl Coordinator {
    /// One started by someone else.
    fn at(addr: SocketAddr) -> Self {
        Self {
            _daemon: None,
            addr,
        }
    }

    fn start(args: &[&str]) -> Self {
        let p = rmem_tests::CoordinatorProcess::start(args);
        Self {
            _daemon: Some(p.daemon),
            addr: p.addr,
        }
    }
}

/// A coordinator placing 1 MiB chunks, and `n` servers that joined it.
fn cluster(n: usize) -> (Coordinator, Vec<ServerProcess>) {
    let coord = Coordinator::start(&["--placement-chunk", "1MiB", "--lease", "5s"]);
    let endpoint = coord.addr.to_string();
    let servers: Vec<ServerProcess> = (0..n)
        .map(|i| ServerProcess::join(&endpoint, &format!("mem-{i}"), "64MiB"))
        .collect();
    (coord, servers)
}

fn rmemctl_json(coord: &Coordinator, args: &[&str]) -> serde_json::Value {
    let endpoint = coord.addr.to_string();
    let mut all = vec!["--endpoint", endpoint.as_str(), "--output", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&rmem_tests::rmemctl_ok(&all)).unwrap()
}

fn word(p: usize, round: u64) -> u64 {
    (p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round
}

struct Pages<'r> {
    r: &'r RemoteRegion,
}

impl Pages<'_> {
    fn at(&self, p: usize) -> *mut u64 {
        assert!(p < self.r.pages());
        self.r.as_ptr().wrapping_add(p * PAGE_SIZE) as *mut u64
    }
    fn write(&self, p: usize, round: u64) {
        // SAFETY: page p is inside the live region; one thread accesses it.
        unsafe { self.at(p).write_volatile(word(p, round)) };
    }
    fn read(&self, p: usize) -> u64 {
        // SAFETY: as in `write`.
        unsafe { self.at(p).read_volatile() }
    }
    fn check(&self, p: usize, round: u64) -> bool {
        self.read(p) == word(p, round)
    }
}

fn region(cluster: &Arc<Cluster>, pages: usize, budget: usize) -> RemoteRegion {
    RemoteRegion::in_cluster(
        RegionConfig {
            size: (pages * PAGE_SIZE) as u64,
            budget: (budget * PAGE_SIZE) as u64,
            fault_timeout: Duration::from_secs(20),
            ..RegionConfig::default()
        },
        cluster,
    )
    .unwrap()
}

#[test]
fn a_region_gets_its_capacity_from_the_cluster_and_frees_it_through_invalidation() {
    let (coord, servers) = cluster(3);
    let agent = Cluster::connect(&ClusterConfig::new(coord.addr.to_string())).unwrap();
    let pages = 4096;
    let r = region(&agent, pages, 256);
    let mem = Pages { r: &r };
    for p in 0..pages {
        mem.write(p, 1);
    }
    for p in 0..pages {
        assert!(mem.check(p, 1), "page {p}");
    }
    // 16 chunks of 1 MiB, spread by power of two choices over 3 servers.
    let u = used(&servers);
    assert!(u.iter().all(|&n| n > 200), "not spread: {u:?}");
    let grants = rmemctl_json(&coord, &["grants"]);
    assert_eq!(
        grants
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["pages"].as_u64().unwrap())
            .sum::<u64>(),
        2 * pages as u64,
        "the region's size, twice: the cluster's default is replicas=2"
    );
    let ivs = rmemctl_json(&coord, &["intervals"]);
    let iv = &ivs.as_array().unwrap()[0];
    // The region's handle space: handles name copies, not addresses.
    assert!(
        iv["address_space"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/regions/", agent.name())),
        "{iv}"
    );
    // The owner and the three servers holding its pages.
    assert_eq!(iv["subscribers"].as_array().unwrap().len(), 4, "{iv}");
    assert_eq!(iv["owner"].as_u64().unwrap(), agent.member_id());

    drop(r);
    // The servers freed every page before the drop returned.
    assert_eq!(used(&servers), [0, 0, 0]);
    assert!(
        rmemctl_json(&coord, &["grants"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        rmemctl_json(&coord, &["intervals"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    let st = rmemctl_json(&coord, &["status"]);
    assert_eq!(st["agents_up"], 1);
    assert_eq!(st["redundancy"], "replicas=2", "{st}");
    drop(agent);
    let st = rmemctl_json(&coord, &["status"]);
    assert_eq!(st["agents_up"], 0);
}

/// Servers tell the coordinator which data-plane transports they offer
/// (RDMA only when started with `--rdma` in a build that has it), and
/// `rmemctl servers` lists them.
#[test]
fn servers_advertise_their_transports_and_rmemctl_lists_them() {
    let coord = Coordinator::start(&[]);
    let endpoint = coord.addr.to_string();
    #[cfg_attr(not(feature = "rdma"), allow(unused_mut))]
    let mut expect = vec![("plain", vec!["tcp"])];
    let _plain = ServerProcess::start(&[
        "--capacity",
        "8MiB",
        "--coordinator",
        &endpoint,
        "--name",
        "plain",
    ]);
    // A wildcard address: the RDMA device is opened on the first client's
    // connection, so this host (no device) can start it.
    #[cfg(feature = "rdma")]
    let _verbs = ServerProcess::start(&[
        "--capacity",
        "8MiB",
        "--coordinator",
        &endpoint,
        "--name",
        "verbs",
        "--rdma",
        "--listen",
        "0.0.0.0:0",
        "--insecure",
    ]);
    #[cfg(feature = "rdma")]
    expect.push(("verbs", vec!["tcp", "rdma"]));
    let servers = rmemctl_json(&coord, &["servers"]);
    let mut seen: Vec<(String, Vec<String>)> = servers
        .as_array()
        .expect("a list of servers")
        .iter()
        .map(|s| {
            let transports = s["transports"].as_array().expect("transports");
            (
                s["name"].as_str().unwrap().to_string(),
                transports
                    .iter()
                    .map(|t| t.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        expect
            .into_iter()
            .map(|(n, t)| (n.to_string(), t.into_iter().map(String::from).collect()))
            .collect::<Vec<_>>()
    );
}

/// Held by the tests that drain a server of a `cluster(3)`: their agents
/// get the same member id from their own coordinators, so their drain
/// threads have the same name and would be counted together.
static DRAINING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == name)
        .count()
}

/// Draining a server moves the pages of every store (here twelve regions
/// of one agent, a few at a time) and every page reads back.
#[test]
fn draining_a_server_moves_its_pages_and_every_page_reads_back() {
    let _serial = DRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let (coord, servers) = cluster(3);
    let agent = Cluster::connect(&ClusterConfig::new(coord.addr.to_string())).unwrap();
    let pages = 512;
    let regions: Vec<RemoteRegion> = (0..12).map(|_| region(&agent, pages, 32)).collect();
    for r in &regions {
        let mem = Pages { r };
        for p in 0..pages {
            mem.write(p, 7);
        }
    }
    let before = settled(&servers);
    let victim = (0..3).max_by_key(|&i| before[i]).unwrap();
    assert!(before[victim] > 0);
    let drained = rmemctl_json(&coord, &["drain", &format!("mem-{victim}")]);
    assert_eq!(drained[0]["state"], "draining");
    // The agent moves the pages away, at most four stores at a time; the
    // drained server ends up empty.
    let mut most_threads = 0;
    let drainer = format!("rmem-drain-{}", agent.member_id());
    assert!(
        wait_until(Duration::from_secs(60), || {
            most_threads = most_threads.max(threads_named(&drainer));
            used(&servers)[victim] == 0
        }),
        "pages still on the drained server: {:?}",
        used(&servers)
    );
    // Four workers; a fifth may show for a moment while one that found the
    // queue empty exits as a new one starts.
    assert!(most_threads <= 5, "{most_threads} drain threads at once");
    let after = used(&servers);
    assert!(
        after.iter().sum::<u64>() >= before.iter().sum::<u64>() - 256,
        "{before:?} -> {after:?}"
    );
    // Every page, moved or not, reads back right; rewriting and evicting
    // again never touches the drained server.
    for r in &regions {
        let mem = Pages { r };
        for p in 0..pages {
            assert!(mem.check(p, 7), "page {p} wrong after the drain");
            mem.write(p, 8);
        }
        for p in 0..pages {
            assert!(mem.check(p, 8), "page {p}");
        }
    }
    assert_eq!(used(&servers)[victim], 0);
    let grants = rmemctl_json(&coord, &["grants"]);
    let victim_id = rmemctl_json(&coord, &["servers"])
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == format!("mem-{victim}"))
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    assert!(
        grants
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["server_id"].as_u64() != Some(victim_id)),
        "the drained server still holds grants: {grants}"
    );
    drop(regions);
    assert_eq!(used(&servers), [0, 0, 0]);
}

/// A drain races what the program does meanwhile: pages rewritten (their
/// old copies freed while their runs move), ranges discarded, and a whole
/// region dropped while its runs move. Nothing is lost, and nothing is
/// left behind on any server.
#[test]
fn draining_under_rewrites_discards_and_a_drop_loses_and_leaks_nothing() {
    let _serial = DRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let (coord, servers) = cluster(3);
    let agent = Cluster::connect(&ClusterConfig::new(coord.addr.to_string())).unwrap();
    let pages = 4096;
    let r = region(&agent, pages, 256);
    let doomed = region(&agent, 2048, 128);
    let (mem, gone) = (Pages { r: &r }, Pages { r: &doomed });
    for p in 0..pages {
        mem.write(p, 1);
    }
    for p in 0..doomed.pages() {
        gone.write(p, 1);
    }
    let before = settled(&servers);
    let victim = (0..3).max_by_key(|&i| before[i]).unwrap();
    rmemctl_json(&coord, &["drain", &format!("mem-{victim}")]);
    drop(doomed);
    // 0: discarded (reads as zeroes); otherwise the round last written.
    let mut expect = vec![1u64; pages];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut round = 2;
    while used(&servers)[victim] != 0 && std::time::Instant::now() < deadline {
        for p in (round as usize % 3..pages).step_by(3) {
            mem.write(p, round);
            expect[p] = round;
        }
        let first = (round as usize * 448) % (pages - 64);
        r.discard(first * PAGE_SIZE, 64 * PAGE_SIZE).unwrap();
        expect[first..first + 64].fill(0);
        round += 1;
    }
    assert_eq!(
        used(&servers)[victim],
        0,
        "pages still on the drained server after {round} rounds"
    );
    for (p, &e) in expect.iter().enumerate() {
        if e == 0 {
            assert_eq!(mem.read(p), 0, "discarded page {p}");
        } else {
            assert!(mem.check(p, e), "page {p} of round {e}");
        }
    }
    drop(r);
    assert!(
        wait_until(Duration::from_secs(10), || used(&servers) == [0, 0, 0]),
        "copies left behind: {:?}",
        used(&servers)
    );
}

/// The coordinator's default, `replicas=2`: every evicted page on two
/// servers. A server killed for good loses no page: every page reads back
/// from its other copy, within the failover delay, no fault fails, and
/// eviction goes on over the servers left.
#[test]
fn with_two_replicas_a_server_killed_for_good_loses_no_page() {
    let (coord, mut servers) = cluster(3);
    let agent = Cluster::connect(&ClusterConfig::new(coord.addr.to_string())).unwrap();
    assert_eq!(agent.redundancy(), rmem_common::Redundancy::Replicas(2));
    let pages = 4096;
    let r = region(&agent, pages, 256);
    let mem = Pages { r: &r };
    for p in 0..pages {
        mem.write(p, 1);
    }
    let held = settled(&servers);
    let remote = pages - r.stats().resident_pages;
    assert!(
        held.iter().sum::<u64>() >= 2 * remote as u64,
        "{remote} pages remote, {held:?} copies"
    );
    assert_eq!(r.stats().pages_at_risk, 0);
    let victim = (0..3).max_by_key(|&i| held[i]).unwrap();
    servers[victim].daemon.kill();
    let started = std::time::Instant::now();
    for p in 0..pages {
        assert!(mem.check(p, 1), "page {p} lost with server {victim}");
    }
    let s = r.stats();
    assert_eq!(s.faults_failed, 0);
    assert!(s.faults_degraded > 0, "{s:?}");
    // A degraded fault costs the failover delay (500 ms) once per page
    // whose first copy was on the dead server, until it is suspect.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "reading back took {:?}",
        started.elapsed()
    );
    // Eviction goes on, with two copies on the two servers left.
    for p in 0..pages {
        mem.write(p, 2);
    }
    for p in 0..pages {
        assert!(mem.check(p, 2), "page {p}");
    }
    assert_eq!(r.stats().faults_failed, 0);
    let live: Vec<ServerProcess> = servers
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, s)| s)
        .collect();
    drop(r);
    assert!(
        wait_until(Duration::from_secs(30), || used(&live) == [0, 0]),
        "copies left behind: {:?}",
        used(&live)
    );
}

/// A server killed for good is declared gone by the coordinator (lease
/// plus `server_gone_after`) and the agent rebuilds its copies at the
/// configured bandwidth, with no operator: `rmemctl status` shows the pages
/// at risk and the rebuild's progress until both are done. A second server
/// can then die too and no page is lost (without the rebuild, the pages
/// whose two copies were on those two servers would be). The gone server,
/// restarted with its pool, stays gone and its stale copies are freed.
#[test]
fn a_server_gone_for_good_is_rebuilt_without_an_operator_and_its_stale_copies_freed() {
    let coord = Coordinator::start(&[
        "--placement-chunk",
        "1MiB",
        "--lease",
        "1s",
        "--server-gone-after",
        "1s",
    ]);
    let endpoint = coord.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let start = |i: usize| {
        let pool = dir.path().join(format!("pool-{i}"));
        ServerProcess::start(&[
            "--capacity",
            "64MiB",
            "--pool-file",
            pool.to_str().unwrap(),
            "--coordinator",
            &endpoint,
            "--name",
            &format!("mem-{i}"),
        ])
    };
    let mut servers: Vec<ServerProcess> = (0..4).map(start).collect();
    let mut cc = ClusterConfig::new(endpoint.clone());
    const BANDWIDTH: u64 = 2 << 20;
    cc.rebuild_bandwidth = Some(BANDWIDTH);
    let agent = Cluster::connect(&cc).unwrap();
    let pages = 4096;
    let r = region(&agent, pages, 256);
    let mem = Pages { r: &r };
    for p in 0..pages {
        mem.write(p, 1);
    }
    let held = settled(&servers);
    let mut by_use: Vec<usize> = (0..4).collect();
    by_use.sort_by_key(|&i| std::cmp::Reverse(held[i]));
    let (first, second) = (by_use[0], by_use[1]);
    servers[first].daemon.kill();
    let status = || rmemctl_json(&coord, &["status"]);
    assert!(
        wait_until(Duration::from_secs(30), || status()["servers_gone"] == 1),
        "the dead server was not declared gone: {}",
        status()
    );
    let gone_at = std::time::Instant::now();
    // The rebuild goes at the agent's bandwidth: the pages at risk show.
    let mut seen_at_risk = 0;
    assert!(
        wait_until(Duration::from_secs(90), || {
            let s = status();
            seen_at_risk = seen_at_risk.max(s["pages_at_risk"].as_u64().unwrap());
            s["pages_at_risk"] == 0 && s["rebuild_pages_left"] == 0 && seen_at_risk > 0
        }),
        "the rebuild did not finish: {} (most at risk seen: {seen_at_risk})",
        status()
    );
    let took = gone_at.elapsed();
    let total = status()["rebuild_pages_total"].as_u64().unwrap();
    assert!(total > 0);
    // The copies on the dead server were about a quarter of all copies.
    let rebuilt_bytes = held[first] * PAGE_SIZE as u64;
    let floor = Duration::from_secs_f64(rebuilt_bytes as f64 / BANDWIDTH as f64 * 0.7);
    assert!(
        took >= floor,
        "{rebuilt_bytes} bytes rebuilt in {took:?}: faster than the bandwidth allows"
    );
    eprintln!(
        "rebuilt {} pages of mem-{first} in {took:?} at most {seen_at_risk} pages at risk",
        held[first]
    );
    servers[second].daemon.kill();
    for p in 0..pages {
        assert!(
            mem.check(p, 1),
            "page {p} lost with mem-{first} and mem-{second}"
        );
    }
    assert_eq!(r.stats().faults_failed, 0);

    // The gone server comes back with its pool: it stays gone (nothing is
    // placed or read there), and what it holds is stale and freed.
    servers[first] = start(first);
    let state = |name: &str| {
        rmemctl_json(&coord, &["servers"])
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap()["state"]
            .clone()
    };
    let name = format!("mem-{first}");
    assert_eq!(state(&name), "gone");
    assert!(
        wait_until(Duration::from_secs(30), || used(&servers[first..=first])
            == [0]),
        "stale copies kept on the server that came back: {:?}",
        used(&servers[first..=first])
    );
    rmemctl_json(&coord, &["undrain", &name]);
    assert_eq!(state(&name), "up");
    for p in 0..pages {
        assert!(mem.check(p, 1), "page {p}");
    }
}

/// `ec=2+1` set as the cluster's default: every batch is cut into stripes
/// of two data pages and one parity page on three distinct servers, 1.5x
/// the memory. A server killed for good loses no page: faults rebuild its
/// pages from the other two of their stripes; once it is declared gone its
/// slots are rebuilt elsewhere, so a second loss loses nothing either. Pages
/// rewritten meanwhile free their stripes once each stripe's last page is
/// dead; a drain moves every slot off its server; and nothing is left on
/// any server once the region is dropped.
#[test]
fn erasure_coded_pages_survive_two_losses_one_after_the_other() {
    let coord = Coordinator::start(&[
        "--placement-chunk",
        "1MiB",
        "--lease",
        "1s",
        "--server-gone-after",
        "1s",
        "--redundancy",
        "ec=2+1",
    ]);
    let endpoint = coord.addr.to_string();
    let mut servers: Vec<ServerProcess> = (0..5)
        .map(|i| ServerProcess::join(&endpoint, &format!("mem-{i}"), "64MiB"))
        .collect();
    let agent = Cluster::connect(&ClusterConfig::new(endpoint)).unwrap();
    assert_eq!(
        agent.redundancy(),
        rmem_common::Redundancy::Erasure { data: 2, parity: 1 }
    );
    let pages = 4096;
    let r = region(&agent, pages, 256);
    let mem = Pages { r: &r };
    for p in 0..pages {
        mem.write(p, 1);
    }
    let held = settled(&servers);
    let remote = (pages - r.stats().resident_pages) as u64;
    let total: u64 = held.iter().sum();
    // Data plus half as much parity (short last stripes round up).
    assert!(
        total >= remote * 3 / 2 && total <= remote * 3 / 2 + remote / 8,
        "{remote} pages remote, {held:?} held"
    );
    assert_eq!(r.stats().pages_at_risk, 0);
    let mut dead = Vec::new();
    let mut kill_fullest = |servers: &mut Vec<ServerProcess>, held: &[u64]| {
        let i = (0..servers.len()).max_by_key(|&i| held[i]).unwrap();
        let mut s = servers.remove(i);
        s.daemon.kill();
        dead.push(s);
    };
    kill_fullest(&mut servers, &held);
    for p in 0..pages {
        assert!(mem.check(p, 1), "page {p} lost with one server");
    }
    let s = r.stats();
    assert_eq!(s.faults_failed, 0);
    assert!(s.faults_degraded > 0, "no fault was rebuilt: {s:?}");
    let status = || rmemctl_json(&coord, &["status"]);
    assert!(
        wait_until(Duration::from_secs(30), || status()["servers_gone"] == 1),
        "the dead server was not declared gone: {}",
        status()
    );
    let gone_at = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let s = status();
            s["pages_at_risk"] == 0 && s["rebuild_pages_left"] == 0
        }),
        "the dead server's stripe pages were not rebuilt: {}",
        status()
    );
    // Not a benchmark (loopback, one agent, no bandwidth limit): the
    // order of magnitude of a rebuild that decodes every page.
    eprintln!(
        "ec=2+1: rebuilt {} stripe pages of a gone server in {:?} (within 50 ms polls)",
        status()["rebuild_pages_total"],
        gone_at.elapsed()
    );
    for p in 0..pages {
        mem.write(p, 2);
    }
    // A drain moves every slot, those holding no live page too (a short
    // piece's, or one whose stripes' pages there all died in the
    // rewrites): the drained server ends up with neither pages nor grants.
    let held = settled(&servers);
    let drained = (0..servers.len()).max_by_key(|&i| held[i]).unwrap();
    let addr = servers[drained].data.to_string();
    let name = rmemctl_json(&coord, &["servers"])
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["data_addr"] == addr.as_str())
        .expect("the server is a member")["name"]
        .as_str()
        .unwrap()
        .to_string();
    rmemctl_json(&coord, &["drain", &name]);
    let grants_on = |name: &str| {
        rmemctl_json(&coord, &["grants"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["server_name"] == name)
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(60), || {
            used(&servers[drained..=drained]) == [0] && grants_on(&name) == 0
        }),
        "the drain did not finish: {:?} pages, {} grants left",
        used(&servers[drained..=drained]),
        grants_on(&name)
    );
    for p in 0..pages {
        assert!(mem.check(p, 2), "page {p} after the drain");
    }
    let drained = servers.remove(drained);
    let held = settled(&servers);
    kill_fullest(&mut servers, &held);
    for p in 0..pages {
        assert!(mem.check(p, 2), "page {p} lost with two servers");
    }
    assert_eq!(r.stats().faults_failed, 0);
    drop(r);
    servers.push(drained);
    assert!(
        wait_until(Duration::from_secs(30), || used(&servers) == [0, 0, 0]),
        "stripe pages left behind: {:?}",
        used(&servers)
    );
}

#[test]
fn the_demo_runs_against_a_cluster() {
    let (coord, servers) = cluster(3);
    let v = demo_in_cluster(&coord.addr.to_string(), &[], 3);
    assert_eq!(v["server_pages_after_drop"], 0);
    assert_eq!(used(&servers), [0, 0, 0]);
}

/// The demo's verifying workload on the cluster of `endpoint` (with
/// `flags` before the subcommand), which must have `servers` servers:
/// its JSON report, checked to have evicted and verified.
fn demo_in_cluster(endpoint: &str, flags: &[String], servers: usize) -> serde_json::Value {
    let out = std::process::Command::new(bin("rmem-agent"))
        .args(flags)
        .args([
            "demo", "--json", "--budget", "2MiB", "--size", "8MiB", "--ops", "20000",
        ])
        .args(["--coordinator", endpoint])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verify_ok"], true, "{v}");
    assert!(v["pages_evicted"].as_u64().unwrap() > 1000, "{v}");
    let said = format!("{servers} servers");
    assert!(v["server"].as_str().unwrap().contains(&said), "{v}");
    v
}

#[test]
fn pages_of_an_agent_that_died_are_freed_after_the_reap_delay() {
    let coord = Coordinator::start(&[
        "--placement-chunk",
        "1MiB",
        "--lease",
        "500ms",
        "--reap-after",
        "1s",
    ]);
    let endpoint = coord.addr.to_string();
    let servers: Vec<ServerProcess> = (0..2)
        .map(|i| {
            ServerProcess::start(&[
                "--capacity",
                "64MiB",
                "--coordinator",
                &endpoint,
                "--name",
                &format!("m{i}"),
            ])
        })
        .collect();
    let mut agent = std::process::Command::new(bin("rmem-agent"))
        .args([
            "demo", "--budget", "1MiB", "--size", "16MiB", "--ops", "10000000",
        ])
        .args(["--coordinator", &endpoint])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || used(&servers)
            .iter()
            .sum::<u64>()
            > 1000),
        "the agent never evicted"
    );
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert!(used(&servers).iter().sum::<u64>() > 0);
    // Lease lapses after 0.5 s, reaping 1 s later: the servers free its
    // pages and the coordinator returns its capacity.
    assert!(
        wait_until(Duration::from_secs(20), || used(&servers) == [0, 0]),
        "pages of the dead agent still held: {:?}",
        used(&servers)
    );
    assert!(wait_until(Duration::from_secs(5), || rmemctl_json(
        &coord,
        &["grants"]
    )
    .as_array()
    .unwrap()
    .is_empty()));
    assert!(
        rmemctl_json(&coord, &["intervals"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn local_cluster_script_starts_and_stops_a_cluster() {
    local_cluster(1);
}

#[test]
fn local_cluster_script_runs_coordinator_replicas_on_a_local_etcd() {
    local_cluster(2);
}

/// `deploy/local-cluster.sh up` with two servers and `coordinators`
/// coordinators (more than one: replicas on a local etcd), checked, then
/// `down`.
fn local_cluster(coordinators: u16) {
    let dir = tempfile::tempdir().unwrap();
    // A base port below the kernel's ephemeral range (32768..), so the
    // other tests' sockets cannot take it meanwhile, with every port the
    // script uses free (the coordinators from base, base+10.. for two
    // servers, base+50.. and +60.. for their metrics, +80 for the agent's,
    // base+90 and +91 for etcd).
    let port = (0..1000)
        .map(|k| {
            20_000
                + ((std::process::id() as u16).wrapping_add(k * 37 + coordinators * 500) % 12_000)
        })
        .find(|&p| {
            (0..coordinators)
                .map(|i| p + i)
                .flat_map(|i| [p + i, p + 50 + i])
                .chain([p + 10, p + 11, p + 12, p + 13, p + 60, p + 61, p + 80])
                .chain([p + 90, p + 91])
                .all(|q| std::net::TcpListener::bind(("127.0.0.1", q)).is_ok())
        })
        .expect("a free base port");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local-cluster.sh");
    bin("rmemctl"); // builds the binaries the script runs
    let run = |args: &[&str]| {
        std::process::Command::new("bash")
            .arg(&script)
            .args(args)
            .env("RMEM_BIN_DIR", rmem_tests::target_dir())
            .env("RMEM_LOCAL_DIR", dir.path())
            .output()
            .unwrap()
    };
    let up = run(&[
        "up",
        "--servers",
        "2",
        "--coordinators",
        &coordinators.to_string(),
        "--port",
        &port.to_string(),
        "--agent-size",
        "4MiB",
    ]);
    let down_on_panic = scopeguard(|| {
        run(&["down"]);
    });
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let endpoint = String::from_utf8(up.stdout).unwrap().trim().to_string();
    let expected: Vec<String> = (0..coordinators)
        .map(|i| format!("127.0.0.1:{}", port + i))
        .collect();
    assert_eq!(endpoint, expected.join(","));
    // DIR/env, as a shell would source it: rmemctl and the agent pick the
    // cluster and their certificates up from it.
    let env: Vec<(String, String)> = std::fs::read_to_string(dir.path().join("env"))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert!(
        env.iter()
            .any(|(k, v)| k == "RMEM_ENDPOINT" && *v == endpoint),
        "{env:?}"
    );
    let sourced = |program: &str| {
        let mut c = std::process::Command::new(bin(program));
        c.envs(env.iter().map(|(k, v)| (k, v)));
        c
    };
    let status = || {
        let out = sourced("rmemctl")
            .args(["status", "--output", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // Without the certificates the coordinator is out of reach.
    let plain = std::process::Command::new(bin("rmemctl"))
        .args(["--endpoint", &endpoint, "--timeout", "2s", "status"])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plaintext reached the coordinator");
    let st = status();
    assert_eq!(st["servers_up"], 2, "{st}");
    if coordinators > 1 {
        assert_eq!(st["state_backend"], "etcd", "{st}");
        assert_eq!(
            st["replicas"].as_array().unwrap().len(),
            usize::from(coordinators),
            "{st}"
        );
    }
    assert!(
        wait_until(Duration::from_secs(20), || status()["agents_up"] == 1),
        "the agent never joined"
    );
    // Every daemon's metrics, over mutual TLS for the monitor certificate
    // (the agent's once it evicted), and DIR/prometheus.yml scrapes them.
    let monitor = rmem_common::tls::TlsFiles {
        ca_file: dir.path().join("pki/ca.pem"),
        cert_file: dir.path().join("pki/monitor-local-prometheus.pem"),
        key_file: dir.path().join("pki/monitor-local-prometheus.key"),
        crl_file: None,
    }
    .read()
    .unwrap();
    let daemons = (0..coordinators)
        .map(|i| ("coordinator", port + 50 + i))
        .chain([
            ("server", port + 60),
            ("server", port + 61),
            ("agent", port + 80),
        ]);
    for (daemon, p) in daemons {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], p));
        let mut last = None;
        let ok = wait_until(Duration::from_secs(30), || {
            last = Some(rmem_tests::metrics::get(addr, "/metrics", Some(&monitor)));
            matches!(&last, Some(Ok(r)) if r.status == 200
                && (daemon != "agent" || rmem_tests::metrics::value(&r.body, "rmem_agent_pages_evicted_total", &[]).unwrap_or(0.0) > 0.0))
        });
        assert!(ok, "{daemon} metrics on {addr}: {last:?}");
        let body = last.unwrap().unwrap().body;
        rmem_tests::metrics::promtool_check(&body).unwrap_or_else(|e| panic!("{daemon}: {e}"));
    }
    let check = std::process::Command::new("promtool")
        .args(["check", "config"])
        .arg(dir.path().join("prometheus.yml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // The demo, as a user runs it once the file is sourced: on the cluster,
    // as the agent local-you, every byte verified.
    let demo = sourced("rmem-agent")
        .args([
            "demo", "--json", "--budget", "1MiB", "--size", "4MiB", "--ops", "5000",
        ])
        .output()
        .unwrap();
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&demo.stdout).unwrap();
    assert_eq!(v["verify_ok"], true, "{v}");
    assert!(v["server"].as_str().unwrap().contains("2 servers"), "{v}");
    // `status` finds the endpoints `up` wrote.
    let text = run(&["status"]);
    assert!(
        text.status.success(),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
    drop(down_on_panic);
    let pids = std::fs::read_dir(dir.path().join("pids")).unwrap().count();
    assert_eq!(pids, 0, "pid files left behind");
    let gone = std::process::Command::new(bin("rmemctl"))
        .args(["--endpoint", &endpoint, "--timeout", "1s", "status"])
        .output()
        .unwrap();
    assert_eq!(gone.status.code(), Some(3), "the coordinator still answers");
}

/// Runs `f` when dropped (also while a failed assertion unwinds).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[test]
fn discarding_a_range_in_a_cluster_frees_it_on_every_server_through_invalidation() {
    let (coord, servers) = cluster(3);
    let agent = Cluster::connect(&ClusterConfig::new(coord.addr.to_string())).unwrap();
    let pages = 4096;
    let r = region(&agent, pages, 256);
    let mem = Pages { r: &r };
    for p in 0..pages {
        mem.write(p, 3);
    }
    let held: u64 = settled(&servers).iter().sum();
    let before = rmemctl_json(&coord, &["status"])["invalidations_total"]
        .as_u64()
        .unwrap();
    r.discard(0, 2048 * PAGE_SIZE).unwrap();
    // Freed by the servers before discard returned.
    let now: u64 = used(&servers).iter().sum();
    assert!(now <= held - 1800, "{held} -> {now}");
    let after = rmemctl_json(&coord, &["status"])["invalidations_total"]
        .as_u64()
        .unwrap();
    assert_eq!(
        after,
        before + 1,
        "the discard went through one invalidation"
    );
    for p in 0..pages {
        let want = if p < 2048 { 0 } else { word(p, 3) };
        assert_eq!(mem.read(p), want, "page {p}");
    }
}

#[test]
fn a_fenced_server_reconciles_its_pages_when_it_registers_again() {
    // The lease is long against the invalidation deadline: the stopped
    // server must be fenced for missing the invalidation, not expire
    // first (with a 1 s lease it sometimes did on a busy machine).
    let coord = Coordinator::start(&[
        "--placement-chunk",
        "1MiB",
        "--lease",
        "3s",
        "--invalidation-deadline",
        "300ms",
    ]);
    let endpoint = coord.addr.to_string();
    let mem = ServerProcess::start(&[
        "--capacity",
        "64MiB",
        "--coordinator",
        &endpoint,
        "--name",
        "mem",
    ]);
    let agent = Cluster::connect(&ClusterConfig::new(endpoint.clone())).unwrap();
    let kept = region(&agent, 2048, 128);
    let gone = RemoteRegion::in_cluster(
        RegionConfig {
            size: (1024 * PAGE_SIZE) as u64,
            budget: (64 * PAGE_SIZE) as u64,
            fault_timeout: Duration::from_millis(500),
            ..RegionConfig::default()
        },
        &agent,
    )
    .unwrap();
    for (r, round) in [(&kept, 1), (&gone, 2)] {
        let m = Pages { r };
        for p in 0..r.pages() {
            m.write(p, round);
        }
    }
    assert!(used(std::slice::from_ref(&mem))[0] > 2000);
    let mem_id = rmemctl_json(&coord, &["servers"])[0]["id"]
        .as_u64()
        .unwrap();

    // The server stops answering; the region dropped meanwhile fences it,
    // and its direct FREE fallback cannot reach it either: those pages are
    // orphans on the server, and it is no longer subscribed to `kept`.
    mem.daemon.signal(libc::SIGSTOP);
    drop(gone);
    mem.daemon.signal(libc::SIGCONT);
    assert!(
        wait_until(Duration::from_secs(30), || {
            let ivs = rmemctl_json(&coord, &["intervals"]);
            ivs.as_array().unwrap().len() == 1
                && ivs[0]["subscribers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s.as_u64() == Some(mem_id))
        }),
        "the server did not subscribe again to the interval whose pages it holds: {}",
        rmemctl_json(&coord, &["intervals"])
    );
    assert!(
        rmemctl_json(&coord, &["status"])["members_fenced_total"]
            .as_u64()
            .unwrap()
            >= 1
    );
    // Every page of `kept` is still there and right.
    let m = Pages { r: &kept };
    for p in 0..kept.pages() {
        assert!(m.check(p, 1), "page {p}");
    }
    // Dropping `kept` reaches the server again, and the orphans of `gone`
    // were freed when it registered again: nothing is left.
    drop(kept);
    assert_eq!(used(std::slice::from_ref(&mem)), [0]);
}

#[test]
fn a_coordinator_that_lost_its_state_never_makes_a_server_free_pages() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let pool = pool.to_str().unwrap();
    let first =
        rmem_tests::CoordinatorProcess::start(&["--placement-chunk", "1MiB", "--lease", "1s"]);
    let endpoint = first.addr.to_string();
    let server_args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--capacity",
            "64MiB",
            "--pool-file",
            pool,
            "--coordinator",
            &endpoint,
            "--name",
            "mem",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let args = server_args(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut mem = ServerProcess::start(&args);
    let agent = Cluster::connect(&ClusterConfig::new(endpoint.clone())).unwrap();
    let r = region(&agent, 2048, 128);
    let m = Pages { r: &r };
    for p in 0..r.pages() {
        m.write(p, 1);
    }
    // The evictor may still be moving the last pages out.
    let stored = settled(std::slice::from_ref(&mem))[0];
    assert!(stored > 1800, "{stored} pages stored");

    // The coordinator comes back without its state (`--ephemeral`, as a
    // lost volume would): another cluster identity, no intervals.
    drop(first);
    let second = rmem_tests::CoordinatorProcess::start(&[
        "--placement-chunk",
        "1MiB",
        "--lease",
        "1s",
        "--listen",
        &endpoint,
    ]);
    // The reconcile of the registration is done once the server is listed.
    let coord = Coordinator::at(second.addr);
    assert!(wait_until(Duration::from_secs(30), || {
        rmemctl_json(&coord, &["servers"]).as_array().unwrap().len() == 1
    }));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        used(std::slice::from_ref(&mem)),
        [stored],
        "pages were freed"
    );
    for p in 0..r.pages() {
        assert!(m.check(p, 1), "page {p} lost after the coordinator forgot");
    }
    assert!(
        mem.daemon
            .wait_for_log(
                "the coordinator does not know the pages stored here: freeing none on its word",
                Duration::from_secs(10)
            )
            .is_some(),
        "the server did not say why it keeps its pages:\n{}",
        mem.daemon.log_text()
    );
    let stats = rmemctl_json(&coord, &["stats"]);
    assert_eq!(
        stats["servers"][0]["coordinator_unknown"], true,
        "rmemctl stats does not show it: {stats}"
    );
    assert_ne!(
        stats["servers"][0]["cluster_id"],
        rmemctl_json(&coord, &["status"])["cluster_id"]
    );

    // The region goes; the new coordinator never knew its interval, so
    // its pages stay (a leak, never a loss). A server restarted on the same
    // pool file still knows which cluster they belong to, and frees them
    // only once told to accept the new coordinator's view.
    drop(r);
    mem.daemon.terminate(Duration::from_secs(10));
    let args = server_args(&["--adopt-unknown-after", "2s"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mem = ServerProcess::start(&args);
    assert!(
        mem.daemon
            .wait_for_log(
                "the coordinator does not know the pages stored here: freeing none on its word",
                Duration::from_secs(30)
            )
            .is_some(),
        "the pool file did not keep the cluster's identity:\n{}",
        mem.daemon.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(30), || used(std::slice::from_ref(&mem))
            == [0]),
        "pages of no interval were not freed after adopt_unknown_after: {:?}\n{}",
        used(std::slice::from_ref(&mem)),
        mem.daemon.log_text()
    );
    drop(agent);
}

#[test]
fn a_region_waits_for_servers_briefly_out_of_service() {
    // The only server is drained (as if fenced while a new leader hears
    // from it): a region made meanwhile waits for it instead of failing.
    let (coord, _servers) = cluster(1);
    rmemctl_json(&coord, &["drain", "mem-0"]);
    let agent = Cluster::connect(&ClusterConfig::new(coord.addr.to_string())).unwrap();
    let started = std::time::Instant::now();
    let back = std::thread::spawn({
        let endpoint = coord.addr.to_string();
        move || {
            std::thread::sleep(Duration::from_millis(1500));
            rmem_tests::rmemctl_ok(&["--endpoint", &endpoint, "undrain", "mem-0"]);
        }
    });
    let r = region(&agent, 256, 64);
    back.join().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1500));
    // It works: every page written (most evicted) comes back.
    let mem = Pages { r: &r };
    for p in 0..256 {
        mem.write(p, 1);
    }
    for p in 0..256 {
        assert!(mem.check(p, 1), "page {p}");
    }
}

#[test]
fn a_stripe_wider_than_the_cluster_is_refused_and_holds_no_capacity() {
    // Two servers: ec=2+1 needs its two data pages and a parity page on
    // three. The region is refused with a clear error, and the grants the
    // coordinator offered are returned, not kept by an agent that cannot
    // use them.
    let (coord, _servers) = cluster(2);
    let agent = Cluster::connect(&ClusterConfig::new(coord.addr.to_string())).unwrap();
    let err = RemoteRegion::in_cluster(
        RegionConfig {
            size: (256 * PAGE_SIZE) as u64,
            budget: (64 * PAGE_SIZE) as u64,
            redundancy: Some(rmem_common::Redundancy::Erasure { data: 2, parity: 1 }),
            ..RegionConfig::default()
        },
        &agent,
    )
    .expect_err("an ec=2+1 region on two servers");
    let mut why = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        why.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert!(
        why.contains("ec=2+1 needs room on at least 3 servers, and the cluster granted it on 2"),
        "{why}"
    );
    let grants = rmemctl_json(&coord, &["grants"]);
    assert_eq!(
        grants.as_array().map(Vec::len),
        Some(0),
        "grants kept: {grants}"
    );
}

#[test]
fn frees_a_stalled_server_missed_are_paid_once_it_answers_again() {
    // Invalidations that wait 300 ms for a server: the first discard below
    // fences the stopped server (which unsubscribes it), so the second
    // one's invalidation completes without it. Both fall back to freeing
    // directly, which the stopped server cannot answer either: it owes
    // those frees. Its reconcile cannot free them (the region's interval
    // still covers them), and the region lives on: they used to leak
    // until it was dropped.
    let coord = Coordinator::start(&[
        "--placement-chunk",
        "1MiB",
        "--lease",
        "1s",
        "--invalidation-deadline",
        "300ms",
    ]);
    let endpoint = coord.addr.to_string();
    let mem = ServerProcess::join(&endpoint, "mem", "64MiB");
    let agent = Cluster::connect(&ClusterConfig::new(endpoint)).unwrap();
    let r = RemoteRegion::in_cluster(
        RegionConfig {
            size: (512 * PAGE_SIZE) as u64,
            budget: (64 * PAGE_SIZE) as u64,
            fault_timeout: Duration::from_secs(2),
            ..RegionConfig::default()
        },
        &agent,
    )
    .unwrap();
    let m = Pages { r: &r };
    for p in 0..r.pages() {
        m.write(p, 3);
    }
    let held = used(std::slice::from_ref(&mem))[0];
    assert!(held > 256, "only {held} pages evicted");
    mem.daemon.signal(libc::SIGSTOP);
    r.discard(0, 256 * PAGE_SIZE).unwrap();
    r.discard(256 * PAGE_SIZE, 256 * PAGE_SIZE).unwrap();
    mem.daemon.signal(libc::SIGCONT);
    assert!(
        wait_until(Duration::from_secs(10), || {
            rmemctl_json(&coord, &["servers"])[0]["state"] == "up"
        }),
        "{}",
        rmemctl_json(&coord, &["servers"])
    );
    // Every page of the region was discarded: nothing may stay remote.
    assert!(
        wait_until(Duration::from_secs(30), || used(std::slice::from_ref(&mem))
            == [0]),
        "the server still holds {:?} of {held} discarded pages",
        used(std::slice::from_ref(&mem))
    );
    assert!(
        m.read(0) == 0 && m.read(511) == 0,
        "discarded pages do not read as zeroes"
    );
    drop(r);
}

#[test]
fn a_server_stalled_past_its_lease_costs_a_wait_not_the_program() {
    // The case: a 12 s stall, past the server's lease (2 s here),
    // used to outlast the fault timeout (then 10 s) and give SIGBUS.
    let (coord, servers) = cluster(1);
    let agent = Cluster::connect(&ClusterConfig::new(coord.addr.to_string())).unwrap();
    let r = RemoteRegion::in_cluster(
        RegionConfig {
            size: (512 * PAGE_SIZE) as u64,
            budget: (64 * PAGE_SIZE) as u64,
            // The default wait, as every agent has it.
            ..RegionConfig::default()
        },
        &agent,
    )
    .unwrap();
    let m = Pages { r: &r };
    for p in 0..r.pages() {
        m.write(p, 7);
    }
    let mem = &servers[0];
    mem.daemon.signal(libc::SIGSTOP);
    let stalled = std::time::Instant::now();
    let pid = mem.daemon.process_id().unwrap();
    let resume = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(12));
        // SAFETY: kill(2) on the server's pid, which the test still owns.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    });
    // Every page reads back right: the faults on evicted pages wait for the
    // server to come back.
    for p in 0..r.pages() {
        assert!(m.check(p, 7), "page {p}");
    }
    resume.join().unwrap();
    assert!(
        stalled.elapsed() >= Duration::from_secs(12),
        "no fault waited on the stalled server"
    );
    // The server lost its lease meanwhile and registered again.
    assert!(
        wait_until(Duration::from_secs(10), || {
            rmemctl_json(&coord, &["servers"])[0]["state"] == "up"
        }),
        "{}",
        rmemctl_json(&coord, &["servers"])
    );
    assert!(
        mem.daemon
            .wait_for_log(
                "membership lost: dropping mirrors and registering again",
                Duration::from_secs(10)
            )
            .is_some(),
        "the stall did not outlast the lease:\n{}",
        mem.daemon.log_text()
    );
}

#[test]
fn members_started_while_the_coordinator_is_down_join_once_it_is_up() {
    // The coordinator's address, free for now.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let endpoint = addr.to_string();
    let start_coordinator = || {
        rmem_tests::CoordinatorProcess::start(&[
            "--placement-chunk",
            "1MiB",
            "--lease",
            "2s",
            "--listen",
            &addr.to_string(),
        ])
    };
    // A server started first is ready only once it joined.
    let server = Daemon::spawn(
        "rmem-server",
        &[
            "--log-format",
            "json",
            "--listen",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--capacity",
            "64MiB",
            "--coordinator",
            &endpoint,
            "--name",
            "early",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(server.find_log("memory server ready").is_none());
    let coordinator = start_coordinator();
    let ready = server
        .wait_for_log("memory server ready", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the server did not join:\n{}", server.log_text()));
    assert!(
        server
            .find_log("joining the cluster: the coordinator is not reachable; trying again")
            .is_some(),
        "{}",
        server.log_text()
    );
    let data: SocketAddr = ready["fields"]["data"].as_str().unwrap().parse().unwrap();

    // An agent joining while the coordinator restarts waits for it too.
    drop(coordinator);
    let joining = {
        let endpoint = endpoint.clone();
        std::thread::spawn(move || Cluster::connect(&ClusterConfig::new(endpoint)))
    };
    std::thread::sleep(Duration::from_secs(2));
    let second = start_coordinator();
    let agent = joining.join().unwrap().unwrap();
    // The server registers again with the restarted (ephemeral) one.
    let coord = Coordinator::at(second.addr);
    assert!(
        wait_until(Duration::from_secs(30), || {
            rmemctl_json(&coord, &["servers"]).as_array().unwrap().len() == 1
        }),
        "the server did not register again:\n{}",
        server.log_text()
    );
    let r = region(&agent, 512, 64);
    let m = Pages { r: &r };
    for p in 0..r.pages() {
        m.write(p, 3);
    }
    for p in 0..r.pages() {
        assert!(m.check(p, 3), "page {p}");
    }
    drop(r);
    let stat = BlockingConnection::connect(&rmem_client::ClientConfig::new(data.to_string()))
        .unwrap()
        .stat()
        .unwrap();
    assert_eq!(stat.used_pages, 0);

    // A wrong endpoint is not retried: it fails at once, clearly.
    let started = std::time::Instant::now();
    let mut cc = ClusterConfig::new("not a host:port");
    cc.join_timeout = Duration::from_secs(30);
    assert!(Cluster::connect(&cc).is_err());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_cluster_on_mutual_tls_serves_its_members_and_no_one_else() {
    let lab = rmem_tests::pki::Lab::new(&[
        ("coordinator", "c1"),
        ("server", "mem-0"),
        ("server", "mem-1"),
        ("agent", "node-1"),
        ("admin", "alice"),
    ]);
    let stranger = rmem_tests::pki::Lab::new(&[("agent", "mallory")]);
    let flags = |who: &str| lab.flags(who);
    let args = |extra: &[&str], who: &str| {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(flags(who));
        v
    };
    let coord = {
        let a = args(&["--placement-chunk", "1MiB"], "coordinator-c1");
        Coordinator::start(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let endpoint = coord.addr.to_string();
    // Servers take their member names from their certificates.
    let servers: Vec<ServerProcess> = ["mem-0", "mem-1"]
        .iter()
        .map(|name| {
            let a = args(
                &["--capacity", "64MiB", "--coordinator", &endpoint],
                &format!("server-{name}"),
            );
            ServerProcess::start(&a.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .collect();

    // The agent's verifying workload, every connection on mutual TLS.
    demo_in_cluster(&endpoint, &flags("agent-node-1"), 2);

    let data = servers[0].data.to_string();
    let connect = |pem: Option<rmem_common::tls::TlsPem>, server: Option<&str>| {
        let mut c = rmem_client::ClientConfig::new(data.clone());
        c.connect_timeout = Duration::from_secs(5);
        if let Some(pem) = pem {
            c = c.with_tls(pem.data_client().unwrap(), server.map(str::to_string));
        }
        BlockingConnection::connect(&c)
    };
    // An admin reads the server's use over TLS: what the demo stored is freed.
    let mut admin = connect(Some(lab.pem(&lab, "admin-alice")), Some("mem-0")).unwrap();
    assert_eq!(admin.stat().unwrap().used_pages, 0);
    // Plaintext is told TLS is required.
    match connect(None, None) {
        Err(rmem_client::ClientError::Rejected { code, message, .. }) => {
            assert_eq!(code, rmem_proto::wire::ErrorCode::AuthFailed);
            assert!(message.contains("requires TLS"), "{message}");
        }
        other => panic!("plaintext was not refused: {other:?}"),
    }
    // A server's certificate does not open the data plane to its holder.
    match connect(Some(lab.pem(&lab, "server-mem-1")), None) {
        Err(rmem_client::ClientError::Rejected { code, message, .. }) => {
            assert_eq!(code, rmem_proto::wire::ErrorCode::AuthFailed);
            assert!(message.contains("only agents and admins"), "{message}");
        }
        other => panic!("a server's certificate was accepted: {other:?}"),
    }
    // A certificate from another CA fails the handshake.
    let e = connect(Some(stranger.pem(&lab, "agent-mallory")), None).unwrap_err();
    assert!(
        matches!(
            e,
            rmem_client::ClientError::Tls { .. }
                | rmem_client::ClientError::Io { .. }
                | rmem_client::ClientError::Closed { .. }
        ),
        "{e:?}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || servers[0]
            .daemon
            .log_text()
            .contains("TLS handshake failed")),
        "{}",
        servers[0].daemon.log_text()
    );
    // An impostor: a server certificate of another CA is not trusted by an
    // agent, and a server of the cluster is not the one the agent meant.
    let e = connect(Some(lab.pem(&stranger, "agent-node-1")), Some("mem-0")).unwrap_err();
    assert!(matches!(e, rmem_client::ClientError::Tls { .. }), "{e:?}");
    let e = connect(Some(lab.pem(&lab, "agent-node-1")), Some("mem-1")).unwrap_err();
    match e {
        rmem_client::ClientError::Tls { message, .. } => {
            assert!(message.contains("not server mem-1"), "{message}")
        }
        other => panic!("{other:?}"),
    }

    // The servers' statistics are for admins: rmemctl with alice's
    // certificate reads them, with the agent's it is refused.
    let stats = |who: &str| {
        let mut a = vec!["--endpoint".to_string(), endpoint.clone()];
        a.extend(flags(who));
        a.extend(["--output".into(), "json".into(), "stats".into()]);
        let out = rmem_tests::rmemctl_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let by_admin = stats("admin-alice");
    for s in by_admin["servers"].as_array().unwrap() {
        assert!(s["error"].is_null(), "{by_admin}");
        assert_eq!(s["capacity_pages"], 16384, "{by_admin}");
    }
    let by_agent = stats("agent-node-1");
    for s in by_agent["servers"].as_array().unwrap() {
        assert!(
            s["error"].as_str().unwrap_or("").contains("for admins"),
            "{by_agent}"
        );
    }
}

#[test]
fn a_member_runs_only_as_its_certificate_says() {
    let lab = rmem_tests::pki::Lab::new(&[("agent", "node-1"), ("server", "mem-0")]);
    // A server with an agent's certificate, or under another name, does
    // not start.
    for (who, extra, says) in [
        (
            "agent-node-1",
            vec![],
            "a server needs a server certificate",
        ),
        (
            "server-mem-0",
            vec!["--coordinator", "127.0.0.1:1", "--name", "mem-9"],
            "`mem-9` is not the name the certificate gives",
        ),
    ] {
        let out = std::process::Command::new(bin("rmem-server"))
            .args(["--listen", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
            .args(extra)
            .args(lab.flags(who))
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn an_agent_reaches_only_the_handles_its_capabilities_name() {
    use rmem_client::control::{ControlClient, Credentials};
    use rmem_client::{Capabilities, ClientConfig, PageStatus};
    use rmem_proto::control::v1 as pb;
    let lab = rmem_tests::pki::Lab::new(&[
        ("coordinator", "c1"),
        ("server", "mem-0"),
        ("agent", "node-1"),
        ("agent", "node-2"),
        ("admin", "alice"),
    ]);
    let with = |extra: &[&str], who: &str| {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(lab.flags(who));
        v
    };
    let coord = {
        let a = with(&[], "coordinator-c1");
        Coordinator::start(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let endpoint = coord.addr.to_string();
    let server = {
        let a = with(
            &[
                "--capacity",
                "64MiB",
                "--coordinator",
                &endpoint,
                "--token",
                "tenant-secret",
            ],
            "server-mem-0",
        );
        ServerProcess::start(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Each agent joins and registers a handle space of its own: the
    // coordinator answers with the capability for exactly its handles.
    let space = |who: &str, name: &str, base: u64| {
        rt.block_on(async {
            let c = ControlClient::connect_with(
                &endpoint,
                &Credentials {
                    token: None,
                    tls: Some(lab.pem(&lab, who)),
                },
                Duration::from_secs(5),
            )
            .await
            .unwrap();
            let id = c
                .membership()
                .register(pb::RegisterRequest {
                    role: pb::Role::Agent as i32,
                    name: name.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .member_id;
            let r = c
                .intervals()
                .register(space_request(name, id, base))
                .await
                .unwrap()
                .into_inner();
            (c, id, r)
        })
    };
    let (a_base, b_base) = (5u64 << 40, 9u64 << 40);
    let (_a, _, a_space) = space("agent-node-1", "node-1", a_base);
    let (b, b_id, b_space) = space("agent-node-2", "node-2", b_base);
    assert!(!a_space.capability.is_empty());
    // node-2 cannot register handles of node-1's (it would be given a
    // capability for them).
    let e = rt
        .block_on(
            b.intervals()
                .register(space_request("node-2", b_id, a_base + 8)),
        )
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    assert_eq!(
        e.metadata().get("rmem-reason").unwrap().to_str().unwrap(),
        "handles_in_use"
    );

    let data = server.data.to_string();
    let connect = |who: &str, tokens: &[&[u8]]| {
        let caps = Arc::new(Capabilities::default());
        for (i, t) in tokens.iter().enumerate() {
            caps.set(i as u64, "default", t.to_vec());
        }
        let mut c = ClientConfig::new(data.clone()).with_tls(
            lab.pem(&lab, who).data_client().unwrap(),
            Some("mem-0".into()),
        );
        c.capabilities = Some(caps);
        BlockingConnection::connect(&c).unwrap()
    };
    let page = [0x5au8; PAGE_SIZE];
    let mut out = vec![[0u8; PAGE_SIZE]; 1];
    let mut victim = connect("agent-node-1", &[&a_space.capability]);
    assert_eq!(
        victim.put(&[(a_base + 1, &page)]).unwrap(),
        [PageStatus::Ok]
    );
    // Its capability names its own handles only.
    assert_eq!(
        victim.put(&[(b_base + 1, &page)]).unwrap(),
        [PageStatus::Denied]
    );

    // node-2 presents its own capability and node-1's (overheard, or
    // handed over by a server that saw it): node-1's is not node-2's to use.
    let mut forged = a_space.capability.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let mut thief = connect(
        "agent-node-2",
        &[&b_space.capability, &a_space.capability, &forged],
    );
    assert_eq!(thief.put(&[(b_base, &page)]).unwrap(), [PageStatus::Ok]);
    assert_eq!(
        thief.get(&[a_base + 1], &mut out).unwrap(),
        [PageStatus::Denied]
    );
    assert_eq!(
        thief.put(&[(a_base + 1, &[0xee; PAGE_SIZE])]).unwrap(),
        [PageStatus::Denied]
    );
    assert_eq!(thief.free(&[a_base + 1]).unwrap(), [PageStatus::Denied]);
    // The server's log lines reach this process asynchronously.
    let logged = |what: &str| {
        wait_until(Duration::from_secs(10), || {
            server.daemon.log_text().contains(what)
        })
    };
    assert!(logged("not_yours"), "{}", server.daemon.log_text());
    assert!(logged("bad_signature"), "{}", server.daemon.log_text());
    // With no capability at all: nothing either.
    let mut bare = connect("agent-node-2", &[]);
    assert_eq!(
        bare.get(&[a_base + 1], &mut out).unwrap(),
        [PageStatus::Denied]
    );
    // Agents were handed no tenant secret and need none: their certificate
    // and capabilities open the server. Anyone else still needs it.
    let admin = |credential: &str| {
        let c = ClientConfig::new(data.clone())
            .with_tenant("default", credential)
            .with_tls(
                lab.pem(&lab, "admin-alice").data_client().unwrap(),
                Some("mem-0".into()),
            );
        BlockingConnection::connect(&c)
    };
    match admin("") {
        Err(rmem_client::ClientError::Rejected { code, .. }) => {
            assert_eq!(code, rmem_proto::wire::ErrorCode::AuthFailed)
        }
        other => panic!("an admin without the tenant's secret: {other:?}"),
    }
    // An admin with it may use any handle.
    assert_eq!(
        admin("tenant-secret")
            .unwrap()
            .get(&[a_base + 1], &mut out)
            .unwrap(),
        [PageStatus::Ok]
    );
    // The victim's page is whole.
    assert_eq!(
        victim.get(&[a_base + 1], &mut out).unwrap(),
        [PageStatus::Ok]
    );
    assert_eq!(out[0], page);
}

/// A handle space of 16 pages at `base`, as an agent registers it.
fn space_request(
    name: &str,
    owner: u64,
    base: u64,
) -> rmem_proto::control::v1::RegisterIntervalRequest {
    rmem_proto::control::v1::RegisterIntervalRequest {
        address_space: format!("{name}/handles/{base:x}"),
        start: 0,
        length: 16 * PAGE_SIZE as u64,
        tenant: "default".into(),
        handle_base: base,
        owner,
        subscribers: Vec::new(),
    }
}

#[test]
fn certificates_and_the_cluster_ca_reload_without_a_restart() {
    use rmem_client::{ClientConfig, ClientError};
    // The cluster's CA, and the one it rotates to.
    let lab = rmem_tests::pki::Lab::new(&[
        ("coordinator", "c1"),
        ("server", "mem-0"),
        ("agent", "node-1"),
    ]);
    let next =
        rmem_tests::pki::Lab::new(&[("agent", "node-2"), ("agent", "node-1"), ("admin", "bob")]);
    // The daemons run from files this test rewrites, as cert-manager or an
    // operator would (a new file renamed over the old).
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let put = |name: &str, bytes: &[u8]| {
        let tmp = file(&format!("{name}.new"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, file(name)).unwrap();
    };
    let read = |lab: &rmem_tests::pki::Lab, f: &str| std::fs::read(lab.path(f)).unwrap();
    for (who, short) in [("coordinator-c1", "c"), ("server-mem-0", "s")] {
        put(&format!("{short}.ca"), &read(&lab, "ca.pem"));
        put(&format!("{short}.pem"), &read(&lab, &format!("{who}.pem")));
        put(&format!("{short}.key"), &read(&lab, &format!("{who}.key")));
    }
    let tls = |short: &str| {
        vec![
            "--tls-ca".to_string(),
            file(&format!("{short}.ca")),
            "--tls-cert".into(),
            file(&format!("{short}.pem")),
            "--tls-key".into(),
            file(&format!("{short}.key")),
        ]
    };
    let mut coord = rmem_tests::CoordinatorProcess::start(
        &tls("c").iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let endpoint = coord.addr.to_string();
    let server = {
        let mut a: Vec<String> = ["--capacity", "16MiB", "--coordinator", &endpoint]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(tls("s"));
        ServerProcess::start(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let data = server.data.to_string();
    // A member of the new CA, trusting the old one (as members do while a
    // CA rotates: their CA file holds both).
    let connect = |pem: rmem_common::tls::TlsPem| {
        let mut c = ClientConfig::new(data.clone())
            .with_tls(pem.data_client().unwrap(), Some("mem-0".into()));
        c.connect_timeout = Duration::from_secs(5);
        BlockingConnection::connect(&c)
    };
    let rmemctl_status = |who: &str| {
        std::process::Command::new(bin("rmemctl"))
            .args(["--endpoint", &endpoint, "--tls-ca", &lab.path("ca.pem")])
            .args(["--tls-cert", &next.path(&format!("{who}.pem"))])
            .args(["--tls-key", &next.path(&format!("{who}.key"))])
            .args(["--timeout", "5s", "status"])
            .output()
            .unwrap()
    };
    let newcomer = || next.pem(&lab, "agent-node-2");
    let e = connect(newcomer()).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Tls { .. } | ClientError::Io { .. } | ClientError::Closed { .. }
        ),
        "{e:?}"
    );
    assert!(!rmemctl_status("admin-bob").status.success());

    // The CA files now hold both CAs: within a few seconds both daemons
    // take members of either, without a restart.
    let both = [read(&lab, "ca.pem"), read(&next, "ca.pem")].concat();
    put("s.ca", &both);
    put("c.ca", &both);
    for d in [&server.daemon, &coord.daemon] {
        assert!(
            d.wait_for_log(
                "reloaded the TLS files: new connections use them",
                Duration::from_secs(20)
            )
            .is_some(),
            "{}",
            d.log_text()
        );
    }
    let mut c = connect(newcomer()).unwrap();
    c.stat().unwrap();
    let out = rmemctl_status("admin-bob");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Files that would make the server someone else are refused: it keeps
    // serving as mem-0 (an agent's certificate would fail every client's
    // server check).
    put("s.pem", &read(&lab, "agent-node-1.pem"));
    put("s.key", &read(&lab, "agent-node-1.key"));
    assert!(
        server
            .daemon
            .wait_for_log(
                "the TLS files changed but cannot be used: keeping the ones in use",
                Duration::from_secs(20)
            )
            .is_some(),
        "{}",
        server.daemon.log_text()
    );
    let mut c = connect(lab.pem(&lab, "agent-node-1")).unwrap();
    c.stat().unwrap();

    // A member's own side reloads too: a control client running from
    // files that are renewed from the new CA, once the old CA is dropped
    // (the coordinator restarted with only the new one, so every
    // connection is made again), still gets in, with no new client.
    put("a.ca", &both);
    put("a.pem", &read(&lab, "agent-node-1.pem"));
    put("a.key", &read(&lab, "agent-node-1.key"));
    let files = rmem_common::tls::TlsFiles {
        ca_file: file("a.ca").into(),
        cert_file: file("a.pem").into(),
        key_file: file("a.key").into(),
        crl_file: None,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt
        .block_on(rmem_client::control::ControlClient::connect_with(
            &endpoint,
            &rmem_client::control::Credentials {
                token: None,
                tls: Some(files.read().unwrap()),
            },
            Duration::from_secs(5),
        ))
        .unwrap();
    let list = || {
        rt.block_on(
            client
                .membership()
                .list_members(rmem_proto::control::v1::ListMembersRequest { role: 0 }),
        )
    };
    list().unwrap();
    put("a.pem", &read(&next, "agent-node-1.pem"));
    put("a.key", &read(&next, "agent-node-1.key"));
    std::thread::sleep(rmem_common::tls::reload::RELOAD_EVERY + Duration::from_secs(2));
    coord.daemon.terminate(Duration::from_secs(10));
    put("c.ca", &read(&next, "ca.pem"));
    let mut again = tls("c");
    again.extend(["--listen".to_string(), endpoint.clone()]);
    let _coord = rmem_tests::CoordinatorProcess::start(
        &again.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(
        wait_until(Duration::from_secs(20), || list().is_ok()),
        "the client did not take its renewed certificate: {:?}",
        list()
    );
}
