//! Every daemon's `/metrics`: scraped during a workload, checked by
//! `promtool check metrics` (Debian's prometheus package), and its counters
//! checked against what the workload did; over mutual TLS, only a monitor's
//! (or an admin's) certificate may read them.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use rmem_tests::metrics::{get, promtool_check, scrape, value};
use rmem_tests::pki::Lab;
use rmem_tests::{CoordinatorProcess, Daemon, ServerProcess, bin, wait_until};

/// Where `daemon` serves its metrics, from its log.
fn metrics_addr(daemon: &Daemon) -> SocketAddr {
    let line = daemon
        .wait_for_log("serving metrics on /metrics", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no metrics endpoint:\n{}", daemon.log_text()));
    line["fields"]["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line}"))
}

/// A loopback port free right now.
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Checks an exposition with promtool, and that docs/OPERATIONS.md lists
/// every family in it (the rules and the dashboard are checked against
/// that list by deploy/monitoring/check.sh).
fn checked(name: &str, exposition: &str) {
    if let Err(e) = promtool_check(exposition) {
        panic!("promtool check metrics refused the {name}'s metrics:\n{e}\n{exposition}");
    }
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/OPERATIONS.md"),
    )
    .unwrap();
    for family in exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
    {
        assert!(
            doc.contains(&format!("| `{family}` |")),
            "the {name}'s {family} is not in docs/OPERATIONS.md's metric tables"
        );
    }
}

fn v(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(exposition, name, labels)
        .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{exposition}"))
}

#[test]
fn every_daemon_serves_metrics_that_promtool_accepts_and_that_follow_the_workload() {
    let coord = CoordinatorProcess::start(&["--metrics-listen", "127.0.0.1:0"]);
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
                "--metrics-listen",
                "127.0.0.1:0",
            ])
        })
        .collect();
    let agent_metrics = free_port();
    let agent = Command::new(bin("rmem-agent"))
        .args([
            "demo", "--json", "--budget", "2MiB", "--size", "16MiB", "--ops", "300000",
        ])
        .args(["--coordinator", &endpoint])
        .args(["--metrics-listen", &agent_metrics.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // During the workload: the agent's exposition is valid and moves.
    let evicted = |m: &str| value(m, "rmem_agent_pages_evicted_total", &[]).unwrap_or(0.0);
    let remote =
        |m: &str| value(m, "rmem_agent_faults_total", &[("result", "remote")]).unwrap_or(0.0);
    let mut first = String::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            match get(agent_metrics, "/metrics", None) {
                Ok(r) if r.status == 200 && evicted(&r.body) > 0.0 && remote(&r.body) > 0.0 => {
                    first = r.body;
                    true
                }
                _ => false,
            }
        }),
        "the demo's metrics never showed an eviction and a remote fault"
    );
    checked("agent", &first);
    assert_eq!(
        v(&first, "rmem_agent_faults_total", &[("result", "failed")]),
        0.0
    );
    assert_eq!(
        v(&first, "rmem_agent_budget_bytes", &[]),
        2.0 * 1024.0 * 1024.0
    );
    let mut later = String::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            match get(agent_metrics, "/metrics", None) {
                Ok(r) if r.status == 200 && remote(&r.body) > remote(&first) => {
                    later = r.body;
                    true
                }
                _ => false,
            }
        }),
        "remote faults did not grow while the workload ran:\n{first}"
    );
    // Every remote fault's latency is in the histogram.
    let histogram = v(&later, "rmem_agent_fault_duration_seconds_count", &[]);
    assert!(
        histogram >= remote(&first),
        "{histogram} latencies for more remote faults:\n{later}"
    );

    let out = agent.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verify_ok"], true, "{report}");
    let reported = report["pages_evicted"].as_f64().unwrap();
    assert!(
        evicted(&later) <= reported && evicted(&later) > 0.0,
        "scraped {} evictions, the demo reports {reported}",
        evicted(&later)
    );

    // The servers stored at least every evicted page (once per copy) and
    // served the remote faults.
    let mut stored = 0.0;
    let mut served = 0.0;
    for s in &servers {
        let m = scrape(metrics_addr(&s.daemon));
        checked("server", &m);
        assert_eq!(
            v(&m, "rmem_server_pool_capacity_bytes", &[]),
            64.0 * 1024.0 * 1024.0
        );
        stored += v(
            &m,
            "rmem_server_pages_total",
            &[("op", "put"), ("outcome", "ok")],
        );
        served += v(
            &m,
            "rmem_server_pages_total",
            &[("op", "get"), ("outcome", "ok")],
        );
        assert_eq!(v(&m, "rmem_server_checksum_failures_total", &[]), 0.0);
        assert!(
            v(
                &m,
                "rmem_server_request_duration_seconds_count",
                &[("op", "put")]
            ) > 0.0
        );
    }
    assert!(
        stored >= reported,
        "servers stored {stored} pages, the demo evicted {reported}"
    );
    assert!(
        served >= report["pages_fetched"].as_f64().unwrap(),
        "servers served {served} pages: {report}"
    );

    let m = scrape(metrics_addr(&coord.daemon));
    checked("coordinator", &m);
    assert_eq!(v(&m, "rmem_coordinator_leader", &[]), 1.0);
    assert_eq!(
        v(
            &m,
            "rmem_coordinator_members",
            &[("role", "server"), ("state", "up")]
        ),
        2.0
    );
    assert_eq!(
        v(&m, "rmem_coordinator_capacity_bytes", &[]),
        128.0 * 1024.0 * 1024.0
    );
    // Every invalidation begun has finished (its latency recorded) or is
    // still in flight.
    assert_eq!(
        v(&m, "rmem_coordinator_invalidations_total", &[]),
        v(
            &m,
            "rmem_coordinator_invalidation_duration_seconds_count",
            &[]
        ) + v(&m, "rmem_coordinator_invalidations_in_flight", &[]),
        "{m}"
    );
}

#[test]
fn metrics_over_tls_are_for_monitors_and_plain_metrics_stay_on_loopback() {
    let lab = Lab::new(&[
        ("server", "m0"),
        ("monitor", "prom"),
        ("agent", "a1"),
        ("coordinator", "c0"),
    ]);
    let mut args: Vec<String> = ["--capacity", "16MiB", "--metrics-listen", "127.0.0.1:0"]
        .map(String::from)
        .to_vec();
    args.extend(lab.flags("server-m0"));
    let server = ServerProcess::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let addr = metrics_addr(&server.daemon);

    let monitor = lab.pem(&lab, "monitor-prom");
    let r = get(addr, "/metrics", Some(&monitor)).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    checked("server", &r.body);
    assert_eq!(v(&r.body, "rmem_server_pool_used_bytes", &[]), 0.0);

    // Another member's certificate is refused, and told what it needs.
    let agent = lab.pem(&lab, "agent-a1");
    let r = get(addr, "/metrics", Some(&agent)).unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("monitor"), "{}", r.body);
    // No TLS at all gets nothing.
    assert!(
        get(addr, "/metrics", None).is_err_and(|e| !e.is_empty())
            || get(addr, "/metrics", None).is_ok_and(|r| r.status != 200)
    );

    // The coordinator's metrics too; and a monitor's certificate opens
    // nothing of its control plane.
    let mut args = vec!["--metrics-listen".to_string(), "127.0.0.1:0".into()];
    args.extend(lab.flags("coordinator-c0"));
    let coord = CoordinatorProcess::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let r = get(metrics_addr(&coord.daemon), "/metrics", Some(&monitor)).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    checked("coordinator", &r.body);
    let out = Command::new(bin("rmemctl"))
        .args(lab.flags("monitor-prom"))
        .args(["--endpoint", &coord.addr.to_string(), "--timeout", "5s"])
        .arg("intervals")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/metrics only"),
        "a monitor listed intervals: {err}"
    );

    // Plain metrics beyond loopback need --insecure.
    let out = Command::new(bin("rmem-server"))
        .args(["--listen", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .args(["--metrics-listen", "0.0.0.0:0", "--capacity", "16MiB"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics_listen") && err.contains("--insecure"),
        "{err}"
    );
}

#[test]
fn a_full_server_shows_in_the_agents_errors_by_reason() {
    // 1 MiB of pool for 8 MiB written through a 1 MiB budget: the server
    // refuses pages (no_space) and the agent counts them.
    let server = ServerProcess::start(&["--capacity", "1MiB"]);
    let page = rmem_client::PAGE_SIZE;
    let r = rmem_agent::RemoteRegion::new(
        rmem_agent::RegionConfig {
            size: 8 << 20,
            budget: 1 << 20,
            fault_timeout: Duration::from_secs(20),
            ..rmem_agent::RegionConfig::default()
        },
        server.client_config(),
    )
    .unwrap();
    let base = r.as_ptr();
    for p in 0..r.pages() {
        let word = base.wrapping_add(p * page).cast::<u64>();
        // SAFETY: inside the live region, touched by this thread only.
        unsafe { word.write_volatile(p as u64 + 1) };
    }
    let no_space = || {
        value(
            &rmem_agent::metrics::region(&r).encode(),
            "rmem_agent_errors_total",
            &[("plane", "data"), ("reason", "no_space")],
        )
        .unwrap_or(0.0)
    };
    assert!(
        wait_until(Duration::from_secs(20), || no_space() > 0.0),
        "no no_space error counted:\n{}",
        rmem_agent::metrics::region(&r).encode()
    );
    let m = rmem_agent::metrics::region(&r).encode();
    checked("agent", &m);
    assert!(v(&m, "rmem_agent_over_budget_bytes", &[]) >= 0.0);
    // Nothing was lost: every page reads back.
    for p in 0..r.pages() {
        let word = base.wrapping_add(p * page).cast::<u64>();
        // SAFETY: as above.
        let got = unsafe { word.read_volatile() };
        assert_eq!(got, p as u64 + 1, "page {p}");
    }
}
