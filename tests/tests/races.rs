//! Race windows of the agent's remote layer held open on purpose with its
//! failpoints (the `failpoints` feature; this binary is built only with
//! it). Each test names the window and fails without its fix. The
//! failpoints are global to the process: the tests here take turns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmem_agent::cluster::{Cluster, ClusterConfig};
use rmem_agent::{RegionConfig, RemoteRegion};
use rmem_client::PAGE_SIZE;
use rmem_tests::{CoordinatorProcess, ServerProcess, settled, used, wait_until};

fn word(p: usize) -> u64 {
    (p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

/// A one-shot rendezvous for a failpoint's callback: the first time it
/// runs, it tells the test (`reached`) and waits for its go-ahead.
struct Hold {
    armed: AtomicBool,
    reached: Mutex<Sender<()>>,
    go: Mutex<Receiver<()>>,
}

impl Hold {
    /// The failpoint `name` held once; the test's ends: reached, go.
    fn at(name: &str) -> (Receiver<()>, Sender<()>) {
        let (reached_tx, reached_rx) = channel();
        let (go_tx, go_rx) = channel();
        let hold = Arc::new(Hold {
            armed: AtomicBool::new(true),
            reached: Mutex::new(reached_tx),
            go: Mutex::new(go_rx),
        });
        fail::cfg_callback(name, move || {
            if hold.armed.swap(false, Ordering::AcqRel) {
                let _ = hold.reached.lock().unwrap().send(());
                let _ = hold
                    .go
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(30));
            }
        })
        .unwrap();
        (reached_rx, go_tx)
    }
}

/// A page freed just before a drain starts moving its run, its free not
/// yet at the old server: the move still finds the page there and copies
/// it to the new server after the free went by. The move must free that
/// copy (the agent names frees on their way, `Book::freeing`); before the
/// fix it stayed on the new server for good.
#[test]
fn a_page_freed_as_its_run_starts_to_move_is_not_left_on_the_new_server() {
    let coord = CoordinatorProcess::start(&["--placement-chunk", "1MiB", "--lease", "5s"]);
    let endpoint = coord.addr.to_string();
    let servers: Vec<ServerProcess> = (0..3)
        .map(|i| ServerProcess::join(&endpoint, &format!("mem-{i}"), "64MiB"))
        .collect();
    let agent = Cluster::connect(&ClusterConfig::new(endpoint.clone())).unwrap();
    let pages = 256;
    let r = RemoteRegion::in_cluster(
        RegionConfig {
            size: (pages * PAGE_SIZE) as u64,
            budget: (32 * PAGE_SIZE) as u64,
            fault_timeout: Duration::from_secs(20),
            redundancy: Some(rmem_common::Redundancy::Replicas(2)),
            ..RegionConfig::default()
        },
        &agent,
    )
    .unwrap();
    let at = |p: usize| r.as_ptr().wrapping_add(p * PAGE_SIZE) as *mut u64;
    for p in 0..pages {
        // SAFETY: page p is inside the live region; this thread alone
        // touches it.
        unsafe { at(p).write_volatile(word(p)) };
    }
    // Pages 0 and 1, written first, go out in the first batch: one run,
    // two copies. Everything else goes.
    assert!(
        wait_until(Duration::from_secs(20), || !r.is_resident(0)
            && !r.is_resident(1)),
        "pages 0 and 1 were not evicted"
    );
    r.discard(2 * PAGE_SIZE, (pages - 2) * PAGE_SIZE).unwrap();
    let held = settled(&servers);
    assert!(
        held.iter().filter(|&&n| n == 2).count() == 2 && held.iter().sum::<u64>() == 4,
        "pages 0 and 1 should be one run on two servers: {held:?}"
    );
    let victim = held.iter().position(|&n| n == 2).unwrap();

    // Page 0 is freed: off the book, its free held before it leaves. The
    // drain of a server holding its run starts meanwhile and reads the run
    // there (page 0 still in it), then waits until the free went through.
    let (forgotten, free_go) = Hold::at("release-forgotten");
    let (read, move_go) = Hold::at("drain-read");
    let discard = std::thread::scope(|s| {
        let freeing = s.spawn(|| r.discard(0, PAGE_SIZE));
        forgotten
            .recv_timeout(Duration::from_secs(20))
            .expect("the free did not start");
        rmem_tests::rmemctl_ok(&["--endpoint", &endpoint, "drain", &format!("mem-{victim}")]);
        read.recv_timeout(Duration::from_secs(30))
            .expect("the drain did not read the run");
        free_go.send(()).unwrap();
        let discard = freeing.join().unwrap();
        move_go.send(()).unwrap();
        discard
    });
    assert_eq!(discard.unwrap(), 1);
    assert!(
        wait_until(Duration::from_secs(30), || used(&servers)[victim] == 0),
        "the drained server still holds {:?}",
        used(&servers)
    );
    fail::remove("release-forgotten");
    fail::remove("drain-read");
    // Page 1 alone, on two servers; page 0 reads as zeroes.
    let after = settled(&servers);
    assert_eq!(
        after.iter().sum::<u64>(),
        2,
        "page 0's copy was left on the new server: {after:?}"
    );
    // SAFETY: as above.
    let read = |p: usize| unsafe { at(p).read_volatile() };
    assert_eq!(read(1), word(1));
    assert_eq!(read(0), 0);
    drop(r);
    assert!(
        wait_until(Duration::from_secs(10), || used(&servers) == [0, 0, 0]),
        "copies left behind: {:?}",
        used(&servers)
    );
}
