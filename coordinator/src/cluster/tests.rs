//! The cluster model without the network: every rule the services rely on.

use std::time::Duration;

use rmem_common::ByteSize;
use rmem_proto::control::v1::{self as pb, watch_event::Event};

use super::*;
use crate::config::{CoordinatorConfig, TenantConfig};
use crate::state::{MemoryStore, log::FileLog};

fn cfg() -> CoordinatorConfig {
    CoordinatorConfig {
        ephemeral: true,
        ..Default::default()
    }
}

/// A configuration whose state is kept in a log file.
fn durable() -> CoordinatorConfig {
    CoordinatorConfig {
        ephemeral: false,
        ..cfg()
    }
}

/// The cluster of the state log at `path`.
fn open_log(config: &CoordinatorConfig, path: &std::path::Path) -> Cluster {
    Cluster::open(config, Box::new(FileLog::open(path).unwrap())).unwrap()
}

fn cluster() -> Cluster {
    Cluster::open(&cfg(), Box::new(MemoryStore::default())).unwrap()
}

fn server(name: &str, pages: u64) -> pb::RegisterRequest {
    pb::RegisterRequest {
        role: pb::Role::Server as i32,
        name: name.into(),
        data_addr: format!("{name}:7480"),
        capacity_pages: pages,
        ..Default::default()
    }
}

fn agent(name: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        role: pb::Role::Agent as i32,
        name: name.into(),
        ..Default::default()
    }
}

fn interval(
    space: &str,
    start: u64,
    pages: u64,
    owner: u64,
    subs: &[u64],
) -> pb::RegisterIntervalRequest {
    pb::RegisterIntervalRequest {
        address_space: space.into(),
        start: start * PAGE,
        length: pages * PAGE,
        tenant: "default".into(),
        handle_base: 1000,
        owner,
        subscribers: subs.to_vec(),
    }
}

fn invalidate(space: &str, start: u64, pages: u64) -> pb::InvalidateRequest {
    pb::InvalidateRequest {
        address_space: space.into(),
        start: start * PAGE,
        length: pages * PAGE,
        reason: pb::Reason::Unmap as i32,
        ..Default::default()
    }
}

fn events(c: &Cluster, member: u64) -> Vec<Event> {
    c.fanout
        .mailboxes
        .get(&member)
        .map(|mb| {
            mb.since(mb.oldest())
                .0
                .into_iter()
                .filter_map(|e| e.event)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn members_register_renew_and_expire() {
    let mut c = cluster();
    let s = c.register(&server("s1", 100)).unwrap();
    assert_eq!((s.id, s.incarnation), (1, 1));
    let again = c.register(&server("s1", 200)).unwrap();
    assert_eq!(
        (again.id, again.incarnation, again.capacity_pages),
        (1, 2, 200)
    );
    assert!(matches!(
        c.heartbeat(1, 1, 0, 0),
        Err(CoordError::StaleIncarnation { .. })
    ));
    assert!(!c.heartbeat(1, 2, 5, 0).unwrap().rec.draining);
    assert!(matches!(
        c.register(&agent("s1")),
        Err(CoordError::NameInUse(_))
    ));
    assert!(matches!(
        c.heartbeat(9, 1, 0, 0),
        Err(CoordError::UnknownMember(9))
    ));

    c.members.expire(Instant::now() + Duration::from_secs(3600));
    assert!(matches!(
        c.heartbeat(1, 2, 0, 0),
        Err(CoordError::LeaseExpired(1))
    ));
    let back = c.register(&server("s1", 200)).unwrap();
    assert_eq!(back.incarnation, 3);
    c.heartbeat(1, 3, 0, 0).unwrap();
}

#[test]
fn registration_arguments_are_checked() {
    let mut c = cluster();
    let bad = [
        pb::RegisterRequest {
            role: 0,
            ..server("x", 1)
        },
        pb::RegisterRequest {
            role: 9,
            ..server("x", 1)
        },
        server("", 1),
        server("x", 0),
        pb::RegisterRequest {
            data_addr: String::new(),
            ..server("x", 1)
        },
        pb::RegisterRequest {
            transports: vec!["carrier-pigeon".into()],
            ..server("x", 1)
        },
        pb::RegisterRequest {
            name: "a\nb".into(),
            ..agent("x")
        },
        server("x", u64::MAX),
        server("x", (1 << 40) + 1),
    ]
    .into_iter()
    .chain(
        [
            "x",
            "x:",
            "x:0",
            "x:65536",
            ":7480",
            "not an address:7480",
            "a..b:7480",
            "-x:7480",
            "[::1:7480",
            "1.2.3.4:http",
        ]
        .map(|a| pb::RegisterRequest {
            data_addr: a.into(),
            ..server("x", 1)
        }),
    )
    .chain(std::iter::once(pb::RegisterRequest {
        grpc_addr: "nowhere".into(),
        ..agent("x")
    }));
    for r in bad {
        let e = c.register(&r).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{r:?}: {e}");
    }
    for (i, a) in [
        "10.0.0.2:7480",
        "[::1]:7480",
        "server-1.rmem.svc:7480",
        "s_1:1",
    ]
    .into_iter()
    .enumerate()
    {
        let r = pb::RegisterRequest {
            data_addr: a.into(),
            ..server(&format!("ok{i}"), 1 << 40)
        };
        c.register(&r).unwrap_or_else(|e| panic!("{a}: {e}"));
    }
}

#[test]
fn intervals_of_one_space_never_overlap() {
    let mut c = cluster();
    let a = c.register(&agent("a")).unwrap().id;
    let (iv, seq) = c.register_interval(&interval("p1", 0, 16, a, &[])).unwrap();
    assert_eq!(seq, c.epoch() << 32);
    let e = c
        .register_interval(&interval("p1", 15, 4, a, &[]))
        .unwrap_err();
    assert!(
        matches!(e, CoordError::Overlap { existing, .. } if existing == iv),
        "{e}"
    );
    c.register_interval(&interval("p1", 16, 4, a, &[])).unwrap();
    // The same registration again (a retry whose answer was lost) is the
    // same interval; one that differs in anything overlaps.
    assert_eq!(
        c.register_interval(&interval("p1", 0, 16, a, &[])).unwrap(),
        (iv, seq)
    );
    let b = c.register(&agent("b")).unwrap().id;
    assert!(matches!(
        c.register_interval(&interval("p1", 0, 16, b, &[])),
        Err(CoordError::Overlap { .. })
    ));
    assert!(matches!(
        c.register_interval(&interval("p1", 0, 16, a, &[b])),
        Err(CoordError::Overlap { .. })
    ));
    c.register_interval(&interval("p2", 0, 16, a, &[])).unwrap();
    assert!(matches!(
        c.register_interval(&interval("p3", 0, 1, a, &[77])),
        Err(CoordError::UnknownMember(77))
    ));
    let mut r = interval("p3", 0, 1, a, &[]);
    r.length = 100;
    assert_eq!(
        c.register_interval(&r).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    r = interval("p3", 0, 1, a, &[]);
    r.handle_base = u64::MAX;
    assert_eq!(
        c.register_interval(&r).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    c.unregister_interval(iv).unwrap();
    assert!(matches!(
        c.unregister_interval(iv),
        Err(CoordError::UnknownInterval(_))
    ));
    c.register_interval(&interval("p1", 0, 16, a, &[])).unwrap();
}

#[test]
fn an_invalidation_reaches_every_subscriber_once_with_its_ranges() {
    let mut c = cluster();
    let a = c.register(&agent("a")).unwrap().id;
    let s = c.register(&server("s", 100)).unwrap().id;
    let m = c.register(&agent("mirror")).unwrap().id;
    let (i1, _) = c.register_interval(&interval("p", 0, 8, a, &[s])).unwrap();
    let (i2, _) = c
        .register_interval(&interval("p", 8, 8, a, &[s, m]))
        .unwrap();
    let mut req = invalidate("p", 4, 8);
    req.origin = a;
    let begun = c.begin_invalidation(&req).unwrap();
    assert_eq!(begun.intervals.len(), 2);
    assert!(events(&c, a).is_empty(), "the origin gets no event");
    let Event::Invalidation(ev) = &events(&c, s)[0] else {
        panic!()
    };
    assert_eq!(events(&c, s).len(), 1, "one event per member");
    let ranges: Vec<_> = ev
        .ranges
        .iter()
        .map(|r| {
            (
                r.interval_id,
                r.start / PAGE,
                r.length / PAGE,
                r.first_handle,
            )
        })
        .collect();
    assert_eq!(ranges, vec![(i1, 4, 4, 1004), (i2, 8, 4, 1000)]);
    let Event::Invalidation(ev) = &events(&c, m)[0] else {
        panic!()
    };
    assert_eq!(ev.ranges.len(), 1);

    c.ack(s, begun.id).unwrap();
    let mut done = begun.done;
    assert!(done.try_recv().is_err(), "the mirror has not answered");
    c.ack(m, begun.id).unwrap();
    assert!(done.try_recv().is_ok());
    let f = c.finish_invalidation(begun.id).unwrap();
    assert_eq!((f.acked, f.fenced), (vec![s, m], vec![]));
    assert!(events(&c, s).is_empty(), "acknowledged events are gone");
}

/// An interval is unregistered after a whole invalidation of it, which
/// the coordinator runs itself unless one already cleared it since the
/// last subscription.
#[test]
fn unregistering_an_interval_not_cleared_whole_invalidates_it_first() {
    let mut c = cluster();
    let a = c.register(&agent("a")).unwrap().id;
    let s = c.register(&server("s", 100)).unwrap().id;
    let (bare, _) = c.register_interval(&interval("q", 0, 8, a, &[])).unwrap();
    assert_eq!(c.final_invalidation(bare).unwrap(), None, "no subscriber");
    let mut r = interval("p", 0, 8, a, &[s]);
    r.handle_base = 2000;
    let (iv, _) = c.register_interval(&r).unwrap();
    let last = c.final_invalidation(iv).unwrap().expect("a subscriber");
    assert_eq!(
        (last.address_space.as_str(), last.start, last.length),
        ("p", 0, 8 * PAGE)
    );
    assert_eq!(last.origin, a);
    // A part invalidated is not the whole.
    let begun = c.begin_invalidation(&invalidate("p", 2, 4)).unwrap();
    c.ack(s, begun.id).unwrap();
    c.finish_invalidation(begun.id).unwrap();
    assert!(c.final_invalidation(iv).unwrap().is_some());
    // Whole (by a wider range, as an agent retiring a space sends): cleared,
    // fenced subscribers included.
    let begun = c.begin_invalidation(&invalidate("p", 0, 1 << 20)).unwrap();
    c.finish_invalidation(begun.id).unwrap();
    assert_eq!(c.final_invalidation(iv).unwrap(), None);
    // A server subscribing since may hold new pages.
    let t = c.register(&server("t", 100)).unwrap().id;
    c.subscribe(iv, t).unwrap();
    assert!(c.final_invalidation(iv).unwrap().is_some());
}

#[test]
fn one_invalidation_carries_many_ranges_and_moves_each_sequence_once() {
    let mut c = cluster();
    let a = c.register(&agent("a")).unwrap().id;
    let s = c.register(&server("s", 100)).unwrap().id;
    let (i1, seq1) = c.register_interval(&interval("p", 0, 8, a, &[s])).unwrap();
    let (i2, seq2) = c.register_interval(&interval("p", 8, 8, a, &[s])).unwrap();
    // Pages 1, 3..5 of i1 and 9 of i2, and a range nothing covers.
    let mut req = invalidate("p", 1, 1);
    req.origin = a;
    req.more = [(3, 2), (9, 1), (40, 1)]
        .iter()
        .map(|&(start, pages)| pb::Span {
            start: start * PAGE,
            length: pages * PAGE,
        })
        .collect();
    let begun = c.begin_invalidation(&req).unwrap();
    assert_eq!(begun.intervals, vec![(i1, seq1 + 1), (i2, seq2 + 1)]);
    let evs = events(&c, s);
    assert_eq!(evs.len(), 1, "one event for all the ranges");
    let Event::Invalidation(ev) = &evs[0] else {
        panic!()
    };
    let ranges: Vec<_> = ev
        .ranges
        .iter()
        .map(|r| {
            (
                r.interval_id,
                r.start / PAGE,
                r.length / PAGE,
                r.first_handle,
            )
        })
        .collect();
    assert_eq!(
        ranges,
        vec![(i1, 1, 1, 1001), (i1, 3, 2, 1003), (i2, 9, 1, 1001)]
    );
    c.ack(s, begun.id).unwrap();
    let mut done = begun.done;
    assert!(done.try_recv().is_ok());

    let mut bad = invalidate("p", 0, 1);
    bad.more = vec![pb::Span {
        start: 1,
        length: PAGE,
    }];
    assert!(matches!(
        c.begin_invalidation(&bad),
        Err(CoordError::Invalid { .. })
    ));
    bad.more = vec![pb::Span::default(); MAX_SPANS + 1];
    assert!(matches!(
        c.begin_invalidation(&bad),
        Err(CoordError::Invalid { .. })
    ));
}

#[test]
fn a_subscriber_that_does_not_answer_is_fenced() {
    let mut c = cluster();
    let a = c.register(&agent("a")).unwrap().id;
    let slow = c.register(&agent("slow")).unwrap();
    let (iv, _) = c
        .register_interval(&interval("p", 0, 8, a, &[slow.id]))
        .unwrap();
    let begun = c.begin_invalidation(&invalidate("p", 0, 1)).unwrap();
    c.ack(a, begun.id).unwrap();
    let f = c.finish_invalidation(begun.id).unwrap();
    assert_eq!((f.acked, f.fenced), (vec![a], vec![slow.id]));
    assert!(matches!(events(&c, slow.id)[..], [Event::Fenced(_)]));
    assert!(matches!(
        c.heartbeat(slow.id, slow.incarnation, 0, 0),
        Err(CoordError::Fenced(_))
    ));
    assert!(matches!(
        c.ack(slow.id, begun.id),
        Err(CoordError::Fenced(_))
    ));
    assert!(!c.intervals.get(iv).unwrap().subscribers.contains(&slow.id));
    // Registering again makes it a member with a clean slate.
    let back = c.register(&agent("slow")).unwrap();
    assert!(events(&c, back.id).is_empty());
    c.heartbeat(back.id, back.incarnation, 0, 0).unwrap();
    // A subscriber whose lease lapsed is fenced at once, not waited for.
    c.subscribe(iv, back.id).unwrap();
    c.members.expire(Instant::now() + Duration::from_secs(3600));
    let begun = c.begin_invalidation(&invalidate("p", 0, 1)).unwrap();
    let mut done = begun.done;
    assert!(done.try_recv().is_ok(), "nobody left to wait for");
    let f = c.finish_invalidation(begun.id).unwrap();
    assert_eq!(f.fenced, vec![a, back.id]);
}

#[test]
fn read_retry_sees_every_invalidation_that_began() {
    let mut c = cluster();
    let a = c.register(&agent("a")).unwrap().id;
    let (iv, seq) = c.register_interval(&interval("p", 0, 8, a, &[])).unwrap();
    assert_eq!(c.read_begin(iv).unwrap(), Some(seq));
    assert_eq!(c.read_retry(iv, seq).unwrap(), (false, seq));
    let mut req = invalidate("p", 0, 8);
    req.origin = a;
    let begun = c.begin_invalidation(&req).unwrap();
    assert_eq!(
        c.read_begin(iv).unwrap(),
        None,
        "in flight: read_begin waits"
    );
    assert!(c.read_retry(iv, seq).unwrap().0);
    c.finish_invalidation(begun.id).unwrap();
    let after = c.read_begin(iv).unwrap().unwrap();
    assert!(after > seq);
    assert!(c.read_retry(iv, seq).unwrap().0);
    assert!(!c.read_retry(iv, after).unwrap().0);
    // An invalidation elsewhere leaves the interval alone.
    let b = c.begin_invalidation(&invalidate("p", 8, 8)).unwrap();
    assert!(b.intervals.is_empty());
    c.finish_invalidation(b.id).unwrap();
    assert!(!c.read_retry(iv, after).unwrap().0);
    assert!(matches!(
        c.read_begin(99),
        Err(CoordError::UnknownInterval(99))
    ));
}

#[test]
fn placement_spreads_skips_draining_servers_and_honours_quotas() {
    let mut config = cfg();
    config.placement_chunk = ByteSize(16 * PAGE);
    config.tenants = vec![TenantConfig {
        name: "blue".into(),
        token: Some("secret".into()),
        token_file: None,
        quota: Some(ByteSize(100 * PAGE)),
    }];
    let mut c = Cluster::open(&config, Box::new(MemoryStore::default())).unwrap();
    let a = c.register(&agent("a")).unwrap().id;
    let s: Vec<u64> = (0..3)
        .map(|i| c.register(&server(&format!("s{i}"), 1000)).unwrap().id)
        .collect();
    let grants = c.allocate(a, "blue", 96).unwrap();
    assert_eq!(grants.iter().map(|g| g.pages).sum::<u64>(), 96);
    assert!(grants.len() >= 2, "spread over servers: {grants:?}");
    assert_eq!(c.grant_pb(&grants[0]).credential, "secret");
    assert!(matches!(
        c.allocate(a, "blue", 5),
        Err(CoordError::QuotaExceeded { .. })
    ));
    assert!(matches!(
        c.allocate(a, "red", 1),
        Err(CoordError::UnknownTenant(_))
    ));
    // Nor may an interval name a tenant the cluster does not have.
    let mut iv = interval("p", 0, 4, a, &[]);
    iv.tenant = "red".into();
    assert!(matches!(
        c.register_interval(&iv),
        Err(CoordError::UnknownTenant(_))
    ));
    assert_eq!(c.intervals.len(), 0);
    iv.tenant = "blue".into();
    c.register_interval(&iv).unwrap();
    assert!(matches!(
        c.allocate(s[0], "blue", 1),
        Err(CoordError::Invalid { .. })
    ));
    c.release(grants[0].id, 0).unwrap();
    assert!(matches!(
        c.release(grants[0].id, 0),
        Err(CoordError::UnknownGrant(_))
    ));

    // Drain a server the agent holds a grant on (by id), and another one
    // (by name): it hears of the first, and placements go to the third.
    let held = c.grants.iter().next().unwrap().server;
    c.set_draining(held, "", true).unwrap();
    assert!(events(&c, a).iter().any(|e| matches!(e, Event::Drain(_))));
    let other = *s.iter().find(|&&x| x != held).unwrap();
    let name = c.members.get(other).unwrap().rec.name.clone();
    c.set_draining(0, &name, true).unwrap();
    let open = *s.iter().find(|&&x| x != held && x != other).unwrap();
    for _ in 0..10 {
        for g in c.allocate(a, "blue", 1).unwrap() {
            assert_eq!(g.server, open, "placed on a draining server");
        }
    }
    assert!(matches!(
        c.set_draining(a, "", true),
        Err(CoordError::NotAServer(_))
    ));
    assert!(matches!(
        c.set_draining(0, "nope", true),
        Err(CoordError::UnknownServer(_))
    ));
}

#[test]
fn no_capacity_takes_nothing() {
    let mut c = cluster();
    let a = c.register(&agent("a")).unwrap().id;
    c.register(&server("s", 10)).unwrap();
    assert!(matches!(
        c.allocate(a, "default", 11),
        Err(CoordError::NoCapacity {
            requested: 11,
            free: 10
        })
    ));
    assert_eq!(c.allocate(a, "default", 10).unwrap().len(), 1);
    assert!(matches!(
        c.allocate(a, "default", 1),
        Err(CoordError::NoCapacity { .. })
    ));
}

#[test]
fn state_survives_a_restart_with_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.log");
    let mut config = durable();
    let open = |config: &CoordinatorConfig| open_log(config, &path);
    let (a, s, iv, seq, removed, epoch) = {
        let mut c = open(&config);
        let a = c.register(&agent("a")).unwrap().id;
        let s = c.register(&server("s", 100)).unwrap().id;
        let fenced = c.register(&agent("f")).unwrap().id;
        let (iv, seq0) = c
            .register_interval(&interval("p", 0, 8, a, &[s, fenced]))
            .unwrap();
        let (gone, _) = c.register_interval(&interval("p", 8, 8, a, &[])).unwrap();
        c.unregister_interval(gone).unwrap();
        c.allocate(a, "default", 40).unwrap();
        c.set_draining(s, "", true).unwrap();
        let b = c.begin_invalidation(&invalidate("p", 0, 1)).unwrap();
        c.ack(a, b.id).unwrap();
        c.ack(s, b.id).unwrap();
        c.finish_invalidation(b.id).unwrap();
        (a, s, iv, seq0, gone, c.epoch())
    };
    let identity = open(&config).cluster_id().to_string();
    assert_eq!(identity.len(), 32, "{identity}");
    let mut c = open(&config);
    assert_eq!(c.epoch(), epoch + 2);
    assert_eq!(c.cluster_id(), identity, "the identity survives restarts");
    // A state created afresh is another cluster.
    let other = Cluster::open(
        &config,
        Box::new(FileLog::open(&dir.path().join("other.log")).unwrap()),
    )
    .unwrap();
    assert_ne!(other.cluster_id(), identity);
    let restored = c.intervals.get(iv).unwrap();
    assert_eq!(
        restored.subscribers.iter().copied().collect::<Vec<_>>(),
        vec![a, s]
    );
    assert_ne!(
        restored.seq, seq,
        "a sequence never repeats across restarts"
    );
    assert!(c.read_retry(iv, seq).unwrap().0);
    assert_eq!(c.grants.tenant_pages("default"), 40);
    assert!(c.members.get(s).unwrap().rec.draining);
    assert_eq!(c.members.get(3).unwrap().liveness, Liveness::Fenced);
    // Members keep their incarnation, so their heartbeats carry on.
    c.heartbeat(a, 1, 0, 0).unwrap();
    let (next, _) = c.register_interval(&interval("q", 0, 1, a, &[])).unwrap();
    assert!(next > removed, "interval ids are never reused");

    // Compaction keeps the same state.
    config.compact_after = 16;
    for i in 0..40 {
        c.register(&agent(&format!("x{i}"))).unwrap();
    }
    drop(c);
    let c = open(&config);
    assert!(c.members.by_name("x39").is_some());
    assert_eq!(c.intervals.get(iv).unwrap().subscribers.len(), 2);
    assert_eq!(c.grants.tenant_pages("default"), 40);
    assert_eq!(c.members.get(3).unwrap().liveness, Liveness::Fenced);
    assert_eq!(c.cluster_id(), identity, "compaction keeps the identity");
}

#[test]
fn a_server_down_past_its_grace_is_declared_gone_and_agents_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.log");
    let mut config = durable();
    config.lease = Duration::from_millis(100);
    config.server_gone_after = Duration::from_millis(200);
    let open = |config: &CoordinatorConfig| open_log(config, &path);
    let mut c = open(&config);
    let a = c.register(&agent("a")).unwrap().id;
    let s: Vec<u64> = (0..3)
        .map(|k| c.register(&server(&format!("s{k}"), 1000)).unwrap().id)
        .collect();
    let granted = c.allocate_copies(a, "default", 100, 2, &[]).unwrap();
    assert_eq!(granted.grants.len(), 2);
    let lost = granted.grants[0].server;
    let idle = *s
        .iter()
        .find(|x| !granted.grants.iter().any(|g| g.server == **x))
        .unwrap();
    // Every member but `lost` keeps heartbeating; `lost` and `idle` lapse.
    let beat = |c: &mut Cluster, except: &[u64]| {
        for m in std::iter::once(a).chain(s.iter().copied()) {
            if !except.contains(&m) {
                let inc = c.members.get(m).unwrap().rec.incarnation;
                c.heartbeat(m, inc, 0, 7).unwrap();
            }
        }
    };
    std::thread::sleep(Duration::from_millis(150));
    beat(&mut c, &[lost, idle]);
    c.expire_leases();
    c.declare_lapsed_gone();
    assert!(
        !c.members.get(lost).unwrap().rec.gone,
        "a lapsed lease alone is not gone"
    );
    std::thread::sleep(Duration::from_millis(250));
    beat(&mut c, &[lost, idle]);
    c.expire_leases();
    c.declare_lapsed_gone();
    let m = c.members.get(lost).unwrap();
    assert!(m.rec.gone && m.rec.draining);
    assert!(
        !c.members.get(idle).unwrap().rec.gone,
        "a server holding no grant is not declared gone"
    );
    let drains: Vec<pb::DrainNotice> = events(&c, a)
        .into_iter()
        .filter_map(|e| match e {
            Event::Drain(d) => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(drains.len(), 1);
    assert_eq!((drains[0].server_id, drains[0].gone), (lost, true));
    assert_eq!(c.rebuild_progress(), (100, 100));
    // Nothing new goes there; the agent's pages at risk are counted.
    for _ in 0..5 {
        let more = c.allocate_copies(a, "default", 10, 2, &[]).unwrap();
        assert!(more.grants.iter().all(|g| g.server != lost));
    }
    assert_eq!(c.members.get(a).unwrap().at_risk_pages, 7);
    // The agent moved its copies and returned the grant.
    c.release(granted.grants[0].id, 0).unwrap();
    assert_eq!(c.rebuild_progress(), (0, 100));
    // Gone survives a restart, and a registration of the server (it came
    // back): it stays gone and draining until an operator undrains it.
    drop(c);
    let mut c = open(&config);
    assert!(c.members.get(lost).unwrap().rec.gone);
    let back = c.register(&server("s0", 1000)).unwrap();
    let back = if back.id == lost {
        back
    } else {
        let name = c.members.get(lost).unwrap().rec.name.clone();
        c.register(&server(&name, 1000)).unwrap()
    };
    assert!(back.gone && back.draining);
    c.set_draining(lost, "", false).unwrap();
    let m = c.members.get(lost).unwrap();
    assert!(!m.rec.gone && !m.rec.draining);
    // An operator may declare a server gone at once, by name.
    let name = c.members.get(idle).unwrap().rec.name.clone();
    assert_eq!(c.mark_gone(0, &name, "test").unwrap(), idle);
    assert!(c.members.get(idle).unwrap().rec.gone);
    assert!(matches!(
        c.mark_gone(a, "", "test"),
        Err(CoordError::NotAServer(_))
    ));
}

#[test]
fn copies_go_to_distinct_failure_domains() {
    let mut c = cluster();
    let a = c.register(&agent("a")).unwrap().id;
    let mut rack = BTreeMap::new();
    for (name, domain) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")] {
        let mut req = server(name, 10_000);
        req.domain = domain.into();
        let id = c.register(&req).unwrap().id;
        assert_eq!(c.members.get(id).unwrap().rec.domain, domain);
        rack.insert(id, domain);
    }
    for _ in 0..20 {
        let got = c.allocate_copies(a, "default", 10, 2, &[]).unwrap();
        assert!(!got.shared_domain);
        let racks: BTreeSet<&str> = got.grants.iter().map(|g| rack[&g.server]).collect();
        assert_eq!(racks.len(), 2, "both copies in one rack: {got:?}");
    }
    let got = c.allocate_copies(a, "default", 10, 3, &[]).unwrap();
    assert!(got.shared_domain, "three copies over two racks share one");
    let mut bad = server("c1", 10);
    bad.domain = "x\ny".into();
    assert!(matches!(c.register(&bad), Err(CoordError::Invalid { .. })));
}

#[test]
fn a_server_that_left_holding_grants_keeps_its_id_across_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.log");
    let config = durable();
    let open = |config: &CoordinatorConfig| open_log(config, &path);
    let (s, idle) = {
        let mut c = open(&config);
        let a = c.register(&agent("a")).unwrap().id;
        let s = c.register(&server("s", 100)).unwrap();
        c.allocate(a, "default", 10).unwrap();
        let idle = c.register(&server("idle", 100)).unwrap();
        c.mark_gone(s.id, "", "test").unwrap();
        c.deregister(s.id, s.incarnation).unwrap();
        c.deregister(idle.id, idle.incarnation).unwrap();
        c.compact().unwrap();
        (s, idle)
    };
    let mut c = open(&config);
    let back = c.register(&server("s", 100)).unwrap();
    assert_eq!(back.id, s.id, "a server named by grants keeps its id");
    assert!(back.gone, "and its standing");
    let other = c.register(&server("idle", 100)).unwrap();
    assert_ne!(other.id, idle.id, "one no grant names is forgotten");
}

#[test]
fn a_retried_allocation_is_granted_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.log");
    let config = CoordinatorConfig {
        placement_chunk: ByteSize(10 * PAGE),
        ..durable()
    };
    let (a, first) = {
        let mut c = open_log(&config, &path);
        let a = c.register(&agent("a")).unwrap().id;
        for i in 0..3 {
            c.register(&server(&format!("s{i}"), 100)).unwrap();
        }
        let first = c.allocate_once(7, a, "default", 40, 2, &[]).unwrap().grants;
        assert!(first.len() > 1, "{first:?}");
        // The same request again (its answer lost): the same grants.
        let again = c.allocate_once(7, a, "default", 40, 2, &[]).unwrap().grants;
        assert_eq!(again, first);
        assert_eq!(c.grants.tenant_pages("default"), 80);
        (a, first)
    };
    // The coordinator restarted before the agent heard: still the same.
    let mut c = open_log(&config, &path);
    let again = c.allocate_once(7, a, "default", 40, 2, &[]).unwrap().grants;
    assert_eq!(again, first);
    assert_eq!(c.grants.tenant_pages("default"), 80);
    // Another request is another allocation; unnamed ones are never merged.
    c.allocate_once(8, a, "default", 40, 2, &[]).unwrap();
    c.allocate_once(0, a, "default", 10, 1, &[]).unwrap();
    c.allocate_once(0, a, "default", 10, 1, &[]).unwrap();
    assert_eq!(c.grants.tenant_pages("default"), 180);
    // One granted only in part (a record of it lost) is granted afresh,
    // the part given back first.
    c.release(first[0].id, 0).unwrap();
    let fresh = c.allocate_once(7, a, "default", 40, 2, &[]).unwrap().grants;
    assert!(fresh.iter().all(|g| first.iter().all(|f| f.id != g.id)));
    assert_eq!(fresh.iter().map(|g| g.pages).sum::<u64>(), 80);
    assert_eq!(c.grants.tenant_pages("default"), 180);
    // Another agent's request of the same name is its own.
    let b = c.register(&agent("b")).unwrap().id;
    let theirs = c.allocate_once(7, b, "default", 10, 1, &[]).unwrap().grants;
    assert!(theirs.iter().all(|g| g.agent == b));
}
