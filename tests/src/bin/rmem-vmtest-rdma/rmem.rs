//! rmem's RDMA data plane between the guests.
//!
//! Guest 1 runs memory server A (anonymous pool, two tenants: `alice` and
//! `bob`), guest 2 memory server B (default tenant, a pool file so its pages
//! survive a restart); both with `--rdma`. This driver, on guest 3, is the
//! client: through the client library directly, and through `rmem-agent
//! demo`, whose fault and eviction paths verify every byte they read.
//!
//! Under TCG one RDMA operation between guests takes milliseconds: counts
//! are small, and the latency figures are only good as ratios.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rmem_client::{
    BlockingConnection, ClientConfig, ClientError, DataConnection, PAGE_SIZE, PageStatus,
    PageTransport, RdmaConnection, Transport,
};
use rmem_tests::{pattern, wait_until};

use rmem_tests::suite::{Suite, ensure, percentiles};

use super::Node;

/// Data-plane port of both servers.
const PORT: u16 = 7480;
/// The data port of guest 1's mutual-TLS server (gRPC the next).
const TLS_PORT: u16 = 7490;
/// Server A's tenants.
const TENANTS: &str = r#"
capacity = "64MiB"
[[tenant]]
name = "alice"
id = 1
token = "alice-secret"
[[tenant]]
name = "bob"
id = 2
token = "bob-secret"
"#;

/// What perftest measured between the same guests, for ratios.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reference {
    pub read_p50_us: Option<f64>,
    pub write_p50_us: Option<f64>,
}

fn rdma_config(addr: &str, tenant: &str, token: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new(addr).with_tenant(tenant, token);
    cfg.transport = Transport::Rdma;
    // Generous: one RDMA operation under TCG takes milliseconds.
    cfg.request_timeout = Duration::from_secs(60);
    cfg
}

fn err(e: ClientError) -> String {
    rmem_common::error_chain(&e)
}

/// Starts `rmem-server` as `name` on `node` and waits for its data port.
fn start_server(node: &Node, name: &str, args: &[&str]) -> Result<(), String> {
    // The guests' private segment is the test's own.
    let mut all = vec!["--insecure"];
    all.extend_from_slice(args);
    start_server_at(node, name, PORT, &all)
}

/// Starts `rmem-server` as `name` on `node`, its data port `port` (gRPC
/// the next), and waits for the data port.
fn start_server_at(node: &Node, name: &str, port: u16, args: &[&str]) -> Result<(), String> {
    let listen = format!("{}:{port}", node.ip);
    let grpc = format!("{}:{}", node.ip, port + 1);
    let mut argv = vec![
        "rmem-server",
        "--rdma",
        "--listen",
        &listen,
        "--grpc",
        &grpc,
    ];
    argv.extend_from_slice(args);
    node.start(name, &argv, &[("RUST_LOG", "info")])?;
    let up = wait_until(Duration::from_secs(120), || {
        node.tcp_listening(port).unwrap_or(false)
            || !node.status(name).map(|s| s.running).unwrap_or(false)
    });
    let status = node.status(name)?;
    ensure(
        up && status.running,
        format!(
            "{name} on {} is not listening ({status}): {}",
            node.name,
            node.log(name).unwrap_or_default()
        ),
    )
}

/// Runs `op` on `c` in a thread, again and again until it reports an
/// error (at most 20 times), while this thread breaks the queue pair as
/// soon as the first call is under way. Returns the connection and the
/// error `op` saw (`None`: every call succeeded).
fn broken_mid_transfer(
    mut c: RdmaConnection,
    op: impl Fn(&mut RdmaConnection) -> Result<Option<ClientError>, String> + Send + 'static,
) -> Result<(RdmaConnection, Option<ClientError>), String> {
    let breaker = c.breaker();
    let started = Arc::new(AtomicBool::new(false));
    let worker = {
        let started = started.clone();
        std::thread::spawn(move || {
            let mut seen = None;
            for _ in 0..20 {
                started.store(true, Ordering::Release);
                match op(&mut c) {
                    Ok(None) => {}
                    Ok(Some(e)) => {
                        seen = Some(e);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok((c, seen))
        })
    };
    ensure(
        wait_until(Duration::from_secs(60), || started.load(Ordering::Acquire)),
        "the transfer did not start",
    )?;
    breaker
        .break_now()
        .map_err(|e| rmem_common::error_chain(&e))?;
    worker
        .join()
        .map_err(|_| "the transfer thread panicked".to_string())?
}

/// `s` without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// p50 and p99 of `n` timed calls of `op`, in microseconds.
fn time_op(
    n: usize,
    mut op: impl FnMut(usize) -> Result<(), String>,
) -> Result<(f64, f64), String> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        op(i)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(percentiles(samples))
}

fn get_one(c: &mut impl PageTransport, handle: u64, version: u64) -> Result<(), String> {
    let mut out = [[0u8; PAGE_SIZE]];
    let st = c.get(&[handle], &mut out).map_err(err)?;
    ensure(st == [PageStatus::Ok], format!("page {handle}: {st:?}"))?;
    ensure(
        out[0] == pattern(handle, version),
        format!("page {handle} came back with wrong contents"),
    )
}

/// Stores `handles` at `version` and checks every status.
fn put_all(
    c: &mut impl PageTransport,
    handles: std::ops::Range<u64>,
    version: u64,
) -> Result<(), String> {
    let pages: Vec<_> = handles.clone().map(|h| (h, pattern(h, version))).collect();
    let refs: Vec<(u64, &rmem_client::Page)> = pages.iter().map(|(h, p)| (*h, p)).collect();
    let st = c.put(&refs).map_err(err)?;
    ensure(
        st.iter().all(|s| *s == PageStatus::Ok),
        format!("PUT statuses {st:?}"),
    )
}

/// Fetches `handles` in one batch and checks each against `version`.
fn check_all(
    c: &mut impl PageTransport,
    handles: std::ops::Range<u64>,
    version: u64,
) -> Result<(), String> {
    let hs: Vec<u64> = handles.collect();
    let mut out = vec![[0u8; PAGE_SIZE]; hs.len()];
    let st = c.get(&hs, &mut out).map_err(err)?.to_vec();
    for ((h, page), s) in hs.iter().zip(&out).zip(st) {
        ensure(s == PageStatus::Ok, format!("page {h}: {s}"))?;
        ensure(
            *page == pattern(*h, version),
            format!("page {h} came back with wrong contents"),
        )?;
    }
    Ok(())
}

/// Runs the rmem cases; guests 1 and 2 are left running their servers
/// (the driver powers them off at the end).
pub fn cases(suite: &mut Suite, nodes: &[Node], reference: Reference) {
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    let addr_a = format!("{}:{PORT}", n1.ip);
    let addr_b = format!("{}:{PORT}", n2.ip);
    let alice = rdma_config(&addr_a, "alice", "alice-secret");
    let bob = rdma_config(&addr_a, "bob", "bob-secret");

    suite.case(
        "rmem-server --rdma runs on guests 1 and 2 and offers RDMA",
        || {
            n1.exec_ok(
                &[
                    "sh",
                    "-c",
                    &format!("cat > /tmp/server-a.toml <<'EOF'\n{TENANTS}\nEOF"),
                ],
                Duration::from_secs(10),
            )?;
            start_server(n1, "server-a", &["--config", "/tmp/server-a.toml"])?;
            start_server(
                n2,
                "server-b",
                &["--capacity", "64MiB", "--pool-file", "/tmp/pool-b"],
            )?;
            for cfg in [&alice, &ClientConfig::new(addr_b.clone())] {
                let c = BlockingConnection::connect(cfg).map_err(err)?;
                ensure(c.offers_rdma(), format!("{} does not offer RDMA", cfg.addr))?;
            }
            let mut auto = alice.clone();
            auto.transport = Transport::Auto;
            let c = DataConnection::connect(&auto).map_err(err)?;
            ensure(
                c.transport() == Transport::Rdma,
                format!("`auto` chose {}", c.transport()),
            )
        },
    );

    suite.case(
        "PUT and GET over RDMA: pages come back intact, overwritten and freed pages too",
        || {
            let mut c = RdmaConnection::connect(&alice).map_err(err)?;
            put_all(&mut c, 0..32, 1)?;
            check_all(&mut c, 0..32, 1)?;
            // Overwrites move pages to fresh slots: the READs must follow.
            put_all(&mut c, 8..16, 2)?;
            check_all(&mut c, 8..16, 2)?;
            check_all(&mut c, 0..8, 1)?;
            // A second connection has no locations of its own yet... but
            // shares the configuration's cache; a fresh cache must LOCATE.
            let mut fresh_cfg = alice.clone();
            fresh_cfg.locations = Default::default();
            let mut fresh = RdmaConnection::connect(&fresh_cfg).map_err(err)?;
            check_all(&mut fresh, 16..32, 1)?;
            ensure(
                fresh_cfg.locations.len() == 16,
                format!(
                    "{} locations learned, 16 expected",
                    fresh_cfg.locations.len()
                ),
            )?;
            let st = c.free(&[0, 1]).map_err(err)?;
            ensure(st == [PageStatus::Ok; 2], format!("FREE {st:?}"))?;
            let mut out = [[0u8; PAGE_SIZE]; 2];
            let st = fresh.get(&[0, 1], &mut out).map_err(err)?;
            ensure(
                st == [PageStatus::NotFound; 2],
                format!("freed pages answered {st:?}"),
            )
        },
    );

    suite.case(
        "another tenant's rkey and address are refused by the NIC; the server keeps serving",
        || {
            let mut a = RdmaConnection::connect(&alice).map_err(err)?;
            put_all(&mut a, 1000..1001, 7)?;
            let loc = a.locate(1000).map_err(err)?;
            ensure(
                loc.status == PageStatus::Ok && loc.addr != 0,
                format!("alice's page has no RDMA location: {loc:?}"),
            )?;
            let page = a.read_raw(loc.addr, loc.rkey).map_err(err)?;
            ensure(page == pattern(1000, 7), "alice cannot read her own page")?;

            let mut b = RdmaConnection::connect(&bob).map_err(err)?;
            put_all(&mut b, 1000..1001, 9)?;
            let bloc = b.locate(1000).map_err(err)?;
            ensure(
                bloc.addr != loc.addr && bloc.rkey != loc.rkey,
                format!("bob's page shares alice's region: {bloc:?} {loc:?}"),
            )?;
            for (what, rkey) in [("alice's rkey", loc.rkey), ("bob's own rkey", bloc.rkey)] {
                let mut b = RdmaConnection::connect(&bob).map_err(err)?;
                match b.read_raw(loc.addr, rkey) {
                    Err(ClientError::Rdma { source, .. }) if source.is_remote_access() => {}
                    Err(e) => return Err(format!("bob READ with {what}: unexpected {}", err(e))),
                    Ok(_) => return Err(format!("bob READ alice's page with {what}")),
                }
            }
            let mut b = RdmaConnection::connect(&bob).map_err(err)?;
            get_one(&mut b, 1000, 9)?;
            get_one(&mut a, 1000, 7)
        },
    );

    suite.case(
        "two agents of one tenant (mTLS): the NIC refuses one's rkey and address to the other; each reads the other's pages over TCP, and its own over RDMA again after a restart",
        || {
            let ip = &n1.ip;
            let pki = "/tmp/pki-agents";
            n1.exec_ok(
                &[
                    "sh",
                    "-c",
                    &format!(
                        "rmemctl pki init --dir {pki} >/dev/null && \
                         rmemctl pki issue --dir {pki} --role server --name tls-a --host {ip} >/dev/null && \
                         rmemctl pki issue --dir {pki} --role agent --name one --host {ip} >/dev/null && \
                         rmemctl pki issue --dir {pki} --role agent --name two --host {ip} >/dev/null"
                    ),
                ],
                Duration::from_secs(60),
            )?;
            std::fs::create_dir_all(pki).map_err(|e| e.to_string())?;
            for f in ["ca.pem", "agent-one.pem", "agent-one.key", "agent-two.pem", "agent-two.key"] {
                let text = n1.exec_ok(&["cat", &format!("{pki}/{f}")], Duration::from_secs(10))?;
                std::fs::write(format!("{pki}/{f}"), text).map_err(|e| e.to_string())?;
            }
            let (ca, cert, key) = (
                format!("{pki}/ca.pem"),
                format!("{pki}/server-tls-a.pem"),
                format!("{pki}/server-tls-a.key"),
            );
            let args: [&str; 10] = [
                "--config",
                "/tmp/server-a.toml",
                "--pool-file",
                "/tmp/pool-tls",
                "--tls-ca",
                &ca,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ];
            start_server_at(n1, "server-tls", TLS_PORT, &args)?;
            let agent = |name: &str| -> Result<ClientConfig, String> {
                let pem = rmem_common::tls::TlsFiles {
                    ca_file: format!("{pki}/ca.pem").into(),
                    cert_file: format!("{pki}/agent-{name}.pem").into(),
                    key_file: format!("{pki}/agent-{name}.key").into(),
                    crl_file: None,
                }
                .read()
                .map_err(|e| e.to_string())?;
                let tls = pem.data_client().map_err(|e| e.to_string())?;
                Ok(rdma_config(&format!("{ip}:{TLS_PORT}"), "alice", "alice-secret").with_tls(tls, None))
            };
            let (one, two) = (agent("one")?, agent("two")?);
            let mut a = RdmaConnection::connect(&one).map_err(err)?;
            put_all(&mut a, 7000..7001, 3)?;
            let loc = a.locate(7000).map_err(err)?;
            ensure(
                loc.status == PageStatus::Ok && loc.addr != 0,
                format!("agent one's page has no RDMA location: {loc:?}"),
            )?;
            let page = a.read_raw(loc.addr, loc.rkey).map_err(err)?;
            ensure(page == pattern(7000, 3), "agent one cannot read its own page")?;
            let mut b = RdmaConnection::connect(&two).map_err(err)?;
            put_all(&mut b, 7001..7002, 4)?;
            let bloc = b.locate(7001).map_err(err)?;
            ensure(
                bloc.addr != 0 && bloc.rkey != loc.rkey,
                format!("agent two's page shares agent one's region: {bloc:?} {loc:?}"),
            )?;
            // The tenant's page, but in another agent's extent: no address.
            let cross = b.locate(7000).map_err(err)?;
            ensure(
                cross.status == PageStatus::Ok && cross.addr == 0 && cross.rkey == 0,
                format!("agent two was given agent one's page for RDMA: {cross:?}"),
            )?;
            for (what, rkey) in [("agent one's rkey", loc.rkey), ("its own rkey", bloc.rkey)] {
                let mut b = RdmaConnection::connect(&two).map_err(err)?;
                match b.read_raw(loc.addr, rkey) {
                    Err(ClientError::Rdma { source, .. }) if source.is_remote_access() => {}
                    Err(e) => return Err(format!("agent two READ with {what}: unexpected {}", err(e))),
                    Ok(_) => return Err(format!("agent two READ agent one's page with {what}")),
                }
            }
            // Each still reads the tenant's other pages (over TCP).
            let mut b = RdmaConnection::connect(&two).map_err(err)?;
            get_one(&mut b, 7000, 3)?;
            get_one(&mut a, 7001, 4)?;
            // Restarted, the server reloads both pages into the tenant's
            // extents; each agent's LOCATE moves its own into its extents
            // again, so it reads them over RDMA, and the other's stays out
            // of its reach.
            n1.stop("server-tls", Duration::from_secs(10))?;
            start_server_at(n1, "server-tls", TLS_PORT, &args)?;
            let mut a = RdmaConnection::connect(&one).map_err(err)?;
            let mut b = RdmaConnection::connect(&two).map_err(err)?;
            for (c, who, h, version) in [(&mut a, "one", 7000, 3), (&mut b, "two", 7001, 4)] {
                let l = c.locate(h).map_err(err)?;
                ensure(
                    l.status == PageStatus::Ok && l.addr != 0,
                    format!("after the restart agent {who}'s page has no RDMA location: {l:?}"),
                )?;
                let page = c.read_raw(l.addr, l.rkey).map_err(err)?;
                ensure(
                    page == pattern(h, version),
                    format!("agent {who} read wrong bytes of its adopted page"),
                )?;
            }
            let cross = b.locate(7000).map_err(err)?;
            ensure(
                cross.status == PageStatus::Ok && cross.addr == 0,
                format!("after the restart agent two was given agent one's page: {cross:?}"),
            )?;
            get_one(&mut b, 7000, 3)?;
            n1.stop("server-tls", Duration::from_secs(10)).map(|_| ())
        },
    );

    suite.case(
        "a queue pair in error fails retryably, stores nothing, and a new one carries on",
        || {
            let mut c = RdmaConnection::connect(&alice).map_err(err)?;
            put_all(&mut c, 2000..2016, 1)?;
            c.break_queue_pair().map_err(err)?;
            let mut out = vec![[0u8; PAGE_SIZE]; 16];
            let hs: Vec<u64> = (2000..2016).collect();
            match c.get(&hs, &mut out) {
                Err(e) if e.is_retryable() => {}
                Err(e) => return Err(format!("GET on a broken queue pair: {}", err(e))),
                Ok(st) => return Err(format!("GET on a broken queue pair answered {st:?}")),
            }
            let mut c = RdmaConnection::connect(&alice).map_err(err)?;
            c.break_queue_pair().map_err(err)?;
            match put_all(&mut c, 2000..2016, 2) {
                Err(_) => {}
                Ok(()) => return Err("PUT on a broken queue pair succeeded".into()),
            }
            let mut c = RdmaConnection::connect(&alice).map_err(err)?;
            // The failed PUT was never committed: version 1 everywhere.
            check_all(&mut c, 2000..2016, 1)?;
            put_all(&mut c, 2000..2016, 3)?;
            check_all(&mut c, 2000..2016, 3)
        },
    );

    suite.case(
        "a queue pair broken in the middle of 256-page transfers: retryable errors, no wrong or torn page",
        || {
            let handles: Vec<u64> = (5000..5256).collect();
            let mut c = RdmaConnection::connect(&alice).map_err(err)?;
            put_all(&mut c, 5000..5256, 1)?;

            // A GET of 256 pages (one chain of READs) broken while in flight.
            let (c, outcome) = broken_mid_transfer(c, {
                let handles = handles.clone();
                move |c: &mut RdmaConnection| {
                    let mut out = vec![[0u8; PAGE_SIZE]; handles.len()];
                    match c.get(&handles, &mut out) {
                        Ok(st) => {
                            for ((h, page), s) in handles.iter().zip(&out).zip(st) {
                                if *s != PageStatus::Ok || *page != pattern(*h, 1) {
                                    return Err(format!("page {h} came back {s} or wrong"));
                                }
                            }
                            Ok(None)
                        }
                        Err(e) => Ok(Some(e)),
                    }
                }
            })?;
            drop(c);
            let e = outcome.ok_or("the GETs never saw the broken queue pair")?;
            ensure(e.is_retryable(), format!("not retryable: {}", err(e)))?;

            // A PUT of 256 new versions broken while in flight: pages whose
            // commit went through are new, the rest old, none torn.
            let c = RdmaConnection::connect(&alice).map_err(err)?;
            let (c, outcome) = broken_mid_transfer(c, {
                let handles = handles.clone();
                move |c: &mut RdmaConnection| {
                    let pages: Vec<_> = handles.iter().map(|&h| (h, pattern(h, 2))).collect();
                    let refs: Vec<(u64, &rmem_client::Page)> =
                        pages.iter().map(|(h, p)| (*h, p)).collect();
                    match c.put(&refs) {
                        Ok(st) if st.iter().all(|s| *s == PageStatus::Ok) => Ok(None),
                        Ok(st) => Err(format!("PUT statuses {st:?}")),
                        Err(e) => Ok(Some(e)),
                    }
                }
            })?;
            drop(c);
            let put_failed = outcome.is_some();
            let mut c = RdmaConnection::connect(&alice).map_err(err)?;
            let mut out = vec![[0u8; PAGE_SIZE]; handles.len()];
            let st = c.get(&handles, &mut out).map_err(err)?.to_vec();
            let mut new = 0;
            for ((h, page), s) in handles.iter().zip(&out).zip(st) {
                ensure(s == PageStatus::Ok, format!("page {h}: {s}"))?;
                if *page == pattern(*h, 2) {
                    new += 1;
                } else {
                    ensure(*page == pattern(*h, 1), format!("page {h} is torn or wrong"))?;
                }
            }
            ensure(
                put_failed || new == handles.len(),
                "a PUT reported done but not every page is new",
            )?;
            println!("broken PUT: {new} of {} pages committed before the break", handles.len());
            Ok(())
        },
    );

    suite.case(
        "a locked-memory limit too small gets a message saying what to raise",
        || {
            n3.exec_ok(
                &["sh", "-c", "chmod 0666 /dev/infiniband/*"],
                Duration::from_secs(10),
            )?;
            let out = n3.exec(
                &[
                    "rmem-vmtest-rdma",
                    "--role",
                    "memlock-probe",
                    "--server",
                    &addr_a,
                    "--tenant",
                    "alice",
                    "--token",
                    "alice-secret",
                ],
                Duration::from_secs(120),
            )?;
            ensure(
                out.success() && out.stdout.contains("ulimit -l"),
                format!(
                    "probe ended with {}: {}{}",
                    out.status, out.stdout, out.stderr
                ),
            )?;
            println!("memlock message: {}", out.stdout.trim());
            Ok(())
        },
    );

    suite.case(
        "rmem GET/PUT latency over RDMA and TCP against ib_read_lat/ib_write_lat",
        || {
            const N: usize = 30;
            let mut r = RdmaConnection::connect(&alice).map_err(err)?;
            let mut tcp_cfg = alice.clone();
            tcp_cfg.transport = Transport::Tcp;
            let mut t = DataConnection::connect(&tcp_cfg).map_err(err)?;
            let page = pattern(3000, 1);
            let (rp50, rp99) = time_op(N, |i| {
                let st = r.put(&[(3000 + i as u64, &page)]).map_err(err)?;
                ensure(st == [PageStatus::Ok], format!("{st:?}"))
            })?;
            let (tp50, tp99) = time_op(N, |i| {
                let st = t.put(&[(4000 + i as u64, &page)]).map_err(err)?;
                ensure(st == [PageStatus::Ok], format!("{st:?}"))
            })?;
            println!("bench: rmem_put_4k_us rdma p50={rp50:.1} p99={rp99:.1} tcp p50={tp50:.1} p99={tp99:.1}");
            // The PUT answers told the RDMA side where its pages are: each
            // GET is one READ.
            let mut out = [[0u8; PAGE_SIZE]];
            let (gp50, gp99) = time_op(N, |i| {
                let st = r.get(&[3000 + i as u64], &mut out).map_err(err)?;
                ensure(st == [PageStatus::Ok], format!("{st:?}"))
            })?;
            let (hp50, hp99) = time_op(N, |i| {
                let st = t.get(&[4000 + i as u64], &mut out).map_err(err)?;
                ensure(st == [PageStatus::Ok], format!("{st:?}"))
            })?;
            println!("bench: rmem_get_4k_us rdma p50={gp50:.1} p99={gp99:.1} tcp p50={hp50:.1} p99={hp99:.1}");
            let ratio = |a: f64, b: Option<f64>| b.map(|b| format!("{:.2}", a / b)).unwrap_or("n/a".into());
            println!(
                "bench: ratios get_rdma/ib_read_lat={} put_rdma/ib_write_lat={} get_rdma/get_tcp={:.2} put_rdma/put_tcp={:.2}",
                ratio(gp50, reference.read_p50_us),
                ratio(rp50, reference.write_p50_us),
                gp50 / hp50,
                rp50 / tp50
            );
            Ok(())
        },
    );

    suite.case(
        "rmem-agent demo over RDMA: pages evicted and faulted back, every byte verified",
        || {
            let out = n3.exec(
                &[
                    "env",
                    "RUST_LOG=rmem_agent::remote=debug",
                    "rmem-agent",
                    "demo",
                    "--server",
                    &addr_a,
                    "--tenant",
                    "alice",
                    "--token",
                    "alice-secret",
                    "--transport",
                    "rdma",
                    "--budget",
                    "512KiB",
                    "--size",
                    "2MiB",
                    "--ops",
                    "300",
                    "--threads",
                    "1",
                    "--fault-threads",
                    "1",
                    "--fault-timeout",
                    "60s",
                    "--json",
                ],
                Duration::from_secs(900),
            )?;
            ensure(
                out.success(),
                format!(
                    "demo ended with {}: {}{}",
                    out.status, out.stdout, out.stderr
                ),
            )?;
            let report: serde_json::Value = serde_json::from_str(out.stdout.trim())
                .map_err(|e| format!("demo report {:?}: {e}", out.stdout))?;
            ensure(
                report["verify_ok"] == true && report["verify_errors"] == 0,
                format!("demo did not verify: {report}"),
            )?;
            let (evicted, fetched) = (
                report["pages_evicted"].as_u64().unwrap_or(0),
                report["pages_fetched"].as_u64().unwrap_or(0),
            );
            ensure(
                evicted > 0 && fetched > 0,
                format!("nothing moved: {evicted} evicted, {fetched} fetched"),
            )?;
            // The agent logs each connection (with colours: strip them).
            let log = strip_ansi(&out.stderr);
            let connected: Vec<&str> = log.lines().filter(|l| l.contains(" connected ")).collect();
            ensure(
                !connected.is_empty() && connected.iter().all(|l| l.contains("transport=rdma")),
                format!("the agent did not use RDMA only: {log}"),
            )?;
            println!(
                "demo over RDMA: {evicted} pages evicted, {fetched} fetched, fault p50 {} us",
                report["fault_latency_us"]["p50"]
            );
            Ok(())
        },
    );

    suite.case(
        "server B stopped and started again in the middle of a workload: every round verified",
        || {
            let rounds = |log: &str| log.lines().filter(|l| l.starts_with('{')).count();
            n3.start(
                "demo-b",
                &[
                    "rmem-agent",
                    "demo",
                    "--server",
                    &addr_b,
                    "--transport",
                    "rdma",
                    "--budget",
                    "256KiB",
                    "--size",
                    "1MiB",
                    "--ops",
                    "100",
                    "--threads",
                    "1",
                    "--fault-threads",
                    "1",
                    "--fault-timeout",
                    "120s",
                    "--repeat",
                    "0",
                    "--json",
                ],
                &[],
            )?;
            let result = (|| {
                let one = wait_until(Duration::from_secs(600), || {
                    rounds(&n3.log("demo-b").unwrap_or_default()) >= 1
                        || !n3.status("demo-b").map(|s| s.running).unwrap_or(false)
                });
                ensure(
                    one && n3.status("demo-b")?.running,
                    format!("no round finished: {}", n3.log("demo-b")?),
                )?;
                let before = rounds(&n3.log("demo-b")?);
                let st = n2.stop("server-b", Duration::from_secs(30))?;
                ensure(st.code == Some(0), format!("server B stopped with {st}"))?;
                start_server(
                    n2,
                    "server-b",
                    &["--capacity", "64MiB", "--pool-file", "/tmp/pool-b"],
                )?;
                let more = wait_until(Duration::from_secs(900), || {
                    rounds(&n3.log("demo-b").unwrap_or_default()) >= before + 2
                        || !n3.status("demo-b").map(|s| s.running).unwrap_or(false)
                });
                let log = n3.log("demo-b")?;
                ensure(
                    more && n3.status("demo-b")?.running,
                    format!("the demo did not carry on after the restart: {log}"),
                )?;
                let st = n3.stop("demo-b", Duration::from_secs(600))?;
                let log = n3.log("demo-b")?;
                ensure(st.code == Some(0), format!("demo ended with {st}: {log}"))?;
                for line in log.lines().filter(|l| l.starts_with('{')) {
                    let r: serde_json::Value =
                        serde_json::from_str(line).map_err(|e| format!("{line:?}: {e}"))?;
                    ensure(
                        r["verify_ok"] == true,
                        format!("a round did not verify: {line}"),
                    )?;
                }
                let server_log = n2.log("server-b")?;
                ensure(
                    !server_log.contains("cannot register"),
                    format!("server B could not register its pool: {server_log}"),
                )
            })();
            if n3.status("demo-b").map(|s| s.running).unwrap_or(false) {
                let _ = n3.kill("demo-b");
            }
            result
        },
    );
}

/// As nobody (uid 65534) with a 64 KiB locked-memory limit, tries to set up
/// an RDMA connection; prints the error and exits 0 if it is the
/// locked-memory one, 1 otherwise.
pub fn memlock_probe(addr: &str, tenant: &str, token: &str) -> ! {
    let limit = libc::rlimit {
        rlim_cur: 64 << 10,
        rlim_max: 64 << 10,
    };
    // SAFETY: `limit` is a valid rlimit; lowering a limit has no other
    // precondition.
    let set = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
    // SAFETY: dropping to an unprivileged group, then user; no preconditions.
    let gid = unsafe { libc::setgid(65534) };
    // SAFETY: as above.
    let uid = unsafe { libc::setuid(65534) };
    if set != 0 || gid != 0 || uid != 0 {
        println!(
            "cannot drop privileges: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    match RdmaConnection::connect(&rdma_config(addr, tenant, token)) {
        Ok(_) => {
            println!("connected despite a 64 KiB locked-memory limit");
            std::process::exit(1);
        }
        Err(e) => {
            let msg = err(e);
            println!("{msg}");
            std::process::exit(i32::from(!msg.contains("locked-memory limit")));
        }
    }
}
