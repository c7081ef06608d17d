//! Chaos: a cluster of six memory servers, each on its own host (network
//! namespace), and three agents running the verifying workload in a loop,
//! one with each kind of redundancy (the default, two replicas; erasure
//! coded `ec=2+1`; and `ec=2+2`), while one server is killed
//! for good, another is stopped past its lease, a third is cut off the
//! network and healed, a fourth is drained, and the coordinator restarts.
//!
//! Passes only if every byte read was right, no fault failed (no SIGBUS:
//! the redundancy held throughout), the dead server's copies were rebuilt
//! without an operator, and no page is left on any server once the
//! workloads end. Prints the figures: rounds, pages verified, faults served
//! degraded (from a second copy, or rebuilt from a stripe), rebuild time.
//!
//! Needs root and iproute2, so it is ignored by plain `cargo test`;
//! `tests/run.sh` runs it with `--ignored`.

use std::time::{Duration, Instant};

use rmem_tests::netns::{
    COORD_PORT, Host, Network, rmemctl, start_coordinator, start_server, try_rmemctl,
};
use rmem_tests::wait_until;
use serde_json::Value;

const SERVERS: usize = 6;
const AGENTS: usize = 3;

/// Each agent's redundancy (none given: the cluster's default).
const POLICIES: [Option<&str>; AGENTS] = [None, Some("ec=2+1"), Some("ec=2+2")];

fn state_of(client: &Host, coord: &Host, name: &str) -> Value {
    rmemctl(client, coord, &["servers"])
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .map(|m| m["state"].clone())
        .unwrap_or(Value::Null)
}

/// Rounds each agent finished so far.
fn rounds(net: &Network, agents: &[usize]) -> Vec<usize> {
    agents
        .iter()
        .map(|&k| net.daemon(k).logs_with("demo round done").len())
        .collect()
}

/// Waits until every agent finished at least one more round than `before`
/// (its regions then began after whatever happened).
fn another_round(net: &mut Network, agents: &[usize], what: &str) {
    let before = rounds(net, agents);
    assert!(
        wait_until(Duration::from_secs(180), || {
            for &k in agents {
                if let Some(status) = net.daemon_mut(k).wait(Duration::ZERO) {
                    panic!(
                        "an agent ended during the chaos ({status:?}) after {what}:\n{}",
                        net.daemon(k).log_text()
                    );
                }
            }
            rounds(net, agents)
                .iter()
                .zip(&before)
                .all(|(now, was)| now > was)
        }),
        "the agents did not finish a round after {what}: {:?} -> {:?}\n{}",
        before,
        rounds(net, agents),
        agents
            .iter()
            .map(|&k| {
                let log = net.daemon(k).log_text();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
}

#[test]
#[ignore = "needs root and iproute2; tests/run.sh runs it"]
fn replicated_and_erasure_coded_workloads_survive_kill_stop_cut_drain_and_a_coordinator_restart() {
    if let Err(why) = rmem_tests::netns::available() {
        panic!("{why}");
    }
    let started = Instant::now();
    let state = tempfile::tempdir().unwrap();
    let state = state.path().to_str().unwrap().to_string();
    let mut net = Network::new();
    let coord = net.host();
    let servers: Vec<Host> = (0..SERVERS).map(|_| net.host()).collect();
    let agent_hosts: Vec<Host> = (0..AGENTS).map(|_| net.host()).collect();
    let client = net.host();

    let mut coord_k = start_coordinator(&mut net, &coord, &state, &["--server-gone-after", "3s"]);
    let endpoint = coord.at(COORD_PORT);
    let server_k: Vec<usize> = servers
        .iter()
        .enumerate()
        .map(|(i, h)| start_server(&mut net, h, &coord, &format!("mem-{i}"), "128MiB"))
        .collect();
    let mut agents = Vec::new();
    for (i, h) in agent_hosts.iter().enumerate() {
        let policy: Vec<&str> = POLICIES[i]
            .map(|p| vec!["--redundancy", p])
            .unwrap_or_default();
        agents.push(
            net.spawn(
                h,
                "rmem-agent",
                &[
                    &[
                        "--log-format",
                        "json",
                        "demo",
                        "--coordinator",
                        &endpoint,
                        "--name",
                        &format!("agent-{i}"),
                        "--repeat",
                        "0",
                        "--size",
                        "16MiB",
                        "--budget",
                        "2MiB",
                        "--ops",
                        "100000",
                        "--fault-timeout",
                        "60s",
                        "--rebuild-bandwidth",
                        "32MiB",
                        "--json",
                    ][..],
                    &policy,
                ]
                .concat(),
            ),
        );
    }
    let used = |name: &str| -> Option<u64> {
        let stats = rmemctl(&client, &coord, &["stats"]);
        stats["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .and_then(|s| s["used_pages"].as_u64())
    };
    assert!(
        wait_until(Duration::from_secs(60), || {
            (0..SERVERS).all(|i| used(&format!("mem-{i}")).is_some_and(|u| u > 0))
        }),
        "pages never reached every server"
    );

    // 1. A server killed for good: declared gone after its lease and the
    //    grace, its copies rebuilt by the agents with no operator.
    net.daemon_mut(server_k[0]).kill();
    let killed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || {
            rmemctl(&client, &coord, &["status"])["servers_gone"] == 1
        }),
        "the killed server was not declared gone"
    );
    let declared = killed.elapsed();
    let mut most_at_risk = 0;
    assert!(
        wait_until(Duration::from_secs(120), || {
            let s = rmemctl(&client, &coord, &["status"]);
            most_at_risk = most_at_risk.max(s["pages_at_risk"].as_u64().unwrap());
            s["pages_at_risk"] == 0 && s["rebuild_pages_left"] == 0
        }),
        "the rebuild did not finish: {}",
        rmemctl(&client, &coord, &["status"])
    );
    let rebuilt = killed.elapsed() - declared;
    assert_eq!(state_of(&client, &coord, "mem-0"), "gone");

    // 2. A server stopped past its lease (not past the grace): faults go
    //    to the other copy or rebuild from the stripe; it comes back on
    //    its own.
    net.daemon(server_k[1]).signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(2500));
    assert_ne!(state_of(&client, &coord, "mem-1"), "up");
    net.daemon(server_k[1]).signal(libc::SIGCONT);
    assert!(
        wait_until(Duration::from_secs(30), || state_of(
            &client, &coord, "mem-1"
        ) == "up"),
        "the stopped server did not come back"
    );

    // 3. A server cut off the network and healed.
    servers[2].cut();
    std::thread::sleep(Duration::from_millis(2500));
    servers[2].heal();
    assert!(
        wait_until(Duration::from_secs(30), || state_of(
            &client, &coord, "mem-2"
        ) == "up"),
        "the cut-off server did not come back"
    );
    another_round(&mut net, &agents, "the stop and the cut");

    // 4. A server drained while the workloads run.
    rmemctl(&client, &coord, &["drain", "mem-3"]);
    assert!(
        wait_until(Duration::from_secs(120), || used("mem-3") == Some(0)),
        "the drained server still holds pages"
    );

    // 5. The coordinator restarts (kill -9): members carry on.
    net.daemon_mut(coord_k).kill();
    coord_k = start_coordinator(&mut net, &coord, &state, &["--server-gone-after", "3s"]);
    assert!(
        wait_until(Duration::from_secs(60), || {
            try_rmemctl(&client, &coord, &["status"]).is_ok_and(|s| {
                s["servers_up"] == 4 && s["servers_draining"] == 1 && s["agents_up"] == 3
            })
        }),
        "members did not carry on after the coordinator restarted: {:?}",
        try_rmemctl(&client, &coord, &["status"])
    );
    another_round(&mut net, &agents, "the coordinator restart");

    // The workloads end; every byte they read was right, no fault failed.
    let mut figures = (0usize, 0u64, 0u64);
    for &k in &agents {
        net.daemon(k).signal(libc::SIGTERM);
        let status = net
            .daemon_mut(k)
            .wait(Duration::from_secs(180))
            .expect("an agent did not stop");
        let d = net.daemon(k);
        assert!(
            status.success(),
            "an agent failed: {status:?}\n{}",
            d.log_text()
        );
        for r in d.logs_with("demo round done") {
            let f = &r["fields"];
            assert_eq!(f["verify_errors"], 0, "wrong bytes: {r}");
            assert_eq!(f["faults_failed"], 0, "a fault failed: {r}");
            figures.0 += 1;
            figures.1 += f["pages_verified"].as_u64().unwrap();
            figures.2 += f["faults_degraded"].as_u64().unwrap();
        }
    }
    // No page is left on any server still running.
    let left = || -> Vec<Option<u64>> { (1..SERVERS).map(|i| used(&format!("mem-{i}"))).collect() };
    assert!(
        wait_until(Duration::from_secs(60), || left()
            .iter()
            .all(|u| *u == Some(0))),
        "pages left on the servers after the workloads ended: {:?}",
        left()
    );
    eprintln!(
        "chaos: {} rounds, {} pages verified, {} faults served degraded; \
         dead server declared gone after {declared:?}, rebuilt in {rebuilt:?} \
         (at most {most_at_risk} pages at risk); whole run {:?}",
        figures.0,
        figures.1,
        figures.2,
        started.elapsed()
    );
    let _ = coord_k;
}
