//! The attack suite: what an attacker on the cluster's network tried
//! against a cluster started as the docs say (issue 21's first paragraph),
//! replayed against one started as they say now: mutual TLS with a lab CA
//! and its CRL, tenants with credentials, capabilities. A victim agent runs
//! its verifying workload (the demo: a region evicted to the servers and
//! faulted back, every byte checked) while another agent of the same
//! cluster, holding a valid certificate of its own, and strangers holding
//! none, a foreign one, an expired or a revoked one, attack it. Every
//! attack must be refused with a clear status, and the victim must end
//! with every byte correct.
//!
//! The slower attacks on connection slots and credential guessing are in
//! `memory_server.rs`; a server impersonating another in `cluster.rs`; the
//! same attacks over RDMA in the soft-RoCE suite.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rmem_client::control::{ControlClient, Credentials};
use rmem_client::{
    BlockingConnection, Capabilities, ClientConfig, ClientError, PAGE_SIZE, PageStatus,
};
use rmem_proto::control::v1 as pb;
use rmem_proto::wire::ErrorCode;
use rmem_tests::pki::Lab;
use rmem_tests::{CoordinatorProcess as Coordinator, ServerProcess, bin, wait_until};

/// Capabilities live this long here, so the victim renews its own while
/// it runs and an attacker's expire within the test.
const CAPABILITY_TTL: Duration = Duration::from_secs(10);
/// How many of a victim space's first handles are looked at.
const SCANNED: u64 = 4096;

fn reason(e: &tonic::Status) -> String {
    e.metadata()
        .get("rmem-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

#[track_caller]
fn refused(r: Result<impl std::fmt::Debug, tonic::Status>, code: tonic::Code, why: &str) {
    match r {
        Err(e) => {
            assert_eq!(e.code(), code, "{e}");
            assert_eq!(reason(&e), why, "{e}");
        }
        Ok(v) => panic!("not refused ({why} expected): {v:?}"),
    }
}

/// The cluster: a coordinator, two servers, their certificates and CRL,
/// tenants `red` and `blue` (each with a credential agents are never
/// given).
struct Cluster {
    lab: Lab,
    _coord: Coordinator,
    servers: Vec<ServerProcess>,
    endpoint: String,
}

impl Cluster {
    /// Capabilities live `ttl`.
    fn start(lab: Lab, ttl: Duration) -> Self {
        let dir = lab.path("");
        let config = |name: &str, text: &str| {
            let p = format!("{dir}/{name}");
            std::fs::write(&p, text).unwrap();
            p
        };
        let coord_toml = config(
            "coordinator.toml",
            "[[tenant]]\nname = \"red\"\ntoken = \"red-secret\"\nquota = \"64MiB\"\n\n\
             [[tenant]]\nname = \"blue\"\ntoken = \"blue-secret\"\nquota = \"64MiB\"\n",
        );
        let server_toml = config(
            "server.toml",
            "[[tenant]]\nname = \"red\"\nid = 1\ntoken = \"red-secret\"\n\n\
             [[tenant]]\nname = \"blue\"\nid = 2\ntoken = \"blue-secret\"\n",
        );
        let crl = lab.path("crl.pem");
        let with = |who: &str, extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            v.extend(lab.flags(who));
            v.extend(["--tls-crl".to_string(), crl.clone()]);
            v
        };
        let coord = {
            let ttl = format!("{}s", ttl.as_secs());
            let a = with(
                "coordinator-c1",
                &[
                    "--config",
                    &coord_toml,
                    "--capability-ttl",
                    &ttl,
                    // A new capability key signs two leases after a rotation.
                    "--lease",
                    "2s",
                    "--placement-chunk",
                    "1MiB",
                ],
            );
            Coordinator::start(&a.iter().map(String::as_str).collect::<Vec<_>>())
        };
        let endpoint = coord.addr.to_string();
        let servers = ["mem-0", "mem-1"]
            .iter()
            .map(|name| {
                let a = with(
                    &format!("server-{name}"),
                    &[
                        "--config",
                        &server_toml,
                        "--capacity",
                        "64MiB",
                        "--coordinator",
                        &endpoint,
                    ],
                );
                ServerProcess::start(&a.iter().map(String::as_str).collect::<Vec<_>>())
            })
            .collect();
        Self {
            lab,
            _coord: coord,
            servers,
            endpoint,
        }
    }

    /// The victim: the demo's verifying workload as agent `victim` in
    /// tenant red, `ops` operations over 8 MiB with a 2 MiB budget, its
    /// report on stdout and its log (info: early renewals show) in `log`.
    fn victim(&self, ops: u64, log: &tempfile::NamedTempFile) -> std::process::Child {
        std::process::Command::new(bin("rmem-agent"))
            .args(self.lab.flags("agent-victim"))
            .args(["--tls-crl", &self.lab.path("crl.pem")])
            .args(["demo", "--json", "--tenant", "red", "--budget", "2MiB"])
            .args(["--size", "8MiB", "--ops", &ops.to_string()])
            .args(["--coordinator", &self.endpoint])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap()
    }

    /// A control client with `who`'s certificate (of `lab`'s CA), trusting
    /// the cluster's CA.
    async fn control(&self, lab: &Lab, who: &str) -> Result<ControlClient, String> {
        ControlClient::connect_with(
            &self.endpoint,
            &Credentials {
                token: None,
                tls: Some(lab.pem(&self.lab, who)),
            },
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| e.to_string())
    }

    /// A data-plane connection to server `i` with `who`'s certificate, in
    /// `tenant` with `credential`, presenting `caps`.
    fn data(
        &self,
        i: usize,
        lab: &Lab,
        who: &str,
        tenant: &str,
        credential: &str,
        caps: &[(&str, &[u8])],
    ) -> Result<BlockingConnection, ClientError> {
        let held = Arc::new(Capabilities::default());
        for (k, (t, token)) in caps.iter().enumerate() {
            held.set(k as u64, t, token.to_vec());
        }
        let mut c = ClientConfig::new(self.servers[i].data.to_string())
            .with_tenant(tenant, credential)
            .with_tls(
                lab.pem(&self.lab, who).data_client().unwrap(),
                Some(format!("mem-{i}")),
            );
        c.connect_timeout = Duration::from_secs(5);
        c.capabilities = Some(held);
        BlockingConnection::connect(&c)
    }
}

/// `rmemctl capability-keys ARGS` as admin `alice`, its JSON.
fn capability_keys(cluster: &Cluster, args: &[&str]) -> Result<serde_json::Value, String> {
    let mut a = vec!["--endpoint".to_string(), cluster.endpoint.clone()];
    a.extend(cluster.lab.flags("admin-alice"));
    a.extend(["--output", "json", "capability-keys"].map(String::from));
    a.extend(args.iter().map(|s| s.to_string()));
    let out = std::process::Command::new(bin("rmemctl"))
        .args(&a)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Each key's state, in the order listed.
fn key_states(keys: &serde_json::Value) -> Vec<String> {
    keys.as_array()
        .unwrap()
        .iter()
        .map(|k| k["state"].as_str().unwrap().to_string())
        .collect()
}

/// What a refused handshake looks like to a client.
#[track_caller]
fn handshake_refused(r: Result<BlockingConnection, ClientError>) {
    match r {
        Err(ClientError::Tls { .. } | ClientError::Io { .. } | ClientError::Closed { .. }) => {}
        Err(e) => panic!("refused, but not at the handshake: {e:?}"),
        Ok(_) => panic!("the handshake was accepted"),
    }
}

#[test]
fn every_attack_is_refused_and_the_victim_keeps_every_byte() {
    let lab = Lab::new(&[
        ("coordinator", "c1"),
        ("server", "mem-0"),
        ("server", "mem-1"),
        ("server", "mem-9"),
        ("agent", "victim"),
        ("agent", "mallory"),
        ("agent", "retired"),
        ("admin", "alice"),
    ]);
    let stranger = Lab::new(&[("agent", "mallory"), ("server", "mem-0")]);
    // A member retired before the cluster starts: its certificate is on
    // the CRL every daemon is given.
    let ctl = |args: &[&str]| rmem_tests::rmemctl_ok(args);
    let pki_dir = lab.path("");
    ctl(&[
        "pki", "revoke", "--dir", &pki_dir, "--role", "agent", "--name", "retired",
    ]);
    let now = time::OffsetDateTime::now_utc();
    lab.issue_valid(
        "agent",
        "late",
        now - time::Duration::days(2),
        now - time::Duration::hours(1),
    );
    let cluster = Cluster::start(lab, CAPABILITY_TTL);
    let lab = &cluster.lab;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // The victim: the demo's verifying workload in tenant red, long enough
    // to renew its capabilities while it is attacked.
    let victim_log = tempfile::NamedTempFile::new().unwrap();
    let victim = cluster.victim(400_000, &victim_log);
    let started = Instant::now();

    let admin = rt.block_on(cluster.control(lab, "admin-alice")).unwrap();
    let admin_data = |s: usize| {
        BlockingConnection::connect(
            &ClientConfig::new(cluster.servers[s].data.to_string())
                .with_tenant("red", "red-secret")
                .with_tls(lab.pem(lab, "admin-alice").data_client().unwrap(), None),
        )
        .unwrap()
    };
    // The victim's intervals, once it has evicted.
    let mut victim_spaces: Vec<pb::Interval> = Vec::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let ivs = rt
                .block_on(admin.intervals().list(pb::ListIntervalsRequest::default()))
                .unwrap()
                .into_inner()
                .intervals;
            victim_spaces = ivs
                .into_iter()
                .filter(|iv| iv.address_space.starts_with("victim/"))
                .collect();
            !victim_spaces.is_empty()
                && (0..2).all(|s| admin_data(s).stat().unwrap().tenant_used_pages > 0)
        }),
        "the victim never evicted: {}",
        std::fs::read_to_string(victim_log.path()).unwrap()
    );
    // A space of the victim's with pages on both servers, and (some of)
    // the handles they are under on each, as an admin with the tenant's
    // secret sees them.
    let scan = |iv: &pb::Interval| -> Vec<Vec<u64>> {
        let mut page = vec![[0u8; PAGE_SIZE]; 1];
        (0..2)
            .map(|s| {
                let mut admin = admin_data(s);
                (iv.handle_base..iv.handle_base + (iv.length / PAGE_SIZE as u64).min(SCANNED))
                    .filter(|&h| admin.get(&[h], &mut page).unwrap() == [PageStatus::Ok])
                    .take(64)
                    .collect()
            })
            .collect()
    };
    // The operator rotates the capability key while the victim runs: the
    // new key signs a lease later, the old one retires once all it signed
    // has expired, and the victim never notices.
    let keys = |args: &[&str]| capability_keys(&cluster, args).unwrap();
    let rotated = keys(&["rotate"]);
    assert_eq!(key_states(&rotated), ["signing", "pending"], "{rotated}");
    let old_key = rotated[0]["id"].clone();

    let (space, held) = victim_spaces
        .iter()
        .map(|iv| (iv.clone(), scan(iv)))
        .find(|(_, held)| held.iter().all(|h| !h.is_empty()))
        .unwrap_or_else(|| {
            panic!("no space of the victim has pages on both servers: {victim_spaces:?}")
        });

    // --- Strangers: no certificate, another CA's, an expired one, a revoked one.
    for s in 0..2 {
        match BlockingConnection::connect(&ClientConfig::new(cluster.servers[s].data.to_string())) {
            Err(ClientError::Rejected { code, message, .. }) => {
                assert_eq!(code, ErrorCode::AuthFailed);
                assert!(message.contains("requires TLS"), "{message}");
            }
            other => panic!("plaintext was not refused: {other:?}"),
        }
        handshake_refused(cluster.data(s, &stranger, "agent-mallory", "red", "", &[]));
        handshake_refused(cluster.data(s, lab, "agent-late", "red", "", &[]));
        handshake_refused(cluster.data(s, lab, "agent-retired", "red", "", &[]));
    }
    rt.block_on(async {
        // Plaintext gRPC to the coordinator gets nowhere.
        if let Ok(plain) =
            ControlClient::connect(&cluster.endpoint, None, Duration::from_secs(2)).await
        {
            plain
                .membership()
                .register(pb::RegisterRequest {
                    role: pb::Role::Agent as i32,
                    name: "x".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
        }
        for (lab_of, who) in [
            (&stranger, "agent-mallory"),
            (lab, "agent-late"),
            (lab, "agent-retired"),
        ] {
            if let Ok(c) = cluster.control(lab_of, who).await {
                c.membership()
                    .list_members(pb::ListMembersRequest { role: 0 })
                    .await
                    .unwrap_err();
            }
        }
    });

    // --- Mallory: an agent of the cluster, with a certificate of its own.
    let mallory = rt.block_on(cluster.control(lab, "agent-mallory")).unwrap();
    let agent = |name: &str| pb::RegisterRequest {
        role: pb::Role::Agent as i32,
        name: name.into(),
        ..Default::default()
    };
    let fake_server = |name: &str, capacity: u64, addr: &str| pb::RegisterRequest {
        role: pb::Role::Server as i32,
        name: name.into(),
        data_addr: addr.into(),
        grpc_addr: addr.into(),
        capacity_pages: capacity,
        transports: vec!["tcp".into()],
        ..Default::default()
    };
    let (m_red, m_blue, caps_issued) = rt.block_on(async {
        // It cannot join as the victim, nor as a memory server (to be sent
        // pages and, once, credentials).
        refused(
            mallory.membership().register(agent("victim")).await,
            tonic::Code::PermissionDenied,
            "forbidden",
        );
        refused(
            mallory
                .membership()
                .register(fake_server("mallory", 1 << 20, "127.0.0.1:1"))
                .await,
            tonic::Code::PermissionDenied,
            "forbidden",
        );
        let m_id = mallory
            .membership()
            .register(agent("mallory"))
            .await
            .unwrap()
            .into_inner()
            .member_id;
        // Its grants carry no tenant credential.
        let grants = mallory
            .placement()
            .allocate(pb::AllocateRequest {
                agent_id: m_id,
                tenant: "red".into(),
                pages: 16,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .grants;
        assert!(!grants.is_empty());
        for g in &grants {
            assert!(g.credential.is_empty(), "a tenant secret in {g:?}");
        }
        // Nor does anything else it may read: others' grants and
        // intervals are not its to list.
        refused(
            mallory
                .placement()
                .list_grants(pb::ListGrantsRequest {
                    agent_id: 0,
                    server_id: 0,
                })
                .await,
            tonic::Code::PermissionDenied,
            "forbidden",
        );
        refused(
            mallory
                .intervals()
                .list(pb::ListIntervalsRequest::default())
                .await,
            tonic::Code::PermissionDenied,
            "forbidden",
        );
        // Another agent's interval is not its to invalidate (the victim
        // would die of SIGBUS), unregister or subscribe to (holding up the
        // victim's invalidations); servers are not its to drain.
        refused(
            mallory
                .invalidation()
                .invalidate(pb::InvalidateRequest {
                    address_space: space.address_space.clone(),
                    start: space.start,
                    length: space.length,
                    reason: pb::Reason::Unmap as i32,
                    origin: m_id,
                    ..Default::default()
                })
                .await,
            tonic::Code::PermissionDenied,
            "forbidden",
        );
        refused(
            mallory
                .intervals()
                .unregister(pb::UnregisterIntervalRequest {
                    interval_id: space.id,
                })
                .await,
            tonic::Code::PermissionDenied,
            "forbidden",
        );
        refused(
            mallory
                .intervals()
                .subscribe(pb::SubscribeRequest {
                    interval_id: space.id,
                    member_id: m_id,
                })
                .await,
            tonic::Code::PermissionDenied,
            "forbidden",
        );
        for name in ["mem-0", "mem-1"] {
            let e = mallory
                .admin()
                .drain(pb::DrainRequest {
                    server_id: 0,
                    name: name.into(),
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
            assert!(e.message().contains("admin role"), "{e}");
        }
        // Handles of the victim's cannot be registered (to be signed a
        // capability for them), nor can an unknown tenant be named.
        let interval = |tenant: &str, base: u64, pages: u64| pb::RegisterIntervalRequest {
            address_space: format!("mallory/{tenant}/{base:x}"),
            start: 0,
            length: pages * PAGE_SIZE as u64,
            tenant: tenant.into(),
            handle_base: base,
            owner: m_id,
            subscribers: Vec::new(),
        };
        refused(
            mallory
                .intervals()
                .register(interval("red", space.handle_base + 1, 4))
                .await,
            tonic::Code::AlreadyExists,
            "handles_in_use",
        );
        refused(
            mallory
                .intervals()
                .register(interval("nope", 7 << 40, 4))
                .await,
            tonic::Code::NotFound,
            "unknown_tenant",
        );
        // Its own handles, it gets: one space in red, and one in blue over
        // the very handle numbers of the victim's (tenants' handles are
        // apart).
        let red = mallory
            .intervals()
            .register(interval("red", 7 << 40, 16))
            .await
            .unwrap()
            .into_inner();
        let blue = mallory
            .intervals()
            .register(interval("blue", space.handle_base, SCANNED))
            .await
            .unwrap()
            .into_inner();
        (red.capability, blue.capability, Instant::now())
    });

    // --- A compromised server certificate: its registration is checked.
    rt.block_on(async {
        let rogue = cluster.control(lab, "server-mem-9").await.unwrap();
        for (req, code, why) in [
            (
                fake_server("mem-9", u64::MAX, "127.0.0.1:1"),
                tonic::Code::InvalidArgument,
                "invalid_argument",
            ),
            (
                fake_server("mem-9", 1024, "not an address"),
                tonic::Code::InvalidArgument,
                "invalid_argument",
            ),
            // A live member's name: not its to take over.
            (
                fake_server("mem-0", 1024, "127.0.0.1:1"),
                tonic::Code::PermissionDenied,
                "forbidden",
            ),
        ] {
            refused(rogue.membership().register(req).await, code, why);
        }
    });

    // --- Mallory on the data plane: the victim's pages are out of reach,
    // whatever capability it presents (its own, the victim's tenant's
    // credential guessed, a capability of another tenant).
    let evil = [0xeeu8; PAGE_SIZE];
    let mut out = vec![[0u8; PAGE_SIZE]; 1];
    for (s, held) in held.iter().enumerate() {
        let mut red = cluster
            .data(s, lab, "agent-mallory", "red", "", &[("red", &m_red)])
            .unwrap();
        for &h in held {
            assert_eq!(red.get(&[h], &mut out).unwrap(), [PageStatus::Denied]);
            assert_eq!(red.put(&[(h, &evil)]).unwrap(), [PageStatus::Denied]);
            assert_eq!(red.free(&[h]).unwrap(), [PageStatus::Denied]);
        }
        // Its own red handles work.
        assert_eq!(
            red.put(&[(7 << 40, &evil)]).unwrap(),
            [PageStatus::Ok],
            "server {s}"
        );
        assert_eq!(red.free(&[7 << 40]).unwrap(), [PageStatus::Ok]);
        // The blue capability names the victim's handle numbers, in blue:
        // on a red session it opens nothing; on a blue one it reaches blue's
        // pages only (none there), never red's.
        let mut cross = cluster
            .data(s, lab, "agent-mallory", "red", "", &[("blue", &m_blue)])
            .unwrap();
        assert_eq!(
            cross.get(&[space.handle_base], &mut out).unwrap(),
            [PageStatus::Denied]
        );
        let mut blue = cluster
            .data(s, lab, "agent-mallory", "blue", "", &[("blue", &m_blue)])
            .unwrap();
        for &h in held {
            assert_eq!(blue.get(&[h], &mut out).unwrap(), [PageStatus::NotFound]);
        }
        // A guessed tenant credential opens nothing either.
        match cluster.data(s, lab, "agent-mallory", "red", "guess", &[]) {
            Err(ClientError::Rejected { code, .. }) => assert_eq!(code, ErrorCode::AuthFailed),
            other => panic!("a wrong credential: {other:?}"),
        }
    }

    // --- Capabilities expire: once past its life, mallory's own (which
    // it cannot renew once revoked, below) opens nothing.
    let expiry = caps_issued + CAPABILITY_TTL + Duration::from_secs(2);
    std::thread::sleep(expiry.saturating_duration_since(Instant::now()));
    let mut stale = cluster
        .data(0, lab, "agent-mallory", "red", "", &[("red", &m_red)])
        .unwrap();
    assert_eq!(
        stale.put(&[(7 << 40, &evil)]).unwrap(),
        [PageStatus::Denied]
    );
    // (The log line may reach the test after the answer.)
    let refused_expired = || {
        cluster.servers[0]
            .daemon
            .logs_with("capability refused")
            .iter()
            .any(|l| {
                let l = l.to_string();
                l.contains("expired") && l.contains("mallory")
            })
    };
    assert!(
        wait_until(Duration::from_secs(10), refused_expired),
        "{:?}",
        cluster.servers[0].daemon.logs_with("capability refused")
    );

    // --- Revocation: the operator revokes mallory's certificate. Its open
    // connections are cut within a reload period, its new ones refused.
    let mut open = cluster
        .data(1, lab, "agent-mallory", "red", "", &[])
        .unwrap();
    open.stat().unwrap();
    let revoked = ctl(&[
        "--output", "json", "pki", "revoke", "--dir", &pki_dir, "--role", "agent", "--name",
        "mallory",
    ]);
    let revoked: serde_json::Value = serde_json::from_str(&revoked).unwrap();
    assert_eq!(revoked["revoked"], 2, "{revoked}");
    let cut = wait_until(Duration::from_secs(20), || open.stat().is_err());
    assert!(cut, "{}", cluster.servers[1].daemon.log_text());
    assert!(
        wait_until(Duration::from_secs(10), || cluster.servers[1]
            .daemon
            .log_text()
            .contains("the peer's certificate is revoked")),
        "{}",
        cluster.servers[1].daemon.log_text()
    );
    handshake_refused(cluster.data(0, lab, "agent-mallory", "red", "", &[]));
    // The coordinator refuses its calls on the connection it holds.
    let call = || {
        rt.block_on(
            mallory
                .membership()
                .list_members(pb::ListMembersRequest { role: 0 }),
        )
    };
    assert!(wait_until(Duration::from_secs(15), || call().is_err()));
    let e = call().unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    assert_eq!(reason(&e), "certificate_refused", "{e}");
    assert!(e.message().contains("revoked"), "{e}");

    // --- A certificate that expires while its connection is open: the
    // connection ends with it.
    let until = time::OffsetDateTime::now_utc() + time::Duration::seconds(8);
    lab.issue_valid(
        "agent",
        "brief",
        time::OffsetDateTime::now_utc() - time::Duration::minutes(5),
        until,
    );
    let mut brief = cluster.data(0, lab, "agent-brief", "red", "", &[]).unwrap();
    brief.stat().unwrap();
    assert!(
        wait_until(Duration::from_secs(25), || brief.stat().is_err()),
        "a connection outlived its certificate"
    );
    assert!(
        wait_until(Duration::from_secs(10), || cluster.servers[0]
            .daemon
            .log_text()
            .contains("the peer's certificate expired")),
        "{}",
        cluster.servers[0].daemon.log_text()
    );

    // --- The old capability key retired (the victim's capabilities moved to
    // the new one), and the servers forgot it.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let now = keys(&[]);
            key_states(&now) == ["signing", "retired"] && now[1]["id"] == old_key
        }),
        "{}",
        keys(&[])
    );
    for s in &cluster.servers {
        assert!(
            s.daemon
                .wait_for_log("forgot retired capability keys", Duration::from_secs(10))
                .is_some(),
            "{}",
            s.daemon.log_text()
        );
    }
    // Only an admin rotates.
    let mut a = vec!["--endpoint".to_string(), cluster.endpoint.clone()];
    a.extend(lab.flags("agent-victim"));
    a.extend(["capability-keys", "rotate"].map(String::from));
    let out = std::process::Command::new(bin("rmemctl"))
        .args(&a)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin role"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // --- The victim ends with every byte correct, having renewed its
    // capabilities while attacked.
    let out = victim.wait_with_output().unwrap();
    let log = std::fs::read_to_string(victim_log.path()).unwrap();
    assert!(out.status.success(), "{log}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verify_ok"], true, "{report}");
    assert_eq!(report["faults_failed"], 0, "{report}");
    // It ran past its first capabilities' life, so it renewed them.
    let ran: f64 = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["seconds"].as_f64().unwrap())
        .sum();
    eprintln!(
        "the victim ran {ran:.1} s of {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        ran > CAPABILITY_TTL.as_secs_f64(),
        "the victim ran for {ran} s, less than a capability's life: {report}"
    );
    // No server ever refused the victim a capability.
    for s in &cluster.servers {
        for line in s.daemon.logs_with("capability refused") {
            assert!(!line.to_string().contains("victim"), "{line}");
        }
    }
}

/// A capability key that may have leaked is retired at once: from the
/// servers' next heartbeat, what it signed opens nothing, on connections
/// that presented it too; the victim, whose capabilities it signed, is
/// denied for a moment, renews them early and loses no page and no fault.
#[test]
fn a_key_retired_at_once_opens_nothing_more_and_agents_renew() {
    let lab = Lab::new(&[
        ("coordinator", "c1"),
        ("server", "mem-0"),
        ("server", "mem-1"),
        ("agent", "victim"),
        ("agent", "probe"),
        ("admin", "alice"),
    ]);
    // Capabilities live long: nothing is renewed on schedule here, so the
    // victim still holds the old key's when it is retired.
    let cluster = Cluster::start(lab, Duration::from_secs(600));
    let lab = &cluster.lab;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let victim_log = tempfile::NamedTempFile::new().unwrap();
    let victim = cluster.victim(800_000, &victim_log);
    let victim_text = || std::fs::read_to_string(victim_log.path()).unwrap();

    // The probe: an agent holding a capability of the old key, on a
    // connection that presented it.
    let probe = rt.block_on(cluster.control(lab, "agent-probe")).unwrap();
    let token = rt.block_on(async {
        let id = probe
            .membership()
            .register(pb::RegisterRequest {
                role: pb::Role::Agent as i32,
                name: "probe".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .member_id;
        probe
            .intervals()
            .register(pb::RegisterIntervalRequest {
                address_space: "probe/red".into(),
                start: 0,
                length: 16 * PAGE_SIZE as u64,
                tenant: "red".into(),
                handle_base: 9 << 40,
                owner: id,
                subscribers: Vec::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .capability
    });
    // The victim evicts under the old key's capabilities.
    let used = |s: usize| {
        BlockingConnection::connect(
            &ClientConfig::new(cluster.servers[s].data.to_string())
                .with_tenant("red", "red-secret")
                .with_tls(lab.pem(lab, "admin-alice").data_client().unwrap(), None),
        )
        .unwrap()
        .stat()
        .unwrap()
        .tenant_used_pages
    };
    assert!(
        wait_until(Duration::from_secs(60), || used(0) + used(1) > 0),
        "{}",
        victim_text()
    );
    let page = [7u8; PAGE_SIZE];
    let mut held = cluster
        .data(0, lab, "agent-probe", "red", "", &[("red", &token)])
        .unwrap();
    assert_eq!(held.put(&[(9 << 40, &page)]).unwrap(), [PageStatus::Ok]);

    let rotated = capability_keys(&cluster, &["rotate"]).unwrap();
    assert_eq!(key_states(&rotated), ["signing", "pending"], "{rotated}");
    let old = rotated[0]["id"].as_u64().unwrap().to_string();
    let new = rotated[1]["id"].as_u64().unwrap().to_string();
    // The new key signs two leases later; until then the old cannot go.
    let early = capability_keys(&cluster, &["retire", &old]).unwrap_err();
    assert!(early.contains("rotate first"), "{early}");
    assert!(
        wait_until(Duration::from_secs(20), || key_states(
            &capability_keys(&cluster, &[]).unwrap()
        ) == ["verifying", "signing"]),
        "{}",
        capability_keys(&cluster, &[]).unwrap()
    );
    let retired = capability_keys(&cluster, &["retire", &old]).unwrap();
    assert_eq!(key_states(&retired), ["signing", "retired"], "{retired}");
    assert_eq!(retired[1]["id"].as_u64().unwrap().to_string(), old);
    // The signing key is refused; an unknown one too.
    let signing = capability_keys(&cluster, &["retire", &new]).unwrap_err();
    assert!(signing.contains("signs capabilities now"), "{signing}");
    let unknown = capability_keys(&cluster, &["retire", "1"]).unwrap_err();
    assert!(unknown.contains("no capability key 1"), "{unknown}");

    // Every server forgets it at its next heartbeat; then the connection
    // that presented the probe's capability is denied, and so is a new
    // one presenting it.
    for s in &cluster.servers {
        assert!(
            s.daemon
                .wait_for_log("forgot retired capability keys", Duration::from_secs(10))
                .is_some(),
            "{}",
            s.daemon.log_text()
        );
    }
    assert_eq!(held.put(&[(9 << 40, &page)]).unwrap(), [PageStatus::Denied]);
    let mut out = vec![[0u8; PAGE_SIZE]; 1];
    assert_eq!(
        held.get(&[9 << 40], &mut out).unwrap(),
        [PageStatus::Denied]
    );
    let mut fresh = cluster
        .data(0, lab, "agent-probe", "red", "", &[("red", &token)])
        .unwrap();
    assert_eq!(
        fresh.put(&[(9 << 40, &page)]).unwrap(),
        [PageStatus::Denied]
    );
    assert!(
        wait_until(Duration::from_secs(10), || cluster.servers[0]
            .daemon
            .logs_with("capability refused")
            .iter()
            .any(|l| {
                let l = l.to_string();
                l.contains("unknown_key") && l.contains("probe")
            })),
        "{}",
        cluster.servers[0].daemon.log_text()
    );

    // The victim: denied where it held the old key's capabilities, it
    // renewed them early and carried on with every byte right.
    let out = victim.wait_with_output().unwrap();
    let log = victim_text();
    assert!(out.status.success(), "{log}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verify_ok"], true, "{report}");
    assert_eq!(report["faults_failed"], 0, "{report}");
    assert!(log.contains("renewed capabilities early"), "{log}");
    assert!(
        cluster.servers.iter().any(|s| s
            .daemon
            .logs_with("capabilities signed by a retired key no longer hold on this connection")
            .iter()
            .any(|l| l.to_string().contains("victim"))),
        "the victim held no capability of the retired key when it went"
    );
}
