//! Failover of the control plane: a three-member etcd cluster, three
//! coordinator replicas, three memory servers and two agents running the
//! verifying workload in a loop, each on a host of its own (network
//! namespaces). Members and rmemctl are given the three coordinators'
//! endpoints. While the workloads run: the leader is killed; the next
//! leader is cut off from etcd and the cluster while it still believes it
//! leads; both lost replicas come back as candidates; an etcd member is
//! killed and comes back; etcd is away altogether (every member stopped)
//! for four election leases and comes back.
//!
//! Passes only if every byte read was right and no fault failed, a new
//! leader serves after each loss, a cut-off leader stopped acting before
//! its successor was elected (no two leaders at once), members followed
//! each new leader (they stay up, the agents go on), and no page is left
//! on any server once the workloads end. Prints the failover times (leader
//! lost to the next leader serving).
//!
//! Needs root, iproute2 and Debian's etcd-server, so it is ignored by
//! plain `cargo test`; `tests/run.sh` runs it with `--ignored`.

use std::time::{Duration, Instant};

use rmem_tests::netns::{Host, Network};
use rmem_tests::wait_until;
use serde_json::Value;

const COORDINATORS: usize = 3;
const SERVERS: usize = 3;
const AGENTS: usize = 2;
/// The coordinators' election lease.
const TTL: &str = "2s";

/// `rmemctl --output json ARGS` on `client` against `endpoints`.
fn ctl(client: &Host, endpoints: &str, args: &[&str]) -> Result<Value, String> {
    rmem_tests::netns::try_rmemctl_at(client, endpoints, args)
}

/// Rounds each agent finished so far.
fn rounds(net: &Network, agents: &[usize]) -> Vec<usize> {
    agents
        .iter()
        .map(|&k| net.daemon(k).logs_with("demo round done").len())
        .collect()
}

/// Waits until every agent finished one more round than before.
fn another_round(net: &mut Network, agents: &[usize], what: &str) {
    another_round_with(net, agents, what, |_| {});
}

/// As [`another_round`], calling `tend` on every poll (to restart what a
/// supervisor would).
fn another_round_with(
    net: &mut Network,
    agents: &[usize],
    what: &str,
    mut tend: impl FnMut(&mut Network),
) {
    let before = rounds(net, agents);
    let done = wait_until(Duration::from_secs(180), || {
        tend(net);
        for &k in agents {
            if let Some(status) = net.daemon_mut(k).wait(Duration::ZERO) {
                panic!(
                    "an agent ended ({status:?}) after {what}:\n{}",
                    net.daemon(k).log_text()
                );
            }
        }
        rounds(net, agents)
            .iter()
            .zip(&before)
            .all(|(now, was)| now > was)
    });
    assert!(
        done,
        "the agents did not finish a round after {what}: {before:?} -> {:?}",
        rounds(net, agents)
    );
}

/// The log timestamp (`ts`, RFC 3339) of `line`, for ordering events of
/// different processes on this one machine.
fn ts(line: &Value) -> String {
    line["timestamp"]
        .as_str()
        .or_else(|| line["ts"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Starts coordinator replica `i` on `host`; its daemon index.
fn coordinator(net: &mut Network, host: &Host, etcd: &str) -> usize {
    net.spawn(
        host,
        "rmem-coordinator",
        &[
            "--log-format",
            "json",
            "--listen",
            &host.at(7470),
            "--insecure",
            "--etcd",
            etcd,
            "--election-ttl",
            TTL,
            "--lease",
            "2s",
            "--invalidation-deadline",
            "2s",
            "--placement-chunk",
            "1MiB",
        ],
    )
}

/// The replica (index into `ks`, not one of `except`) that serves,
/// waiting up to `within`.
fn leader(
    net: &Network,
    ks: &[Option<usize>],
    except: &[usize],
    within: Duration,
) -> Option<usize> {
    let mut found = None;
    wait_until(within, || {
        found = (0..ks.len()).find(|i| {
            !except.contains(i)
                && ks[*i].is_some_and(|k| net.daemon(k).find_log("coordinator ready").is_some())
        });
        found.is_some()
    });
    found
}

#[test]
#[ignore = "needs root, iproute2 and etcd; tests/run.sh runs it"]
fn the_control_plane_fails_over_under_verifying_workloads() {
    if let Err(why) = rmem_tests::netns::available() {
        panic!("{why}");
    }
    assert!(
        std::process::Command::new("etcd")
            .arg("--version")
            .output()
            .is_ok(),
        "etcd is not installed: tests/run.sh installs Debian's etcd-server"
    );
    let started = Instant::now();
    let data = tempfile::tempdir().unwrap();
    let mut net = Network::new();
    let etcd_hosts: Vec<Host> = (0..3).map(|_| net.host()).collect();
    let coord_hosts: Vec<Host> = (0..COORDINATORS).map(|_| net.host()).collect();
    let server_hosts: Vec<Host> = (0..SERVERS).map(|_| net.host()).collect();
    let agent_hosts: Vec<Host> = (0..AGENTS).map(|_| net.host()).collect();
    let client = net.host();

    // A three-member etcd cluster.
    let cluster = etcd_hosts
        .iter()
        .enumerate()
        .map(|(i, h)| format!("e{i}=http://{}", h.at(2380)))
        .collect::<Vec<_>>()
        .join(",");
    let etcd_urls = etcd_hosts
        .iter()
        .map(|h| format!("http://{}", h.at(2379)))
        .collect::<Vec<_>>()
        .join(",");
    let start_etcd = |net: &mut Network, i: usize, state: &str| {
        let h = &etcd_hosts[i];
        let dir = data.path().join(format!("etcd-{i}"));
        net.spawn_program(
            h,
            &format!("etcd-{i}"),
            "etcd",
            &[
                "--name",
                &format!("e{i}"),
                "--data-dir",
                dir.to_str().unwrap(),
                "--listen-client-urls",
                &format!("http://{}", h.at(2379)),
                "--advertise-client-urls",
                &format!("http://{}", h.at(2379)),
                "--listen-peer-urls",
                &format!("http://{}", h.at(2380)),
                "--initial-advertise-peer-urls",
                &format!("http://{}", h.at(2380)),
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                state,
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--auto-compaction-mode",
                "revision",
                "--auto-compaction-retention",
                "1000",
            ],
        )
    };
    let mut etcd_k: Vec<usize> = (0..3).map(|i| start_etcd(&mut net, i, "new")).collect();

    // Three replicas; the one elected serves.
    let mut coord_k: Vec<Option<usize>> = coord_hosts
        .iter()
        .map(|h| Some(coordinator(&mut net, h, &etcd_urls)))
        .collect();
    let endpoints = coord_hosts
        .iter()
        .map(|h| h.at(7470))
        .collect::<Vec<_>>()
        .join(",");
    let first = leader(&net, &coord_k, &[], Duration::from_secs(60)).unwrap_or_else(|| {
        panic!(
            "no coordinator was elected:\n{}",
            net.daemon(coord_k[0].unwrap()).log_text()
        )
    });

    // Servers and agents, given every replica.
    let servers: Vec<usize> = server_hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let k = net.spawn(
                h,
                "rmem-server",
                &[
                    "--log-format",
                    "json",
                    "--listen",
                    &h.at(7480),
                    "--grpc",
                    &h.at(7481),
                    "--insecure",
                    "--capacity",
                    "128MiB",
                    "--coordinator",
                    &endpoints,
                    "--name",
                    &format!("mem-{i}"),
                ],
            );
            assert!(
                net.daemon(k)
                    .wait_for_log("joined the cluster", Duration::from_secs(30))
                    .is_some(),
                "server mem-{i} did not join:\n{}",
                net.daemon(k).log_text()
            );
            k
        })
        .collect();
    let agents: Vec<usize> = agent_hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            net.spawn(
                h,
                "rmem-agent",
                &[
                    "--log-format",
                    "json",
                    "demo",
                    "--coordinator",
                    &endpoints,
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
                    "--json",
                ],
            )
        })
        .collect();
    another_round(&mut net, &agents, "the start");
    let members_up = || -> Result<(), String> {
        let s = ctl(&client, &endpoints, &["status"])?;
        if s["servers_up"] == SERVERS && s["agents_up"] == AGENTS {
            Ok(())
        } else {
            Err(format!("{s}"))
        }
    };

    // 1. The leader is killed: another replica serves, members follow.
    net.daemon_mut(coord_k[first].unwrap()).kill();
    coord_k[first] = None;
    let killed = Instant::now();
    let second = leader(&net, &coord_k, &[first], Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "no replica took over from the killed leader:\n{}",
            coord_k
                .iter()
                .flatten()
                .map(|&k| net.daemon(k).log_text())
                .collect::<Vec<_>>()
                .join("\n---\n")
        )
    });
    let failover_kill = killed.elapsed();
    another_round(&mut net, &agents, "the leader was killed");
    assert!(
        wait_until(Duration::from_secs(30), || members_up().is_ok()),
        "members did not follow the new leader: {:?}",
        members_up()
    );

    // 2. The new leader is cut off from etcd and the cluster while it
    //    believes it leads: it stops acting (and exits) before the last
    //    replica is elected.
    let cut_k = coord_k[second].unwrap();
    coord_hosts[second].cut();
    let cut = Instant::now();
    let third = leader(&net, &coord_k, &[first, second], Duration::from_secs(30))
        .expect("no replica took over from the cut-off leader");
    let failover_cut = cut.elapsed();
    let status = net
        .daemon_mut(cut_k)
        .wait(Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "the cut-off leader did not stop:\n{}",
                net.daemon(cut_k).log_text()
            )
        });
    assert_eq!(status.code(), Some(1), "{}", net.daemon(cut_k).log_text());
    // When it stopped acting: its etcd thread's word (the server's own log
    // line can wait for a worker thread).
    let stopped = [
        "etcd did not renew the election lease in time: this coordinator no longer leads",
        "the election lease expired: this coordinator no longer leads",
        "etcd did not answer while this coordinator surely led",
        "a write to etcd found that this coordinator no longer leads",
    ]
    .iter()
    .filter_map(|m| net.daemon(cut_k).find_log(m))
    .min_by_key(ts)
    .unwrap_or_else(|| {
        panic!(
            "the cut-off leader did not say it stopped:\n{}",
            net.daemon(cut_k).log_text()
        )
    });
    let elected = net
        .daemon(coord_k[third].unwrap())
        .find_log("elected: this coordinator leads")
        .expect("the new leader did not say it was elected");
    assert!(
        ts(&stopped) <= ts(&elected),
        "two leaders at once: the cut-off one stopped at {}, the next was elected at {}:\n{}",
        ts(&stopped),
        ts(&elected),
        net.daemon(cut_k).log_text()
    );
    coord_hosts[second].heal();
    coord_k[second] = None;
    another_round(&mut net, &agents, "the leader was cut off");

    // 3. Both lost replicas come back, as candidates.
    for i in [first, second] {
        coord_k[i] = Some(coordinator(&mut net, &coord_hosts[i], &etcd_urls));
    }
    let replicas = |n: usize| {
        ctl(&client, &endpoints, &["status"]).is_ok_and(|s| {
            s["replicas"].as_array().is_some_and(|r| r.len() == n)
                && s["etcd_health"]
                    .as_str()
                    .is_some_and(|h| h.starts_with("healthy"))
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), || replicas(COORDINATORS)),
        "the replicas did not all come back: {:?}",
        ctl(&client, &endpoints, &["status"])
    );

    // 4. An etcd member is killed (etcd keeps its quorum), then comes back.
    // While etcd elects a leader of its own, the coordinators' leader may
    // miss renewing its election lease: it steps down and exits, and its
    // supervisor starts it again (as systemd's Restart=on-failure does).
    let supervise = |net: &mut Network, coord_k: &mut Vec<Option<usize>>| {
        for (i, k) in coord_k.iter_mut().enumerate() {
            let Some(d) = *k else { continue };
            if let Some(status) = net.daemon_mut(d).wait(Duration::ZERO) {
                assert_eq!(status.code(), Some(1), "replica {i} ended: {status:?}");
                *k = Some(coordinator(net, &coord_hosts[i], &etcd_urls));
            }
        }
    };
    net.daemon_mut(etcd_k[0]).kill();
    another_round_with(&mut net, &agents, "an etcd member was killed", |net| {
        supervise(net, &mut coord_k)
    });
    etcd_k[0] = start_etcd(&mut net, 0, "existing");
    assert!(
        wait_until(Duration::from_secs(30), || {
            supervise(&mut net, &mut coord_k);
            members_up().is_ok()
        }),
        "members are not all up after an etcd member came back: {:?}",
        members_up()
    );
    another_round(&mut net, &agents, "everything came back");

    // 5. etcd is away altogether (every member stopped) for longer than
    // the election lease: no replica can lead, and calls are refused
    // `state_unavailable` (the leader stops acting and exits for its
    // supervisor; the standbys keep campaigning). The data plane goes on
    // meanwhile: faults and evictions into capacity already granted, and
    // members' control calls wait. etcd comes back: a replica is elected,
    // the one that stepped down is restarted (as its supervisor would),
    // members carry on.
    for &k in &etcd_k {
        net.daemon(k).signal(libc::SIGSTOP);
    }
    let away = Instant::now();
    let mut last = Err(String::new());
    let refused = wait_until(Duration::from_secs(20), || {
        last = ctl(&client, &endpoints, &["status"]);
        last.as_ref()
            .is_err_and(|e| e.contains("state_unavailable"))
    });
    std::thread::sleep(Duration::from_secs(8).saturating_sub(away.elapsed()));
    for &k in &etcd_k {
        net.daemon(k).signal(libc::SIGCONT);
    }
    assert!(
        refused,
        "with etcd away, calls were not refused state_unavailable: {last:?}"
    );
    for (i, k) in coord_k.iter_mut().enumerate() {
        let Some(d) = *k else { continue };
        if let Some(status) = net.daemon_mut(d).wait(Duration::ZERO) {
            assert_eq!(status.code(), Some(1), "replica {i} ended: {status:?}");
            *k = Some(coordinator(&mut net, &coord_hosts[i], &etcd_urls));
        }
    }
    assert!(
        wait_until(Duration::from_secs(60), || members_up().is_ok()),
        "members are not all up after etcd came back: {:?}",
        members_up()
    );
    another_round(&mut net, &agents, "etcd came back");

    // The workloads end: every byte right, no fault failed.
    let mut figures = (0usize, 0u64);
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
        }
    }
    // No page is left on any server.
    let used = || -> Vec<Option<u64>> {
        let stats = ctl(&client, &endpoints, &["stats"]).ok();
        (0..SERVERS)
            .map(|i| {
                stats.as_ref().and_then(|s| {
                    s["servers"]
                        .as_array()?
                        .iter()
                        .find(|v| v["name"] == format!("mem-{i}"))?["used_pages"]
                        .as_u64()
                })
            })
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(60), || used()
            .iter()
            .all(|u| *u == Some(0))),
        "pages left on the servers after the workloads ended: {:?}",
        used()
    );
    let _ = servers;
    eprintln!(
        "failover: {} rounds, {} pages verified; leader killed -> next serving in {failover_kill:.1?}, \
         leader cut off -> next serving in {failover_cut:.1?} (election TTL {TTL}); whole run {:?}",
        figures.0,
        figures.1,
        started.elapsed()
    );
}
