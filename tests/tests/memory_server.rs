//! Integration tests of `rmem-server`: the real binary on ephemeral loopback
//! ports, driven by the client library and by raw sockets that misbehave on
//! purpose.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, seq::SliceRandom};
use rmem_client::{BlockingConnection, Client, ClientConfig, ClientError, Connection, PageStatus};
use rmem_proto::wire::{self, ErrorCode, FrameHeader, HEADER_LEN, Hello, Opcode, Response};
use rmem_tests::{ServerProcess, pattern};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn hundred_thousand_random_pages_round_trip() {
    const PAGES: usize = 100_000;
    let server = ServerProcess::start(&["--capacity", "512MiB"]);
    let rt = runtime();
    rt.block_on(async {
        let client = Arc::new(Client::connect(server.client_config()).await.unwrap());
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut handles: Vec<u64> = (0..PAGES).map(|_| rng.random()).collect();
        handles.sort_unstable();
        handles.dedup();
        handles.shuffle(&mut rng);
        let handles = Arc::new(handles);

        // PUT from 4 tasks in batches of 256.
        let mut tasks = Vec::new();
        for t in 0..4 {
            let (client, handles) = (client.clone(), handles.clone());
            tasks.push(tokio::spawn(async move {
                for chunk in handles.chunks(256).skip(t).step_by(4) {
                    let pages: Vec<_> = chunk.iter().map(|&h| (h, pattern(h, 1))).collect();
                    let refs: Vec<_> = pages.iter().map(|(h, p)| (*h, p)).collect();
                    let st = client.put(&refs).await.unwrap();
                    assert!(st.iter().all(|s| *s == PageStatus::Ok), "{st:?}");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            client.stat().await.unwrap().used_pages,
            handles.len() as u64
        );

        // GET in another random order and compare every byte.
        let mut order = (*handles).clone();
        order.shuffle(&mut rng);
        let mut out = vec![[0u8; wire::PAGE_SIZE]; 256];
        for chunk in order.chunks(256) {
            let st = client.get(chunk, &mut out[..chunk.len()]).await.unwrap();
            for ((h, s), page) in chunk.iter().zip(&st).zip(&out) {
                assert_eq!(*s, PageStatus::Ok, "page {h}");
                assert!(
                    *page == pattern(*h, 1),
                    "page {h} came back with wrong contents"
                );
            }
        }
    });
}

#[test]
fn many_concurrent_clients_keep_their_pages_apart() {
    let server = ServerProcess::start(&["--capacity", "64MiB"]);
    let threads: Vec<_> = (0..16u64)
        .map(|c| {
            let cfg = server.client_config();
            std::thread::spawn(move || {
                let mut conn = BlockingConnection::connect(&cfg).unwrap();
                // All clients share handles 0..200 of the same tenant but
                // write disjoint ranges; then each overwrites its own.
                let base = c * 1000;
                for v in 1..=3 {
                    let pages: Vec<_> = (base..base + 200).map(|h| (h, pattern(h, v))).collect();
                    for chunk in pages.chunks(64) {
                        let refs: Vec<_> = chunk.iter().map(|(h, p)| (*h, p)).collect();
                        assert!(
                            conn.put(&refs)
                                .unwrap()
                                .iter()
                                .all(|s| *s == PageStatus::Ok)
                        );
                    }
                }
                let hs: Vec<u64> = (base..base + 200).collect();
                let mut out = vec![[0u8; wire::PAGE_SIZE]; 50];
                for chunk in hs.chunks(50) {
                    let st = conn.get(chunk, &mut out[..chunk.len()]).unwrap().to_vec();
                    for ((h, s), p) in chunk.iter().zip(st).zip(&out) {
                        assert_eq!(s, PageStatus::Ok);
                        assert!(*p == pattern(*h, 3), "client {c} page {h} wrong");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut conn = BlockingConnection::connect(&server.client_config()).unwrap();
    assert_eq!(conn.stat().unwrap().used_pages, 16 * 200);
}

#[test]
fn free_then_get_answers_not_found() {
    let server = ServerProcess::start(&["--capacity", "4MiB"]);
    let mut conn = BlockingConnection::connect(&server.client_config()).unwrap();
    let p = pattern(5, 1);
    assert_eq!(conn.put(&[(5, &p), (6, &p)]).unwrap(), [PageStatus::Ok; 2]);
    assert_eq!(
        conn.free(&[5, 99]).unwrap(),
        [PageStatus::Ok, PageStatus::NotFound]
    );
    let mut out = [[0u8; wire::PAGE_SIZE]; 2];
    let st = conn.get(&[5, 6], &mut out).unwrap();
    assert_eq!(st, [PageStatus::NotFound, PageStatus::Ok]);
    assert!(out[1] == p);
    assert_eq!(conn.stat().unwrap().used_pages, 1);
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("server.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn quota_and_capacity_exhaustion_overwrite_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        &dir,
        r#"
        capacity = "4MiB"    # 1024 pages: two extents of 512
        [[tenant]]
        name = "small"
        id = 1
        token = "small-secret"
        quota = "16KiB"      # 4 pages
        [[tenant]]
        name = "big"
        id = 2
        token = "big-secret"
        "#,
    );
    let server = ServerProcess::start(&["--config", &cfg]);
    let small_cfg = server.client_config().with_tenant("small", "small-secret");
    let big_cfg = server.client_config().with_tenant("big", "big-secret");
    let mut small = BlockingConnection::connect(&small_cfg).unwrap();
    let mut big = BlockingConnection::connect(&big_cfg).unwrap();

    let pages: Vec<_> = (0..6).map(|h| (h, pattern(h, 1))).collect();
    let refs: Vec<_> = pages.iter().map(|(h, p)| (*h, p)).collect();
    let st = small.put(&refs).unwrap();
    assert_eq!(&st[..4], [PageStatus::Ok; 4]);
    assert_eq!(&st[4..], [PageStatus::QuotaExceeded; 2]);
    let quota = small.stat().unwrap();
    assert_eq!((quota.tenant_used_pages, quota.tenant_quota_pages), (4, 4));

    // The other tenant fills the other extent; the free slots of small's
    // extent are small's alone.
    let mut stored = 0;
    for first in (0..520u64).step_by(256) {
        let pages: Vec<_> = (first..(first + 256).min(520))
            .map(|h| (h, pattern(h + 100, 1)))
            .collect();
        let refs: Vec<_> = pages.iter().map(|(h, p)| (*h, p)).collect();
        let st = big.put(&refs).unwrap();
        stored += st.iter().filter(|s| **s == PageStatus::Ok).count();
        assert!(
            st.iter()
                .all(|s| matches!(s, PageStatus::Ok | PageStatus::NoSpace)),
            "{st:?}"
        );
    }
    assert_eq!(stored, 512);

    // Nothing anyone stored was overwritten.
    let mut out = vec![[0u8; wire::PAGE_SIZE]; 4];
    let st = small.get(&[0, 1, 2, 3], &mut out).unwrap().to_vec();
    assert_eq!(st, [PageStatus::Ok; 4]);
    for (h, p) in out.iter().enumerate() {
        assert!(*p == pattern(h as u64, 1));
    }
    let mut out = vec![[0u8; wire::PAGE_SIZE]; 12];
    let hs: Vec<u64> = (500..512).collect();
    assert_eq!(big.get(&hs, &mut out).unwrap(), [PageStatus::Ok; 12]);
    for (h, p) in hs.iter().zip(&out) {
        assert!(*p == pattern(h + 100, 1));
    }
    // Freeing one of small's pages leaves room for small only; once small
    // holds nothing, its empty extent goes to whoever needs one.
    assert_eq!(small.free(&[0]).unwrap(), [PageStatus::Ok]);
    assert_eq!(
        big.put(&[(600, &pattern(600, 1))]).unwrap(),
        [PageStatus::NoSpace]
    );
    assert_eq!(small.free(&[1, 2, 3]).unwrap(), [PageStatus::Ok; 3]);
    assert_eq!(
        big.put(&[(600, &pattern(600, 1))]).unwrap(),
        [PageStatus::Ok]
    );
}

fn fill(conn: &mut BlockingConnection, handles: std::ops::Range<u64>, version: u64) {
    let pages: Vec<_> = handles.map(|h| (h, pattern(h, version))).collect();
    for chunk in pages.chunks(128) {
        let refs: Vec<_> = chunk.iter().map(|(h, p)| (*h, p)).collect();
        assert!(
            conn.put(&refs)
                .unwrap()
                .iter()
                .all(|s| *s == PageStatus::Ok)
        );
    }
}

fn verify(conn: &mut BlockingConnection, expected: &HashMap<u64, u64>) {
    let hs: Vec<u64> = expected.keys().copied().collect();
    let mut out = vec![[0u8; wire::PAGE_SIZE]; 128];
    for chunk in hs.chunks(128) {
        let st = conn.get(chunk, &mut out[..chunk.len()]).unwrap().to_vec();
        for ((h, s), p) in chunk.iter().zip(st).zip(&out) {
            assert_eq!(s, PageStatus::Ok, "page {h} lost");
            assert!(
                *p == pattern(*h, expected[h]),
                "page {h} has wrong contents"
            );
        }
    }
}

#[test]
fn pool_file_survives_clean_restart_and_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let pool = pool.to_str().unwrap();
    let args = ["--capacity", "16MiB", "--pool-file", pool];
    let mut expected = HashMap::new();

    let mut server = ServerProcess::start(&args);
    let id = {
        let mut conn = BlockingConnection::connect(&server.client_config()).unwrap();
        fill(&mut conn, 0..1000, 1);
        fill(&mut conn, 0..300, 2);
        conn.free(&(900..1000).collect::<Vec<_>>()).unwrap();
        conn.server_id()
    };
    expected.extend((0..300).map(|h| (h, 2)));
    expected.extend((300..900).map(|h| (h, 1)));
    assert!(server.daemon.terminate(Duration::from_secs(20)).success());

    let mut server = ServerProcess::start(&args);
    let rec = server
        .daemon
        .find_log("recovered pool file")
        .expect("recovery log");
    assert_eq!(rec["fields"]["clean_shutdown"], true, "{rec}");
    {
        let mut conn = BlockingConnection::connect(&server.client_config()).unwrap();
        assert_eq!(
            conn.server_id(),
            id,
            "a file-backed pool keeps its identity"
        );
        verify(&mut conn, &expected);
        let mut out = [[0u8; wire::PAGE_SIZE]; 1];
        assert_eq!(conn.get(&[950], &mut out).unwrap(), [PageStatus::NotFound]);
        // Acknowledged writes, then an unclean stop.
        fill(&mut conn, 500..1200, 3);
    }
    expected.extend((500..1200).map(|h| (h, 3)));
    server.daemon.kill();

    let server = ServerProcess::start(&args);
    let rec = server
        .daemon
        .find_log("recovered pool file")
        .expect("recovery log");
    assert_eq!(rec["fields"]["clean_shutdown"], false, "{rec}");
    assert_eq!(rec["fields"]["corrupt_dropped"], 0, "{rec}");
    let mut conn = BlockingConnection::connect(&server.client_config()).unwrap();
    verify(&mut conn, &expected);
    assert_eq!(conn.stat().unwrap().used_pages, expected.len() as u64);
}

/// Opens a raw connection and reads frames without the client library.
struct Raw {
    stream: TcpStream,
}

impl Raw {
    fn connect(server: &ServerProcess) -> Self {
        let stream = TcpStream::connect(server.data).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Self { stream }
    }

    /// From source address `from` (any 127/8 address is this host's): a
    /// peer of its own to the server.
    fn connect_from(server: &ServerProcess, from: &str) -> Self {
        use socket2::{Domain, SockAddr, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let src: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
        s.bind(&SockAddr::from(src)).unwrap();
        s.connect(&SockAddr::from(server.data)).unwrap();
        let stream: TcpStream = s.into();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Self { stream }
    }

    /// The ERROR the server answered with, if it did before closing.
    fn error(&mut self) -> Option<(ErrorCode, String)> {
        let (h, p) = self.read_frame()?;
        match Response::decode(&h, &p, 0) {
            Ok(Response::Error(e)) => Some((e.code, e.message.to_string())),
            _ => None,
        }
    }

    fn hello(&mut self, version: u16, tenant: &str, credential: &[u8]) {
        let mut buf = Vec::new();
        wire::encode_hello(
            &mut buf,
            &Hello {
                version,
                node_id: 1,
                tenant,
                credential,
            },
        );
        self.stream.write_all(&buf).unwrap();
    }

    fn read_frame(&mut self) -> Option<(FrameHeader, Vec<u8>)> {
        let mut head = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut head).ok()?;
        let h = FrameHeader::decode(&head, u32::MAX).unwrap();
        let mut payload = vec![0u8; h.len as usize];
        self.stream.read_exact(&mut payload).unwrap();
        Some((h, payload))
    }

    /// Expects an ERROR with `code` and then the end of the stream.
    fn expect_error(&mut self, code: ErrorCode) -> String {
        let (h, p) = self.read_frame().expect("an ERROR frame before close");
        let Ok(Response::Error(e)) = Response::decode(&h, &p, 0) else {
            panic!("expected ERROR, got {:?}", h.opcode);
        };
        assert_eq!(e.code, code, "{}", e.message);
        let mut rest = Vec::new();
        let n = self.stream.read_to_end(&mut rest).unwrap_or(0);
        assert_eq!(n, 0, "connection must close after an ERROR");
        e.message.to_string()
    }
}

#[test]
fn bad_clients_get_clear_errors_and_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        &dir,
        r#"
        capacity = "4MiB"
        max_batch_pages = 8
        [[tenant]]
        name = "t"
        id = 1
        token = "right"
        "#,
    );
    let server = ServerProcess::start(&["--config", &cfg]);
    let good_cfg = server.client_config().with_tenant("t", "right");
    let mut good = BlockingConnection::connect(&good_cfg).unwrap();
    assert_eq!(good.limits().max_batch_pages, 8);
    good.put(&[(1, &pattern(1, 1))]).unwrap();

    // Wrong credential, unknown tenant: same answer, no hint which.
    let mut raw = Raw::connect(&server);
    raw.hello(wire::PROTOCOL_VERSION, "t", b"wrong");
    assert_eq!(
        raw.expect_error(ErrorCode::AuthFailed),
        "unknown tenant or wrong credential"
    );
    let mut raw = Raw::connect(&server);
    raw.hello(wire::PROTOCOL_VERSION, "nobody", b"right");
    raw.expect_error(ErrorCode::AuthFailed);
    match BlockingConnection::connect(&server.client_config().with_tenant("t", "nope")) {
        Err(ClientError::Rejected {
            code: ErrorCode::AuthFailed,
            ..
        }) => {}
        other => panic!("expected AuthFailed, got {other:?}"),
    }

    // Wrong protocol version.
    let mut raw = Raw::connect(&server);
    raw.hello(99, "t", b"right");
    let msg = raw.expect_error(ErrorCode::UnsupportedVersion);
    assert!(msg.contains("99"), "{msg}");

    // A request before HELLO.
    let mut raw = Raw::connect(&server);
    let mut buf = Vec::new();
    wire::encode_stat(&mut buf, 1);
    raw.stream.write_all(&buf).unwrap();
    raw.expect_error(ErrorCode::NotAuthenticated);

    // Garbage after a good handshake.
    let mut raw = Raw::connect(&server);
    raw.hello(wire::PROTOCOL_VERSION, "t", b"right");
    assert_eq!(raw.read_frame().unwrap().0.opcode, Opcode::HelloOk);
    raw.stream.write_all(&[0xAB; 64]).unwrap();
    raw.expect_error(ErrorCode::BadFrame);

    // A frame header announcing more than the limit: refused before its
    // payload is read or allocated.
    let mut raw = Raw::connect(&server);
    raw.hello(wire::PROTOCOL_VERSION, "t", b"right");
    raw.read_frame().unwrap();
    let head = FrameHeader {
        len: 64 << 20,
        opcode: Opcode::Put,
        request_id: 5,
    };
    raw.stream.write_all(&head.encode()).unwrap();
    raw.expect_error(ErrorCode::FrameTooLarge);

    // A batch over the negotiated limit.
    let mut raw = Raw::connect(&server);
    raw.hello(wire::PROTOCOL_VERSION, "t", b"right");
    raw.read_frame().unwrap();
    let mut buf = Vec::new();
    wire::encode_handles(&mut buf, Opcode::Get, 6, &[1; 9]);
    raw.stream.write_all(&buf).unwrap();
    raw.expect_error(ErrorCode::BatchTooLarge);

    // An oversized HELLO (before authentication the limit is tiny).
    let mut raw = Raw::connect(&server);
    let head = FrameHeader {
        len: 1 << 20,
        opcode: Opcode::Hello,
        request_id: 0,
    };
    raw.stream.write_all(&head.encode()).unwrap();
    raw.expect_error(ErrorCode::FrameTooLarge);

    // A page whose checksum does not match is refused, and nothing stored.
    let mut raw = Raw::connect(&server);
    raw.hello(wire::PROTOCOL_VERSION, "t", b"right");
    raw.read_frame().unwrap();
    let mut buf = Vec::new();
    wire::encode_put(&mut buf, 7, [(2u64, &pattern(2, 1))].into_iter());
    let last = buf.len() - 1;
    buf[last] ^= 0x01;
    raw.stream.write_all(&buf).unwrap();
    let (h, p) = raw.read_frame().unwrap();
    let Ok(Response::PutOk(st)) = Response::decode(&h, &p, 8) else {
        panic!("expected PUT_OK")
    };
    assert_eq!(st.iter().collect::<Vec<_>>(), [PageStatus::BadChecksum]);

    // Through all of that, the good client kept its connection and data.
    let mut out = [[0u8; wire::PAGE_SIZE]; 2];
    assert_eq!(
        good.get(&[1, 2], &mut out).unwrap(),
        [PageStatus::Ok, PageStatus::NotFound]
    );
    assert!(out[0] == pattern(1, 1));
}

#[test]
fn client_killed_mid_batch_leaves_no_partial_page() {
    let server = ServerProcess::start(&["--capacity", "4MiB"]);
    let mut good = BlockingConnection::connect(&server.client_config()).unwrap();
    good.put(&[(10, &pattern(10, 1)), (11, &pattern(11, 1))])
        .unwrap();

    // A client sends most of a two-page PUT that would overwrite both
    // pages, then dies (RST, as when a process is killed).
    let mut raw = Raw::connect(&server);
    raw.hello(wire::PROTOCOL_VERSION, "default", b"");
    raw.read_frame().unwrap();
    let (p10, p11) = (pattern(10, 2), pattern(11, 2));
    let mut buf = Vec::new();
    wire::encode_put(&mut buf, 1, [(10u64, &p10), (11, &p11)].into_iter());
    raw.stream.write_all(&buf[..buf.len() - 100]).unwrap();
    let sock = socket_linger_zero(&raw.stream);
    drop(raw);
    drop(sock);

    // Give the server a moment to see the reset, then check both pages.
    assert!(rmem_tests::wait_until(Duration::from_secs(5), || {
        let mut c = BlockingConnection::connect(&server.client_config()).unwrap();
        c.stat().is_ok()
    }));
    let mut out = [[0u8; wire::PAGE_SIZE]; 2];
    assert_eq!(good.get(&[10, 11], &mut out).unwrap(), [PageStatus::Ok; 2]);
    assert!(out[0] == pattern(10, 1), "page 10 was partly overwritten");
    assert!(out[1] == pattern(11, 1), "page 11 was partly overwritten");
}

/// Sets SO_LINGER to zero so closing sends a reset.
fn socket_linger_zero(stream: &TcpStream) -> TcpStream {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a valid socket fd with a correctly sized linger.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
    stream.try_clone().unwrap()
}

#[test]
fn pipelined_requests_are_all_answered_in_order_of_ids() {
    let server = ServerProcess::start(&["--capacity", "8MiB"]);
    let mut raw = Raw::connect(&server);
    raw.hello(wire::PROTOCOL_VERSION, "default", b"");
    raw.read_frame().unwrap();
    // 200 requests in one write: PUT i, then GET i.
    let mut buf = Vec::new();
    for i in 0..100u64 {
        wire::encode_put(&mut buf, 2 * i, [(i, &pattern(i, 9))].into_iter());
        wire::encode_handles(&mut buf, Opcode::Get, 2 * i + 1, &[i]);
    }
    raw.stream.write_all(&buf).unwrap();
    for id in 0..200u64 {
        let (h, p) = raw.read_frame().unwrap();
        assert_eq!(h.request_id, id);
        match Response::decode(&h, &p, 256).unwrap() {
            Response::PutOk(s) => assert_eq!(s.iter().next(), Some(PageStatus::Ok)),
            Response::GetOk(b) => {
                let e = b.iter().next().unwrap();
                assert!(*e.data.unwrap() == pattern(id / 2, 9));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn admin_grpc_serves_stats_health_and_reflection() {
    let server = ServerProcess::start(&["--capacity", "8MiB"]);
    let mut conn = BlockingConnection::connect(&server.client_config()).unwrap();
    conn.put(&[(1, &pattern(1, 1)), (2, &pattern(2, 1))])
        .unwrap();
    let mut out = [[0u8; wire::PAGE_SIZE]; 1];
    conn.get(&[1], &mut out).unwrap();

    let rt = runtime();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut admin =
            rmem_proto::admin::v1::server_admin_client::ServerAdminClient::new(channel.clone());
        let stats = admin
            .stats(rmem_proto::admin::v1::StatsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stats.capacity_pages, 2048);
        assert_eq!(stats.used_pages, 2);
        assert_eq!(stats.tenants[0].name, "default");
        assert_eq!(stats.tenants[0].used_pages, 2);
        let put = stats.ops.iter().find(|o| o.op == "put").unwrap();
        assert_eq!((put.requests, put.pages), (1, 2));
        let get = stats.ops.iter().find(|o| o.op == "get").unwrap();
        assert_eq!(get.latency_us.unwrap().count, 1);

        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        for service in ["", "rmem.admin.v1.ServerAdmin"] {
            let r = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                r.status,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
                "service {service:?}"
            );
        }

        // Server reflection, both protocol versions, lists our services.
        use tonic_reflection::pb::{v1, v1alpha};
        let mut r1 = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
        let req = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        let mut stream = r1
            .server_reflection_info(tokio_stream::once(req))
            .await
            .unwrap()
            .into_inner();
        let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("no service list")
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"rmem.admin.v1.ServerAdmin"), "{names:?}");
        assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

        let mut ra = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
        let req = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        };
        let mut stream = ra
            .server_reflection_info(tokio_stream::once(req))
            .await
            .unwrap()
            .into_inner();
        assert!(matches!(
            stream.message().await.unwrap().unwrap().message_response,
            Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(_))
        ));
    });
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut server = ServerProcess::start(&["--capacity", "8MiB"]);
    let mut conn = BlockingConnection::connect(&server.client_config()).unwrap();
    conn.put(&[(1, &pattern(1, 1))]).unwrap();
    let status = server.daemon.terminate(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
    assert!(server.daemon.find_log("memory server stopped").is_some());
    // The idle client is told the server is going away.
    match conn.stat() {
        Err(ClientError::Rejected {
            code: ErrorCode::ShuttingDown,
            ..
        })
        | Err(ClientError::Io { .. }) => {}
        other => panic!("expected shutting_down, got {other:?}"),
    }
}

#[test]
fn bad_configuration_names_the_field_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    for (text, field) in [
        ("capacity = \"1000\"", "`capacity`"),
        ("durability = \"sync\"", "`durability`"),
        ("listen = \"127.0.0.1:1\"\nbogus = 1", "bogus"),
        (
            "[[tenant]]\nname = \"a\"\nid = 1\n[[tenant]]\nname = \"b\"\nid = 1",
            "`tenant[1].id`",
        ),
    ] {
        let cfg = write_config(&dir, text);
        let out = std::process::Command::new(rmem_tests::bin("rmem-server"))
            .args(["--config", &cfg, "--check-config"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(field), "{text}: {stderr}");
    }
}

#[test]
fn client_pool_rides_out_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let pool = pool.to_str().unwrap().to_string();
    let mut server = ServerProcess::start(&["--capacity", "4MiB", "--pool-file", &pool]);
    let addr = server.data.to_string();
    let rt = runtime();
    rt.block_on(async {
        let mut cfg = server.client_config();
        cfg.request_timeout = Duration::from_secs(20);
        let client = Arc::new(Client::connect(cfg).await.unwrap());
        let p = pattern(3, 1);
        client.put(&[(3, &p)]).await.unwrap();

        assert!(server.daemon.terminate(Duration::from_secs(20)).success());
        // A request issued while the server is down waits for it.
        let waiting = {
            let client = client.clone();
            tokio::spawn(async move {
                let mut out = [[0u8; wire::PAGE_SIZE]; 1];
                let st = client.get(&[3], &mut out).await.unwrap();
                (st, out[0])
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = tokio::task::spawn_blocking(move || {
            ServerProcess::start(&[
                "--capacity",
                "4MiB",
                "--pool-file",
                &pool,
                "--listen",
                &addr,
            ])
        })
        .await
        .unwrap();
        let (st, page) = waiting.await.unwrap();
        assert_eq!(st, [PageStatus::Ok]);
        assert!(page == p);
        drop(again);
    });
}

#[test]
fn client_fails_cleanly_when_the_server_is_gone_for_good() {
    let mut server = ServerProcess::start(&["--capacity", "4MiB"]);
    let rt = runtime();
    rt.block_on(async {
        let mut cfg = server.client_config();
        cfg.request_timeout = Duration::from_secs(1);
        let client = Client::connect(cfg).await.unwrap();
        server.daemon.kill();
        let started = std::time::Instant::now();
        let mut out = [[0u8; wire::PAGE_SIZE]; 1];
        let err = client.get(&[1], &mut out).await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "gave up after {:?}",
            started.elapsed()
        );
    });
    let mut blocking_cfg = server.client_config();
    blocking_cfg.connect_timeout = Duration::from_millis(500);
    assert!(matches!(
        BlockingConnection::connect(&blocking_cfg),
        Err(ClientError::Connect { .. })
    ));
}

// Timeouts, the connection limit, backpressure, drain and the client's own
// checksum check. The servers below run with short timeouts; every wait is
// bounded and no sleep stands in for a readiness check.

/// A raw connection that has completed the handshake as tenant `default`.
fn handshaken(server: &ServerProcess) -> Raw {
    let mut raw = Raw::connect(server);
    raw.hello(wire::PROTOCOL_VERSION, "default", b"");
    let (h, _) = raw.read_frame().expect("HELLO_OK");
    assert_eq!(h.opcode, Opcode::HelloOk);
    raw
}

/// Writes `bytes` one at a time, `gap` apart, from another thread, until
/// all are written, a write fails or the returned flag is set. The thread
/// returns how many bytes it wrote.
fn drip(
    stream: &TcpStream,
    bytes: Vec<u8>,
    gap: Duration,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<usize>) {
    let mut stream = stream.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut written = 0;
        for b in bytes {
            if flag.load(Ordering::Relaxed) || stream.write_all(&[b]).is_err() {
                break;
            }
            written += 1;
            std::thread::sleep(gap);
        }
        written
    });
    (stop, thread)
}

fn short_timeouts_server(dir: &tempfile::TempDir) -> ServerProcess {
    let cfg = write_config(
        dir,
        r#"
        capacity = "4MiB"
        handshake_timeout = "300ms"
        idle_timeout = "600ms"
        request_timeout = "800ms"
        "#,
    );
    ServerProcess::start(&["--config", &cfg])
}

#[test]
fn handshake_and_idle_timeouts_close_with_a_timeout_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = short_timeouts_server(&dir);

    // Connect and say nothing.
    let started = Instant::now();
    let mut raw = Raw::connect(&server);
    let msg = raw.expect_error(ErrorCode::Timeout);
    let took = started.elapsed();
    assert!(msg.contains("handshake"), "{msg}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "handshake timeout after {took:?}"
    );

    // A HELLO dripped a byte every 50 ms (2 s in all) does not stretch the
    // handshake timeout: it covers the whole exchange.
    let mut raw = Raw::connect(&server);
    let mut hello = Vec::new();
    wire::encode_hello(
        &mut hello,
        &Hello {
            version: wire::PROTOCOL_VERSION,
            node_id: 1,
            tenant: "default",
            credential: b"",
        },
    );
    let started = Instant::now();
    let (stop, dripper) = drip(&raw.stream, hello, Duration::from_millis(50));
    let msg = raw.expect_error(ErrorCode::Timeout);
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    dripper.join().unwrap();
    assert!(msg.contains("handshake"), "{msg}");
    assert!(
        took < Duration::from_secs(2),
        "dripped HELLO cut after {took:?}"
    );

    // Requests every 150 ms keep a connection open well past the idle
    // timeout; silence then closes it.
    let mut raw = handshaken(&server);
    let started = Instant::now();
    let mut quiet = Instant::now();
    for id in 1..=10 {
        std::thread::sleep(Duration::from_millis(150));
        let mut buf = Vec::new();
        wire::encode_stat(&mut buf, id);
        raw.stream.write_all(&buf).unwrap();
        let (h, _) = raw.read_frame().expect("STAT_OK while active");
        assert_eq!((h.opcode, h.request_id), (Opcode::StatOk, id));
        quiet = Instant::now();
    }
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let msg = raw.expect_error(ErrorCode::Timeout);
    let took = quiet.elapsed();
    assert!(msg.contains("idle"), "{msg}");
    // The server's idle clock starts when it sent the last answer, a little
    // before we got it.
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "idle timeout after {took:?}"
    );
}

#[test]
fn a_frame_dripped_byte_by_byte_is_cut_off_at_the_request_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = short_timeouts_server(&dir);
    let mut raw = handshaken(&server);

    // Frames that each arrive within the request timeout are served even
    // when together they take longer: the deadline is per frame.
    let started = Instant::now();
    for id in 1..=4u64 {
        let mut buf = Vec::new();
        wire::encode_stat(&mut buf, id);
        for b in buf {
            raw.stream.write_all(&[b]).unwrap();
            std::thread::sleep(Duration::from_millis(15));
        }
        let (h, _) = raw.read_frame().expect("STAT_OK");
        assert_eq!((h.opcode, h.request_id), (Opcode::StatOk, id));
    }
    assert!(started.elapsed() > Duration::from_millis(800));

    // A one-page PUT at one byte per 100 ms would take 7 minutes; the
    // server must give up 800 ms after its first byte.
    let mut put = Vec::new();
    wire::encode_put(&mut put, 9, [(1u64, &pattern(1, 1))].into_iter());
    let started = Instant::now();
    let (stop, dripper) = drip(&raw.stream, put, Duration::from_millis(100));
    let (h, p) = raw
        .read_frame()
        .expect("an ERROR frame: the slow frame was never cut off");
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let dripped = dripper.join().unwrap();
    let Ok(Response::Error(e)) = Response::decode(&h, &p, 0) else {
        panic!("expected ERROR, got {:?}", h.opcode);
    };
    assert_eq!(e.code, ErrorCode::Timeout, "{}", e.message);
    assert!(e.message.contains("request"), "{}", e.message);
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "slow frame cut after {took:?} ({dripped} bytes)"
    );
    let mut rest = Vec::new();
    assert_eq!(raw.stream.read_to_end(&mut rest).unwrap_or(0), 0);

    // The server is fine and nothing of the cut PUT was stored.
    let mut conn = BlockingConnection::connect(&server.client_config()).unwrap();
    let mut out = [[0u8; wire::PAGE_SIZE]; 1];
    assert_eq!(conn.get(&[1], &mut out).unwrap(), [PageStatus::NotFound]);
}

#[test]
fn strangers_cannot_hold_the_slots_nor_guess_credentials_fast() {
    let server = ServerProcess::start(&["--capacity", "4MiB", "--token", "right"]);
    let cfg = server.client_config().with_tenant("default", "right");

    // 64 sockets from one address that never say HELLO hold its whole
    // share; the next one is refused, and an agent elsewhere still gets in.
    let silent: Vec<Raw> = (0..64)
        .map(|_| Raw::connect_from(&server, "127.0.0.2"))
        .collect();
    let mut extra = Raw::connect_from(&server, "127.0.0.2");
    let (code, msg) = extra.error().expect("a refusal");
    assert_eq!(code, ErrorCode::Busy, "{msg}");
    assert!(msg.contains("have not authenticated"), "{msg}");
    let mut good = BlockingConnection::connect(&cfg).unwrap();
    good.put(&[(1, &pattern(1, 1))]).unwrap();
    drop(silent);

    // Guessing credentials from one address, as fast as it can for 3 s:
    // a handful of tries get an answer, the rest are refused unheard.
    let start = Instant::now();
    let (mut answered, mut barred) = (0, 0);
    while start.elapsed() < Duration::from_secs(3) {
        let mut raw = Raw::connect_from(&server, "127.0.0.3");
        raw.hello(wire::PROTOCOL_VERSION, "default", b"guess");
        match raw.error() {
            Some((ErrorCode::AuthFailed, _)) => answered += 1,
            Some((ErrorCode::Busy, m)) => {
                assert!(m.contains("failed authentications"), "{m}");
                barred += 1;
            }
            other => panic!("unexpected answer to a wrong credential: {other:?}"),
        }
    }
    assert!(
        (6..=12).contains(&answered),
        "{answered} guesses answered in 3 s ({barred} refused)"
    );
    // Everyone else is unaffected.
    let mut out = [[0u8; wire::PAGE_SIZE]];
    let mut again = BlockingConnection::connect(&cfg).unwrap();
    assert_eq!(again.get(&[1], &mut out).unwrap(), [PageStatus::Ok]);
    assert_eq!(good.stat().unwrap().used_pages, 1);
}

#[test]
fn max_connections_refuses_extra_clients_with_busy() {
    let server = ServerProcess::start(&["--capacity", "4MiB", "--max-connections", "3"]);
    let cfg = server.client_config();
    let mut a = BlockingConnection::connect(&cfg).unwrap();
    let mut b = BlockingConnection::connect(&cfg).unwrap();
    a.put(&[(1, &pattern(1, 1))]).unwrap();
    b.put(&[(2, &pattern(2, 1))]).unwrap();

    // A burst of five connections for the one free slot: exactly one gets
    // in, however fast they come.
    let mut burst: Vec<Raw> = (0..5).map(|_| Raw::connect(&server)).collect();
    for raw in &mut burst {
        raw.hello(wire::PROTOCOL_VERSION, "default", b"");
    }
    let mut admitted = Vec::new();
    for mut raw in burst {
        let (h, p) = raw.read_frame().expect("an answer to HELLO");
        match Response::decode(&h, &p, 0).unwrap() {
            Response::HelloOk(_) => admitted.push(raw),
            Response::Error(e) => {
                assert_eq!(e.code, ErrorCode::Busy, "{}", e.message);
                let mut rest = Vec::new();
                assert_eq!(raw.stream.read_to_end(&mut rest).unwrap_or(0), 0);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(admitted.len(), 1, "max_connections = 3 with 2 open");

    // The client library reports the refusal as `busy`, a retryable error.
    match BlockingConnection::connect(&cfg) {
        Err(
            e @ ClientError::Rejected {
                code: ErrorCode::Busy,
                ..
            },
        ) => assert!(e.is_retryable()),
        other => panic!("expected busy, got {other:?}"),
    }

    // The clients already in keep working.
    let mut out = [[0u8; wire::PAGE_SIZE]; 2];
    assert_eq!(a.get(&[1, 2], &mut out).unwrap(), [PageStatus::Ok; 2]);
    assert!(out[0] == pattern(1, 1) && out[1] == pattern(2, 1));
    b.put(&[(3, &pattern(3, 1))]).unwrap();
    assert_eq!(b.stat().unwrap().used_pages, 3);

    // A closed connection frees its slot.
    drop(admitted);
    assert!(rmem_tests::wait_until(Duration::from_secs(10), || {
        BlockingConnection::connect(&cfg).is_ok()
    }));
}

#[test]
fn a_client_that_never_reads_is_throttled_not_buffered() {
    const PAGES: u64 = 64;
    const REQUEST_LEN: usize = HEADER_LEN + 8 + 8 * PAGES as usize;
    const RESPONSE_LEN: usize = HEADER_LEN + 8 + wire::GET_ENTRY_LEN * PAGES as usize;
    const GROWTH_LIMIT: u64 = 64 << 20;
    // Answers to this many requests are 200 MiB: far more than the limit.
    const MIN_REQUESTS: usize = (200 << 20) / RESPONSE_LEN;

    let server = ServerProcess::start(&["--capacity", "16MiB"]);
    let mut other = BlockingConnection::connect(&server.client_config()).unwrap();
    fill(&mut other, 0..PAGES, 1);
    let handles: Vec<u64> = (0..PAGES).collect();
    let mut out = vec![[0u8; wire::PAGE_SIZE]; PAGES as usize];
    other.get(&handles, &mut out).unwrap();
    let base = server.daemon.rss_bytes();
    let check_rss = |when: &str| {
        let rss = server.daemon.rss_bytes();
        assert!(
            rss < base + GROWTH_LIMIT,
            "{when}: server RSS grew from {} MiB to {} MiB",
            base >> 20,
            rss >> 20
        );
    };

    // Pipeline GETs of 64 pages and never read. A send that makes no
    // progress for 500 ms means the server stopped reading us.
    let mut raw = handshaken(&server);
    raw.stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let started = Instant::now();
    let mut written = 0usize;
    let mut next_id = 1u64;
    let mut chunk = Vec::new();
    'send: loop {
        chunk.clear();
        for _ in 0..256 {
            wire::encode_handles(&mut chunk, Opcode::Get, next_id, &handles);
            next_id += 1;
        }
        let mut pos = 0;
        while pos < chunk.len() {
            match raw.stream.write(&chunk[pos..]) {
                Ok(n) => {
                    pos += n;
                    written += n;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if written / REQUEST_LEN >= MIN_REQUESTS {
                        break 'send;
                    }
                }
                Err(e) => panic!("send failed: {e}"),
            }
        }
        check_rss("while sending");
        assert!(
            written < 256 << 20,
            "sent {} MiB of GETs without ever blocking: the server reads without backpressure",
            written >> 20
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "sending took too long"
        );
    }
    let requests = written / REQUEST_LEN;
    assert!(requests >= MIN_REQUESTS);
    eprintln!(
        "blocked after {requests} GETs ({} MiB asked for) in {:?}",
        (requests * RESPONSE_LEN) >> 20,
        started.elapsed()
    );
    check_rss("once blocked");

    // For two seconds other clients are served, and memory stays bounded.
    let held = Instant::now();
    let mut rounds = 0;
    while held.elapsed() < Duration::from_secs(2) {
        rounds += 1;
        other
            .put(&[(1000 + rounds, &pattern(1000 + rounds, 1))])
            .unwrap();
        assert_eq!(
            other.get(&handles, &mut out).unwrap(),
            [PageStatus::Ok; PAGES as usize]
        );
        assert!(out.iter().zip(&handles).all(|(p, &h)| *p == pattern(h, 1)));
        check_rss("while blocked");
    }
    assert!(
        rounds >= 5,
        "only {rounds} requests of another client served"
    );

    // Still blocked: the server did not start buffering in the meantime.
    match raw.stream.write(&chunk) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("the stalled connection accepted more: {other:?}"),
    }

    // The stalled client's answers are intact and in order once it reads.
    for id in 1..=64u64 {
        let (h, p) = raw.read_frame().expect("GET_OK");
        assert_eq!(h.request_id, id);
        let Ok(Response::GetOk(batch)) = Response::decode(&h, &p, 256) else {
            panic!("expected GET_OK, got {:?}", h.opcode)
        };
        assert!(
            batch
                .iter()
                .zip(&handles)
                .all(|(e, &h)| *e.data.unwrap() == pattern(h, 1))
        );
    }
    check_rss("after reading");
}

/// Bytes of our connection `client` → `server` that the server has not read
/// yet: still in our send queue or in its receive queue.
fn unread_by_server(stream: &TcpStream) -> u64 {
    use std::os::fd::AsRawFd;
    const SIOCOUTQNSD: libc::Ioctl = 0x894B;
    let mut unsent: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD writes one int through the pointer, which is valid.
    let r = unsafe { libc::ioctl(stream.as_raw_fd(), SIOCOUTQNSD, &mut unsent) };
    assert_eq!(r, 0, "ioctl SIOCOUTQNSD");
    let (ours, theirs) = (stream.local_addr().unwrap(), stream.peer_addr().unwrap());
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let queued = tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = |a: &str| u16::from_str_radix(a.rsplit(':').next()?, 16).ok();
            let rx = u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()?;
            (port(f.get(1)?)? == theirs.port() && port(f.get(2)?)? == ours.port()).then_some(rx)
        })
        .next()
        .unwrap_or(0);
    unsent as u64 + queued
}

#[test]
fn sigterm_answers_every_request_received_before_it() {
    const GETS: u64 = 64;
    const PUTS: u64 = 200;
    const PAGES: u64 = 16;
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let pool = pool.to_str().unwrap();
    let args = ["--capacity", "32MiB", "--pool-file", pool];
    let mut server = ServerProcess::start(&args);
    let read_handles: Vec<u64> = (100_000..100_000 + PAGES * 4).collect();
    {
        let mut conn = BlockingConnection::connect(&server.client_config()).unwrap();
        fill(&mut conn, 100_000..100_000 + PAGES * 4, 1);
    }

    // 16 MiB of GET answers that we do not read yet: the server blocks
    // writing them, so nothing sent after the GETs is read before SIGTERM.
    let mut raw = handshaken(&server);
    let mut gets = Vec::new();
    for id in 1..=GETS {
        wire::encode_handles(&mut gets, Opcode::Get, id, &read_handles);
    }
    raw.stream.write_all(&gets).unwrap();

    // Then 200 PUTs of 16 pages, written without waiting by another thread
    // (they do not all fit in the socket buffers).
    let mut puts = Vec::new();
    let pages: Vec<_> = (0..PUTS * PAGES).map(|h| pattern(h, 7)).collect();
    for r in 0..PUTS {
        let batch: Vec<_> = (r * PAGES..(r + 1) * PAGES)
            .map(|h| (h, &pages[h as usize]))
            .collect();
        wire::encode_put(&mut puts, GETS + 1 + r, batch.into_iter());
    }
    let put_len = puts.len() / PUTS as usize;
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let mut stream = raw.stream.try_clone().unwrap();
        let written = written.clone();
        std::thread::spawn(move || {
            let mut pos = 0;
            while pos < puts.len() {
                // Small writes: a blocking send returns only once all of
                // its bytes are queued.
                match stream.write(&puts[pos..puts.len().min(pos + 4096)]) {
                    Ok(n) => {
                        pos += n;
                        written.store(pos, Ordering::SeqCst);
                    }
                    Err(_) => break,
                }
            }
        })
    };
    assert!(
        rmem_tests::wait_until(Duration::from_secs(10), || {
            written.load(Ordering::SeqCst) >= 4 * put_len
        }),
        "could not write 4 PUTs: {} bytes of {put_len} each",
        written.load(Ordering::SeqCst)
    );
    let before = written.load(Ordering::SeqCst);
    server.daemon.signal(libc::SIGTERM);
    let complete = (before / put_len) as u64;
    server
        .daemon
        .wait_for_log("stopping: draining connections", Duration::from_secs(10))
        .expect("the server saw SIGTERM");
    let unread = unread_by_server(&raw.stream);
    eprintln!(
        "SIGTERM after {complete} whole PUTs written; {} KiB unread by the server",
        unread >> 10
    );
    // Otherwise this would not test the drain.
    assert!(
        unread >= put_len as u64,
        "the server read the PUTs before SIGTERM"
    );

    // Only now read: every GET, then every PUT written before SIGTERM (and
    // maybe some after) is answered, then `shutting_down`, then the end.
    for id in 1..=GETS {
        let (h, p) = raw.read_frame().expect("GET_OK");
        assert_eq!((h.opcode, h.request_id), (Opcode::GetOk, id));
        let Ok(Response::GetOk(batch)) = Response::decode(&h, &p, 256) else {
            panic!("bad GET_OK")
        };
        assert!(
            batch
                .iter()
                .zip(&read_handles)
                .all(|(e, &h)| *e.data.unwrap() == pattern(h, 1))
        );
    }
    let mut acked = 0;
    loop {
        let (h, p) = raw
            .read_frame()
            .unwrap_or_else(|| panic!("the stream ended after {acked} PUT answers"));
        match Response::decode(&h, &p, 256).unwrap() {
            Response::PutOk(st) => {
                acked += 1;
                assert_eq!(h.request_id, GETS + acked);
                assert!(st.iter().all(|s| s == PageStatus::Ok));
            }
            Response::Error(e) => {
                assert_eq!(e.code, ErrorCode::ShuttingDown, "{}", e.message);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut rest = Vec::new();
    assert_eq!(raw.stream.read_to_end(&mut rest).unwrap_or(0), 0);
    assert!(
        acked >= complete,
        "only {acked} of the {complete} PUTs written before SIGTERM were answered"
    );
    eprintln!("{acked} PUTs of {PUTS} answered");
    writer.join().unwrap();
    let status = server
        .daemon
        .wait(Duration::from_secs(30))
        .expect("server exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");

    // Every acknowledged page survived, and nothing else was stored.
    let server = ServerProcess::start(&args);
    let rec = server
        .daemon
        .find_log("recovered pool file")
        .expect("recovery log");
    assert_eq!(rec["fields"]["clean_shutdown"], true, "{rec}");
    let mut conn = BlockingConnection::connect(&server.client_config()).unwrap();
    let expected: HashMap<u64, u64> = (0..acked * PAGES).map(|h| (h, 7)).collect();
    verify(&mut conn, &expected);
    assert_eq!(
        conn.stat().unwrap().used_pages,
        read_handles.len() as u64 + acked * PAGES
    );
}

#[test]
fn executed_requests_are_answered_before_a_fatal_error() {
    let server = ServerProcess::start(&["--capacity", "4MiB"]);
    let mut raw = handshaken(&server);
    // A PUT and, in the same write, garbage.
    let mut buf = Vec::new();
    wire::encode_put(&mut buf, 1, [(1u64, &pattern(1, 1))].into_iter());
    buf.extend_from_slice(&[0xAB; 64]);
    raw.stream.write_all(&buf).unwrap();
    let (h, _) = raw.read_frame().expect("PUT_OK before the ERROR");
    assert_eq!((h.opcode, h.request_id), (Opcode::PutOk, 1));
    raw.expect_error(ErrorCode::BadFrame);
    let mut conn = BlockingConnection::connect(&server.client_config()).unwrap();
    let mut out = [[0u8; wire::PAGE_SIZE]; 1];
    assert_eq!(conn.get(&[1], &mut out).unwrap(), [PageStatus::Ok]);
}

/// A fake memory server speaking just enough of the protocol: HELLO_OK to
/// any HELLO, then a GET_OK with `pattern(handle, 1)` for each GET, where
/// the checksum of a page is wrong when `corrupt(handle, nth GET)`.
fn fake_server(
    corrupt: impl Fn(u64, usize) -> bool + Send + Sync + 'static,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let gets = Arc::new(AtomicUsize::new(0));
    let (corrupt, counter) = (Arc::new(corrupt), gets.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let (corrupt, gets) = (corrupt.clone(), counter.clone());
            std::thread::spawn(move || {
                let mut head = [0u8; HEADER_LEN];
                while stream.read_exact(&mut head).is_ok() {
                    let h = FrameHeader::decode(&head, 1 << 20).unwrap();
                    let mut payload = vec![0u8; h.len as usize];
                    stream.read_exact(&mut payload).unwrap();
                    let mut out = Vec::new();
                    match wire::Request::decode(&h, &payload, 256).unwrap() {
                        wire::Request::Hello(_) => wire::encode_hello_ok(
                            &mut out,
                            &wire::HelloOk {
                                version: wire::PROTOCOL_VERSION,
                                flags: 0,
                                page_size: wire::PAGE_SIZE as u32,
                                limits: wire::Limits::for_batch(256),
                                server_id: 42,
                            },
                        ),
                        wire::Request::Get(handles) => {
                            let nth = gets.fetch_add(1, Ordering::SeqCst);
                            let mut w = wire::GetOkWriter::begin(&mut out, h.request_id, 8);
                            for handle in handles.iter() {
                                let page = pattern(handle, 1);
                                let bad = u32::from(corrupt(handle, nth));
                                w.push_page(wire::page_crc(&page) ^ bad, |dst| {
                                    dst.copy_from_slice(&page)
                                });
                            }
                            w.finish();
                        }
                        other => panic!("the fake server got {other:?}"),
                    }
                    if stream.write_all(&out).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, gets)
}

#[test]
fn client_rejects_pages_whose_checksum_does_not_match() {
    const SENTINEL: wire::Page = [0x5A; wire::PAGE_SIZE];
    let is_bad_page_2 = |e: &ClientError| matches!(e, ClientError::Checksum { handle: 2, .. });
    // Page 2 always arrives with a wrong checksum.
    let (addr, _) = fake_server(|handle, _| handle == 2);
    let cfg = ClientConfig::new(addr.to_string());

    let mut conn = BlockingConnection::connect(&cfg).unwrap();
    let mut out = [SENTINEL; 1];
    let err = conn.get(&[2], &mut out).unwrap_err();
    assert!(is_bad_page_2(&err), "{err:?}");
    assert!(out[0] == SENTINEL, "bad bytes were handed out");
    let mut out = [SENTINEL; 3];
    let err = conn.get(&[1, 2, 3], &mut out).unwrap_err();
    assert!(is_bad_page_2(&err), "{err:?}");
    assert!(out[1] == SENTINEL, "bad bytes were handed out");
    // The connection stays usable for good pages.
    let mut out = [SENTINEL; 1];
    assert_eq!(conn.get(&[1], &mut out).unwrap(), [PageStatus::Ok]);
    assert!(out[0] == pattern(1, 1));

    let rt = runtime();
    rt.block_on(async {
        let conn = Connection::connect(&cfg).await.unwrap();
        let mut out = [SENTINEL; 1];
        let err = conn.get(&[2], &mut out).await.unwrap_err();
        assert!(is_bad_page_2(&err), "{err:?}");
        assert!(out[0] == SENTINEL, "bad bytes were handed out");

        // The pool retries a bad checksum until its deadline, then reports
        // it, still without handing out the bytes.
        let mut pool_cfg = cfg.clone();
        pool_cfg.request_timeout = Duration::from_millis(500);
        pool_cfg.connections = 1;
        let client = Client::connect(pool_cfg.clone()).await.unwrap();
        let err = client.get(&[2], &mut out).await.unwrap_err();
        assert!(is_bad_page_2(&err), "{err:?}");
        assert!(out[0] == SENTINEL, "bad bytes were handed out");

        // A page corrupted once in transit is fetched again.
        let (addr, gets) = fake_server(|_, nth| nth == 0);
        pool_cfg.addr = addr.to_string();
        let client = Client::connect(pool_cfg).await.unwrap();
        let st = client.get(&[7], &mut out).await.unwrap();
        assert_eq!(st, [PageStatus::Ok]);
        assert!(out[0] == pattern(7, 1));
        assert_eq!(gets.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn a_client_that_takes_no_response_for_the_request_timeout_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let server = short_timeouts_server(&dir);
    let mut filler = BlockingConnection::connect(&server.client_config()).unwrap();
    fill(&mut filler, 0..64, 1);
    let handles: Vec<u64> = (0..64).collect();

    // Pipeline 64-page GETs and read nothing until the send blocks: the
    // server's answers fill both socket buffers.
    let mut raw = handshaken(&server);
    raw.stream
        .set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut chunk = Vec::new();
    'send: for id in 1..10_000u64 {
        chunk.clear();
        wire::encode_handles(&mut chunk, Opcode::Get, id, &handles);
        let mut pos = 0;
        while pos < chunk.len() {
            match raw.stream.write(&chunk[pos..]) {
                Ok(n) => pos += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break 'send;
                }
                // On a loaded machine the server may give up on us before
                // our own send buffer fills: that is the outcome under test.
                Err(e)
                    if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) =>
                {
                    break 'send;
                }
                Err(e) => panic!("send failed: {e}"),
            }
        }
    }
    // Stay silent past the request timeout (800 ms), reading nothing: the
    // server gives up on the write and closes the connection. (Without a
    // write timeout it would wait forever; the idle timeout cannot fire
    // while a write is pending.)
    let open = || {
        runtime().block_on(async {
            let mut admin = rmem_proto::admin::v1::server_admin_client::ServerAdminClient::connect(
                format!("http://{}", server.grpc),
            )
            .await
            .unwrap();
            admin
                .stats(rmem_proto::admin::v1::StatsRequest {})
                .await
                .unwrap()
                .into_inner()
                .connections_open
        })
    };
    drop(filler);
    assert!(
        rmem_tests::wait_until(Duration::from_secs(10), || open() == 0),
        "the server still holds the connection of a client that reads nothing"
    );
    // The client finds the connection gone once it reads what was sent.
    raw.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match raw.stream.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read failed: {e}"),
        }
    }
    // Others are served.
    let mut other = BlockingConnection::connect(&server.client_config()).unwrap();
    let mut out = vec![[0u8; wire::PAGE_SIZE]; 1];
    other.get(&[1], &mut out).unwrap();
}

/// RDMA frames on a server that does not offer RDMA (this host has no RDMA
/// device; the soft-RoCE suite covers the working path): clear errors, no
/// page touched, and clients asking for RDMA fall back or fail cleanly.
#[test]
fn rdma_requests_without_rdma_get_clear_errors() {
    let server = ServerProcess::start(&["--capacity", "4MiB"]);
    let mut good = BlockingConnection::connect(&server.client_config()).unwrap();
    assert!(
        !good.offers_rdma(),
        "a server without --rdma offers TCP only"
    );
    good.put(&[(7, &pattern(7, 1))]).unwrap();

    // RDMA_CONNECT: refused with rdma_unavailable, connection closed.
    let mut raw = handshaken(&server);
    let mut buf = Vec::new();
    wire::encode_rdma_connect(&mut buf, 1, &wire::RdmaEndpoint::default());
    raw.stream.write_all(&buf).unwrap();
    raw.expect_error(ErrorCode::RdmaUnavailable);

    // PUT_STAGED and LOCATE before any queue pair: bad_frame.
    for frame in [
        {
            let mut b = Vec::new();
            wire::encode_put_staged(
                &mut b,
                2,
                &[wire::StagedPut {
                    handle: 7,
                    crc: 0,
                    index: 0,
                }],
            );
            b
        },
        {
            let mut b = Vec::new();
            wire::encode_handles(&mut b, Opcode::Locate, 3, &[7]);
            b
        },
    ] {
        let mut raw = handshaken(&server);
        raw.stream.write_all(&frame).unwrap();
        let msg = raw.expect_error(ErrorCode::BadFrame);
        assert!(msg.contains("RDMA_CONNECT"), "{msg}");
    }

    // `rdma` insists and fails without retrying; `auto` uses TCP.
    let mut cfg = server.client_config();
    cfg.transport = rmem_client::Transport::Rdma;
    match rmem_client::DataConnection::connect(&cfg) {
        Err(e @ ClientError::RdmaNotOffered { .. }) => assert!(!e.is_retryable()),
        other => panic!("expected RdmaNotOffered, got {other:?}"),
    }
    cfg.transport = rmem_client::Transport::Auto;
    let mut auto = rmem_client::DataConnection::connect(&cfg).unwrap();
    assert_eq!(auto.transport(), rmem_client::Transport::Tcp);
    use rmem_client::PageTransport as _;
    let mut out = [[0u8; wire::PAGE_SIZE]];
    assert_eq!(auto.get(&[7], &mut out).unwrap(), &[PageStatus::Ok]);
    assert_eq!(
        out[0],
        pattern(7, 1),
        "the page survived every refused frame"
    );
}
