//! The kernel-module suite, run inside a QEMU guest by `tests/vm/run.sh`.
//!
//! This process loads `rmem.ko`, starts an `rmem-server` on loopback and is
//! the agent (a [`KernelAgent`]). The programs whose memory moves are
//! unmodified children: this same binary in `--target` mode, which maps
//! anonymous memory, fills it with known patterns and answers commands on
//! stdin ("check 3", "write 4", "fork-check 4", ...). The cases follow the
//! applicable ones of the kernel's `tools/testing/selftests/mm/hmm-tests.c`.
//!
//! Prints one line per case and `N passed, M failed`; exits 1 on a failure.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use rmem_agent::kmod::{KernelAgent, KernelConfig};
use rmem_client::{BlockingConnection, ClientConfig};
use rmem_tests::suite::{Suite, ensure, percentiles};
use rmem_tests::{CoordinatorProcess, ServerProcess, pattern, wait_until};

const PAGE: usize = 4096;
/// The module's fault timeout for this suite: short, so the SIGBUS case is quick.
const FAULT_TIMEOUT_MS: u32 = 3000;
/// The agent's injected delay per batch of fetches in the slow-agent case:
/// half the fault timeout.
const SLOW_FETCH_MS: u64 = 1500;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--target") {
        target::run();
        return;
    }
    let module = args
        .iter()
        .position(|a| a == "--module")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "/rmem/rmem.ko".into());
    let exe = std::env::current_exe().expect("own path");
    // SAFETY: set before any thread exists.
    unsafe { std::env::set_var("RMEM_BIN_DIR", exe.parent().expect("bin dir")) };

    let mut suite = Suite::default();
    suite.case("module loads and /dev/rmem appears", || {
        run(&[
            "insmod",
            &module,
            "capacity_mib=256",
            &format!("fault_timeout_ms={FAULT_TIMEOUT_MS}"),
            "evict_timeout_ms=3000",
        ])?;
        ensure(std::path::Path::new("/dev/rmem").exists(), "no /dev/rmem")
    });
    if suite.failed > 0 {
        suite.finish();
    }
    let server = ServerProcess::start(&["--capacity", "128MiB", "--prefault"]);
    let mut env = Env {
        server,
        agent: None,
    };
    env.start_agent();

    suite.case("evicted pages leave the process and come back intact on read", || {
        // Warm up: the agent's staging buffer is touched on its first full batch.
        let mut warm = Target::spawn(512)?;
        let watt = env.agent().attach(warm.pid(), None).map_err(|e| e.to_string())?;
        env.agent().evict(watt, warm.addr, warm.len()).map_err(|e| e.to_string())?;
        warm.cmd("exit")?;
        env.detach(watt)?;
        let mut t = Target::spawn(8192)?;
        let att = env.agent().attach(t.pid(), None).map_err(|e| e.to_string())?;
        // The server's pool is prefaulted, so storing pages takes no memory:
        // what eviction frees shows in MemFree (device-private pages still
        // count in the process's RSS, so /proc/PID/status cannot tell).
        let free_before = mem_free_kib();
        let moved = env.agent().evict(att, t.addr, t.len()).map_err(|e| e.to_string())?;
        ensure(moved == 8192, format!("moved {moved} of 8192 pages"))?;
        // Freed pages reach MemFree through per-CPU lists and counters: poll.
        let mut free_after = 0;
        // At least half of it must show (the rest may sit in per-CPU lists).
        let freed = wait_until(Duration::from_secs(10), || {
            free_after = mem_free_kib();
            free_after - free_before >= 16 * 1024
        });
        ensure(
            freed,
            format!("MemFree {free_before} -> {free_after} KiB: 32 MiB evicted, local memory not freed"),
        )?;
        ensure(env.stored() == 8192, format!("server holds {} pages", env.stored()))?;
        ensure(env.in_use() == 8192, format!("{} device pages in use", env.in_use()))?;
        t.cmd("check 1")?;
        ensure(env.in_use() == 0, format!("{} device pages still in use", env.in_use()))?;
        // The freed device pages tell the agent, which frees the server copies.
        env.wait_stored(0)?;
        t.cmd("exit")?;
        env.detach(att)
    });

    suite.case(
        "writes after eviction fault the page back and stick",
        || {
            let mut t = Target::spawn(128)?;
            let att = env
                .agent()
                .attach(t.pid(), Some((t.addr, t.len())))
                .map_err(|e| e.to_string())?;
            env.agent()
                .evict(att, t.addr, t.len())
                .map_err(|e| e.to_string())?;
            t.cmd("write 2")?;
            t.cmd("check 2")?;
            env.agent()
                .evict(att, t.addr, t.len())
                .map_err(|e| e.to_string())?;
            t.cmd("check 2")?;
            t.cmd("exit")?;
            env.detach(att)
        },
    );

    suite.case(
        "a page written between copy and commit stays in RAM with the new contents",
        || {
            let mut t = Target::spawn(64)?;
            let att = env
                .agent()
                .attach(t.pid(), None)
                .map_err(|e| e.to_string())?;
            let dev = env.agent().device();
            let mut data = vec![0u8; 64 * PAGE];
            let mut addrs = vec![0u64; 64];
            let n = dev
                .evict_begin(att, t.addr, &mut data, &mut addrs)
                .map_err(|e| e.to_string())?;
            ensure(n == 64, format!("copied {n} of 64 pages"))?;
            // The program writes every page after the copy was taken...
            t.cmd("write 9")?;
            // ...so a commit of the old copies must move nothing.
            let handles: Vec<u64> = (0..64).map(|i| (0xfe << 40) | i).collect();
            let mut status = vec![9u8; 64];
            let moved = dev
                .evict_commit(att, t.addr, 64, &addrs, &handles, &data, &mut status)
                .map_err(|e| e.to_string())?;
            ensure(
                moved == 0 && status.iter().all(|&s| s == 0),
                format!("{moved} stale pages moved"),
            )?;
            t.cmd("check 9")?;
            ensure(
                env.in_use() == 0,
                format!("{} device pages in use", env.in_use()),
            )?;
            t.cmd("exit")?;
            env.detach(att)
        },
    );

    suite.case(
        "a partial munmap of an evicted range frees exactly those remote pages",
        || {
            let (mut t, att) = env.evicted(256)?;
            env.wait_stored(256)?;
            t.cmd("unmap 64 64")?;
            env.wait_stored(192)?;
            ensure(
                env.in_use() == 192,
                format!("{} device pages in use", env.in_use()),
            )?;
            t.cmd("check-except 1 64 64")?;
            t.cmd("exit")?;
            env.detach(att)?;
            env.wait_stored(0)
        },
    );

    suite.case("exit of an evicted process frees its remote pages", || {
        let (mut t, att) = env.evicted(256)?;
        t.cmd("exit")?;
        t.wait_exit()?;
        env.wait_stored(0)?;
        ensure(
            env.in_use() == 0,
            format!("{} device pages in use", env.in_use()),
        )?;
        env.detach(att)
    });

    suite.case(
        "fork and copy-on-write on evicted pages keep both copies right",
        || {
            let (mut t, att) = env.evicted(64)?;
            // The child reads version 1, writes 5 and checks it; then the parent
            // checks it still has 1.
            t.cmd("fork-check 1 5")?;
            t.cmd("check 1")?;
            t.cmd("exit")?;
            env.detach(att)?;
            env.wait_stored(0)
        },
    );

    suite.case(
        "many threads faulting the same evicted pages at once",
        || {
            let (mut t, att) = env.evicted(256)?;
            let before = env.info().faults;
            t.cmd("threads 4 1")?;
            let faults = env.info().faults - before;
            // Concurrent faults on one page wait for one fetch.
            ensure(faults == 256, format!("{faults} fetches for 256 pages"))?;
            t.cmd("exit")?;
            env.detach(att)
        },
    );

    suite.case(
        "faults complete under a storm of signals (a 200 us interval timer)",
        || {
            let (mut t, att) = env.evicted(128)?;
            t.cmd("check-under-signals 1")?;
            t.cmd("exit")?;
            env.detach(att)
        },
    );

    suite.case("mremap moves evicted pages with their contents", || {
        let (mut t, att) = env.evicted(128)?;
        t.cmd("mremap")?;
        t.cmd("check 1")?;
        t.cmd("exit")?;
        env.detach(att)
    });

    suite.case("detach brings every page back", || {
        let (mut t, att) = env.evicted(128)?;
        let before = env.info();
        let restored = env.agent().detach(att).map_err(|e| e.to_string())?;
        ensure(restored == 128, format!("restored {restored} of 128"))?;
        let after = env.info();
        ensure(
            after.pages_in_use == 0,
            format!("{} device pages in use", after.pages_in_use),
        )?;
        ensure(
            after.faults == before.faults,
            "detach went through CPU faults",
        )?;
        ensure(
            after.restored - before.restored == 128,
            "the module did not count 128 restored pages",
        )?;
        t.cmd("check 1")?;
        env.wait_stored(0)?;
        t.cmd("exit")
    });

    suite.case(
        "a restarted agent serves the faults that waited for it",
        || {
            let (mut t, att) = env.evicted(64)?;
            env.agent = None;
            t.send("check 1")?;
            std::thread::sleep(Duration::from_millis(500));
            env.start_agent();
            t.reply()?;
            t.cmd("exit")?;
            env.detach(att)
        },
    );

    suite.case(
        "a fault waiting for a slow agent does not hold up the program's mmap/munmap (mmap_lock dropped)",
        || {
            let (mut t, att) = env.evicted(16)?;
            env.agent = None;
            env.start_agent_with(Duration::from_millis(SLOW_FETCH_MS));
            let result = (|| {
                let before = env.info();
                // One thread reads evicted page 3 while another maps and
                // unmaps a page in a loop: "ok LOOPS LONGEST_US READ_US".
                t.send("mmap-during-read 3 1")?;
                let r = t.reply()?;
                let v: Vec<u64> = r
                    .strip_prefix("ok ")
                    .ok_or(format!("mmap-during-read: {r}"))?
                    .split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect();
                let [loops, longest_us, read_us] = v[..] else {
                    return Err(format!("mmap-during-read: {r}"));
                };
                let after = env.info();
                let delay_us = SLOW_FETCH_MS * 1000;
                println!(
                    "slow agent: the read took {} ms; meanwhile {loops} mmap+munmap, the longest {} us",
                    read_us / 1000,
                    longest_us
                );
                // Otherwise the fault did not wait for the agent at all.
                ensure(
                    read_us >= delay_us / 2,
                    format!("the read took only {read_us} us with a {delay_us} us agent"),
                )?;
                ensure(
                    longest_us < delay_us / 3 && loops >= 20,
                    format!(
                        "while the fault waited, {loops} mmap+munmap ran and one took {longest_us} us: the fault held the mmap_lock"
                    ),
                )?;
                ensure(
                    after.retried > before.retried,
                    "no fault dropped the mmap_lock (RMEM_IOC_INFO retried)",
                )?;
                // The first try's fetch serves its retry: one fetch for the page
                // (plus any neighbours, which the retry moves as prefetched).
                let (fetched, ahead) = (
                    after.faults - before.faults,
                    after.prefetched - before.prefetched,
                );
                ensure(
                    fetched.checked_sub(ahead) == Some(1),
                    format!("{fetched} fetches ({ahead} ahead of a fault) for one page"),
                )?;
                t.cmd("exit")
            })();
            env.agent = None;
            env.start_agent();
            // Detached whatever happened, so a failure does not spill over.
            let detached = env.detach(att);
            result.and(detached)
        },
    );

    suite.case(
        "with no agent a fault ends in SIGBUS after the timeout, not a hang",
        || {
            let (mut t, att) = env.evicted(16)?;
            env.agent = None;
            let start = Instant::now();
            t.send("check 1")?;
            let status = t.wait_exit()?;
            let took = start.elapsed();
            env.start_agent();
            use std::os::unix::process::ExitStatusExt;
            ensure(
                status.signal() == Some(libc::SIGBUS),
                format!("target ended with {status:?}"),
            )?;
            ensure(
                took >= Duration::from_millis(u64::from(FAULT_TIMEOUT_MS) / 2),
                format!("SIGBUS after only {took:?}"),
            )?;
            // Once a fetch timed out with no agent, later faults (the dying
            // process's core dump) fail at once instead of waiting again.
            ensure(
                took < Duration::from_millis(u64::from(FAULT_TIMEOUT_MS) * 3 / 2),
                format!("SIGBUS only after {took:?}: later faults waited again"),
            )?;
            env.wait_stored(0)?;
            env.detach(att)
        },
    );

    suite.case(
        "rmem-agent kernel evicts a running program's cold pages (DAMON), keeps its hot ones",
        || {
            env.without_agent(|env| {
                // The program's other anonymous memory (heap, stacks) is cold
                // too: the run waits on its 1024 test pages, not on the
                // server's count.
                let (mut t, lines) =
                    kernel_run(env, 1024, &["--min-age", "1s", "--interval", "500ms"], 800)?;
                let last = lines.last().ok_or("no final status")?;
                ensure(
                    last["restored_pages"].as_u64().unwrap_or(0) >= 700,
                    format!("final status {last}"),
                )?;
                t.cmd("check 1")?;
                env.wait_stored(0)?;
                t.cmd("exit")
            })
        },
    );

    suite.case(
        "a budget keeps a program's memory in RAM under it, coldest pages first (rmem-agent kernel --budget)",
        || {
            env.without_agent(|env| {
                // Nothing is cold for an hour: whatever leaves RAM leaves
                // it for the budget (3 MiB = 768 pages, heap and stacks
                // included).
                let args = ["--min-age", "1h", "--interval", "300ms", "--budget", "3MiB"];
                let (mut t, lines) = kernel_run(env, 2048, &args, 2048 - 768)?;
                let within = lines.iter().any(|v| {
                    v["budget_bytes"] == 3 << 20
                        && v["rounds"].as_u64().unwrap_or(0) > 0
                        && v["local_bytes"].as_u64().is_some_and(|b| b <= 3 << 20)
                });
                ensure(
                    within,
                    format!("no round reported local_bytes within the budget: {lines:?}"),
                )?;
                t.cmd("check 1")?;
                env.wait_stored(0)?;
                t.cmd("exit")
            })
        },
    );

    suite.case(
        "rmem-agent serve: rmemctl attaches, lists and detaches running programs",
        || {
            // `serve` opens /dev/rmem itself: one agent at a time.
            env.agent = None;
            let result = (|| {
                let _ = std::fs::write(rmem_agent::kmod::damon::DAMON_STAT_ENABLED, "N");
                let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                std::fs::create_dir_all("/run/rmem-test").map_err(|e| e.to_string())?;
                let sock = "/run/rmem-test/agent.sock";
                let mut a = Target::spawn_with(1024, &["nohuge"])?;
                let mut b = Target::spawn_with(1024, &["nohuge"])?;
                let mut c = Target::spawn_with(64, &["nohuge"])?;
                let log_path = "/tmp/rmem-agent-serve.log";
                let log = std::fs::File::create(log_path).map_err(|e| e.to_string())?;
                let mut daemon = Reaped(
                    Command::new(exe.with_file_name("rmem-agent"))
                        .args(["serve", "--server", &env.server.data.to_string()])
                        .args(["--socket", sock, "--min-age", "1s", "--interval", "500ms"])
                        .args(["--attach", &c.pid().to_string()])
                        .stderr(log)
                        .spawn()
                        .map_err(|e| e.to_string())?,
                );
                let agent_log = || std::fs::read_to_string(log_path).unwrap_or_default();
                let checks = (|| -> Result<(), String> {
                    let ctl = |args: &[&str]| -> Result<String, String> {
                        let out = Command::new(exe.with_file_name("rmemctl"))
                            .args(["--output", "json"])
                            .args(args)
                            .args(["--agent", sock])
                            .output()
                            .map_err(|e| e.to_string())?;
                        if out.status.success() {
                            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
                        } else {
                            Err(String::from_utf8_lossy(&out.stderr).into_owned())
                        }
                    };
                    let listed = |ctl: &dyn Fn(&[&str]) -> Result<String, String>| {
                        ctl(&["attachments"])
                            .ok()
                            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                            .map(|v| v["attachments"].as_array().cloned().unwrap_or_default())
                            .unwrap_or_default()
                    };
                    ensure(
                        wait_until(Duration::from_secs(10), || listed(&ctl).len() == 1),
                        format!(
                            "the agent did not list the process given with --attach: {:?}",
                            ctl(&["attachments"])
                        ),
                    )?;
                    for t in [&a, &b] {
                        ctl(&["attach", "--pid", &t.pid().to_string()])?;
                    }
                    let again = ctl(&["attach", "--pid", &a.pid().to_string()]);
                    ensure(
                        again
                            .as_ref()
                            .is_err_and(|e| e.contains("already attached")),
                        format!("attaching twice: {again:?}"),
                    )?;
                    let missing = ctl(&["attach", "--pid", "999999"]);
                    ensure(
                        missing
                            .as_ref()
                            .is_err_and(|e| e.contains("no process 999999")),
                        format!("attaching a missing process: {missing:?}"),
                    )?;
                    // An attached process that exits is dropped by the next round.
                    c.cmd("exit")?;
                    ensure(
                        wait_until(Duration::from_secs(10), || listed(&ctl).len() == 2),
                        format!("after an exit the agent lists {:?}", listed(&ctl)),
                    )?;
                    let mut remote = (0, 0);
                    let cold = wait_until(Duration::from_secs(60), || {
                        remote = (
                            a.query("remote 0 1024").unwrap_or(0),
                            b.query("remote 0 1024").unwrap_or(0),
                        );
                        remote.0 >= 800 && remote.1 >= 800
                    });
                    ensure(
                        cold,
                        format!("{remote:?} of 1024 pages remote, expected 800 each"),
                    )?;
                    let list = listed(&ctl);
                    ensure(
                        list.len() == 2
                            && list
                                .iter()
                                .all(|x| x["evicted_pages"].as_u64().unwrap_or(0) >= 800),
                        format!("rmemctl attachments: {list:?}"),
                    )?;
                    let detached: serde_json::Value =
                        serde_json::from_str(&ctl(&["detach", "--pid", &a.pid().to_string()])?)
                            .map_err(|e| e.to_string())?;
                    ensure(
                        detached["restored_pages"].as_u64().unwrap_or(0) >= 800,
                        format!("rmemctl detach: {detached}"),
                    )?;
                    ensure(
                        a.query("remote 0 1024")? == 0,
                        "detached pages still remote",
                    )?;
                    a.cmd("check 1")?;
                    ensure(
                        b.query("remote 0 1024")? >= 800,
                        "the other process's pages came back",
                    )?;
                    // SIGTERM: every remaining process is detached, every page back.
                    // SAFETY: signalling our own child.
                    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
                    let status = daemon.0.wait().map_err(|e| e.to_string())?;
                    ensure(
                        status.success(),
                        format!("rmem-agent serve exited with {status}"),
                    )?;
                    ensure(
                        b.query("remote 0 1024")? == 0,
                        "pages still remote after the agent stopped",
                    )?;
                    b.cmd("check 1")?;
                    ensure(
                        !std::path::Path::new(sock).exists(),
                        "the admin socket was left behind",
                    )?;
                    env.wait_stored(0)?;
                    a.cmd("exit")?;
                    b.cmd("exit")
                })();
                checks.map_err(|e| format!("{e}\nrmem-agent serve said:\n{}", agent_log()))
            })();
            env.start_agent();
            result
        },
    );

    suite.case(
        "a sequential scan of evicted pages brings their neighbours back with each fault (prefetch)",
        || {
            let timed = |t: &mut Target, cmd: &str| -> Result<f64, String> {
                t.send(cmd)?;
                let r = t.reply()?;
                r.strip_prefix("ok ")
                    .and_then(|v| v.split_whitespace().nth(2))
                    .and_then(|v| v.parse().ok())
                    .ok_or(format!("{cmd}: {r}"))
            };
            // In order: after two faults the windows grow to the module's
            // 16 pages, so most pages arrive ahead of their fault.
            let (mut t, att) = env.evicted(1024)?;
            let before = env.info();
            let seq_mean = timed(&mut t, "timed-read 1")?;
            let after = env.info();
            let (faults, seq_ahead) = (after.faults - before.faults, after.prefetched - before.prefetched);
            ensure(
                faults == 1024 && seq_ahead >= 800,
                format!("{faults} pages faulted back, {seq_ahead} of them ahead of a fault; expected 1024 and at least 800"),
            )?;
            ensure(env.in_use() == 0, format!("{} device pages still in use", env.in_use()))?;
            t.cmd("exit")?;
            env.detach(att)?;
            // Scattered: no neighbour is fetched for nothing.
            let (mut t, att) = env.evicted(512)?;
            let before = env.info();
            let scattered_mean = timed(&mut t, "timed-read-scattered 1")?;
            let after = env.info();
            let ahead = after.prefetched - before.prefetched;
            ensure(ahead <= 8, format!("{ahead} pages prefetched on scattered reads"))?;
            t.cmd("exit")?;
            env.detach(att)?;
            println!(
                "prefetch: first reads in order {seq_mean:.0} us a page on average ({seq_ahead} of 1024 pages ahead of their fault), scattered {scattered_mean:.0} us, {:.1}x faster in order (TCG: ratios only)",
                scattered_mean / seq_mean.max(0.001)
            );
            Ok(())
        },
    );

    suite.case("fault-back latency: the module against userfaultfd, same guest (report)", || {
        // Through the module: every first touch of an evicted page faults
        // (scattered, so no prefetch hides a fault).
        let (mut t, att) = env.evicted(512)?;
        t.send("timed-read-scattered 1")?;
        let r = t.reply()?;
        let module: Vec<f64> = r
            .strip_prefix("ok ")
            .ok_or(format!("timed-read: {r}"))?
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        t.cmd("exit")?;
        env.detach(att)?;
        // Through userfaultfd: a region 16x its budget, read back at random.
        let user = uffd_fault_latency(&env)?;
        println!(
            "latency: module fault p50 {:.0} us p99 {:.0} us; userfaultfd fault p50 {:.0} us p99 {:.0} us; module/userfaultfd p50 {:.2}x p99 {:.2}x (TCG: ratios only)",
            module[0],
            module[1],
            user.0,
            user.1,
            module[0] / user.0,
            module[1] / user.1
        );
        Ok(())
    });

    suite.case(
        "in a cluster: pages spread over the granted servers, move off a drained one, are freed through invalidations, and a restarted agent takes over",
        || env.without_agent(cluster_case),
    );

    suite.case(
        "rmmod fails while the agent is open, then leaves nothing behind",
        || {
            let info = env.info();
            ensure(
                info.pages_in_use == 0,
                format!("{} device pages in use", info.pages_in_use),
            )?;
            ensure(
                info.attachments == 0,
                format!("{} attachments left", info.attachments),
            )?;
            // An open /dev/rmem pins the module.
            ensure(
                run(&["rmmod", "rmem"]).is_err(),
                "rmmod succeeded while the agent had /dev/rmem open",
            )?;
            env.agent = None;
            run(&["rmmod", "rmem"])?;
            ensure(
                !std::path::Path::new("/dev/rmem").exists(),
                "/dev/rmem still there",
            )?;
            let log = std::process::Command::new("dmesg")
                .output()
                .map_err(|e| e.to_string())?;
            let log = String::from_utf8_lossy(&log.stdout);
            ensure(
                !log.contains("WARNING:") && !log.contains("BUG:"),
                format!("kernel warnings:\n{log}"),
            )
        },
    );
    drop(env);
    suite.finish();
}

/// The kernel agent on a cluster: a coordinator and two servers in this
/// guest, the agent a member (`vm/kmod`) placing its pages through grants.
fn cluster_case(_env: &Env) -> Result<(), String> {
    use rmem_agent::cluster::{Cluster, ClusterConfig};
    use std::sync::atomic::Ordering;
    let coord = CoordinatorProcess::start(&["--placement-chunk", "1MiB", "--lease", "2s"]);
    let endpoint = coord.addr.to_string();
    let servers: Vec<ServerProcess> = ["mem-a", "mem-b"]
        .iter()
        .map(|name| ServerProcess::join(&endpoint, name, "64MiB"))
        .collect();
    let used = |s: &ServerProcess| -> u64 {
        BlockingConnection::connect(&ClientConfig::new(s.data.to_string()))
            .and_then(|mut c| c.stat())
            .map_or(u64::MAX, |st| st.used_pages)
    };
    let all_used = || servers.iter().map(used).collect::<Vec<u64>>();
    // Both servers are members before the agent asks for capacity.
    let members = || {
        Command::new(rmem_tests::bin("rmemctl"))
            .args(["--endpoint", &endpoint, "--output", "json", "servers"])
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0)
    };
    ensure(
        wait_until(Duration::from_secs(10), || members() == 2),
        format!("{} of 2 servers joined the coordinator", members()),
    )?;
    let start = || -> Result<KernelAgent, String> {
        let mut cc = ClusterConfig::new(endpoint.clone());
        cc.name = Some("vm/kmod".into());
        let cluster = Cluster::connect(&cc).map_err(|e| e.to_string())?;
        let mut cfg = KernelConfig::in_cluster(cluster);
        cfg.request_timeout = Duration::from_secs(2);
        KernelAgent::start(cfg).map_err(|e| e.to_string())
    };
    let emptied = |what: &str| -> Result<(), String> {
        ensure(
            wait_until(Duration::from_secs(10), || all_used() == [0, 0]),
            format!("{what}: servers still hold {:?} pages", all_used()),
        )
    };

    let agent = start()?;
    let mut t = Target::spawn(1024)?;
    let att = agent.attach(t.pid(), None).map_err(|e| e.to_string())?;
    let moved = agent
        .evict(att, t.addr, t.len())
        .map_err(|e| e.to_string())?;
    ensure(moved == 1024, format!("evicted {moved} of 1024 pages"))?;
    let spread = all_used();
    println!("cluster: 1024 evicted pages on the two servers: {spread:?}");
    ensure(
        spread.iter().sum::<u64>() == 1024 && spread.iter().all(|&n| n > 0),
        format!("pages not spread over both servers: {spread:?}"),
    )?;
    // Draining server A moves its pages to B while they stay remote.
    let out = std::process::Command::new(rmem_tests::bin("rmemctl"))
        .args(["--endpoint", &endpoint, "drain", "mem-a"])
        .output()
        .map_err(|e| e.to_string())?;
    ensure(
        out.status.success(),
        format!("rmemctl drain: {}", String::from_utf8_lossy(&out.stderr)),
    )?;
    ensure(
        wait_until(Duration::from_secs(20), || all_used() == [0, 1024]),
        format!(
            "after draining mem-a the servers hold {:?} pages",
            all_used()
        ),
    )?;
    ensure(
        agent
            .device()
            .info()
            .map_err(|e| e.to_string())?
            .pages_in_use
            == 1024,
        "pages came back during the drain",
    )?;
    // Reading brings every page back; the old copies die with their
    // device pages and are invalidated through the coordinator.
    t.cmd("check 1")?;
    emptied("after every page came back")?;
    // The agent counts a batch once its invalidation returned, a moment
    // after the servers freed it.
    let invalidated = || agent.stats().invalidated.load(Ordering::Relaxed);
    ensure(
        wait_until(Duration::from_secs(10), || invalidated() == 1024),
        format!("{} of 1024 frees went through invalidations", invalidated()),
    )?;
    // Exit frees what is remote.
    let moved = agent
        .evict(att, t.addr, t.len())
        .map_err(|e| e.to_string())?;
    ensure(
        moved == 1024,
        format!("evicted {moved} of 1024 pages again"),
    )?;
    t.cmd("exit")?;
    t.wait_exit()?;
    emptied("after the process exited")?;
    agent.detach(att).map_err(|e| e.to_string())?;

    // An agent that stops while the module holds pages keeps its handle
    // space; the next run (same member name) serves those pages.
    let mut t = Target::spawn(256)?;
    let att = agent.attach(t.pid(), None).map_err(|e| e.to_string())?;
    let moved = agent
        .evict(att, t.addr, t.len())
        .map_err(|e| e.to_string())?;
    ensure(moved == 256, format!("evicted {moved} of 256 pages"))?;
    drop(agent);
    let agent = start()?;
    t.cmd("check 1")?;
    emptied("after the restarted agent brought the pages back")?;
    t.cmd("exit")?;
    t.wait_exit()?;
    agent.detach(att).map_err(|e| e.to_string())?;
    drop(agent);
    // With nothing left in the module the agent retired its spaces and
    // returned its grants on the way out.
    let out = std::process::Command::new(rmem_tests::bin("rmemctl"))
        .args(["--endpoint", &endpoint, "--output", "json", "intervals"])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure(
        out.status.success() && !text.contains("vm/kmod"),
        format!("intervals left after the agent stopped: {text}"),
    )?;

    // The same through the command line: `rmem-agent kernel --coordinator`.
    let _ = std::fs::write(rmem_agent::kmod::damon::DAMON_STAT_ENABLED, "N");
    let t = Target::spawn_with(512, &["nohuge"])?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let daemon = Command::new(exe.with_file_name("rmem-agent"))
        .args(["kernel", "--coordinator", &endpoint])
        .args(["--name", "vm/kmod-cli"])
        .args(["--pid", &t.pid().to_string(), "--json"])
        .args(["--min-age", "1s", "--interval", "300ms"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stored = wait_until(Duration::from_secs(60), || {
        all_used().iter().sum::<u64>() >= 256
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let out = daemon.wait_with_output().map_err(|e| e.to_string())?;
    ensure(
        stored,
        format!(
            "rmem-agent kernel --coordinator: the servers hold {:?} pages; it said:\n{}",
            all_used(),
            String::from_utf8_lossy(&out.stdout)
        ),
    )?;
    ensure(
        out.status.success(),
        format!("rmem-agent kernel --coordinator exited with {}", out.status),
    )?;
    // SIGTERM brought every page back: nothing is left on the servers.
    emptied("after rmem-agent kernel --coordinator stopped")
}

// ---- the harness ---------------------------------------------------------------

/// Fault-back latency of the userspace path on the same server: first
/// touches of evicted pages of a `RemoteRegion`.
fn uffd_fault_latency(env: &Env) -> Result<(f64, f64), String> {
    use rmem_agent::{RegionConfig, RemoteRegion};
    let pages = 1024;
    let mut region = RemoteRegion::new(
        RegionConfig {
            size: (pages * PAGE) as u64,
            budget: (64 * PAGE) as u64,
            prefetch_max: 0,
            ..RegionConfig::default()
        },
        env.server.client_config(),
    )
    .map_err(|e| e.to_string())?;
    for (i, page) in region.as_mut_slice().chunks_exact_mut(PAGE).enumerate() {
        page.copy_from_slice(&pattern(i as u64, 1));
    }
    let mut samples = Vec::new();
    let mut i = 0usize;
    for _ in 0..pages {
        i = (i + 389) % pages; // a stride prime to the size: no stream to prefetch
        if region.is_resident(i) {
            continue;
        }
        let start = Instant::now();
        // SAFETY: i < pages; a volatile read so the touch is not optimised away.
        let first = unsafe { std::ptr::read_volatile(region.as_ptr().wrapping_add(i * PAGE)) };
        samples.push(start.elapsed().as_secs_f64() * 1e6);
        ensure(
            first == pattern(i as u64, 1)[0],
            format!("region page {i} came back wrong"),
        )?;
    }
    ensure(
        samples.len() >= 100,
        format!("only {} faults measured", samples.len()),
    )?;
    Ok(percentiles(samples))
}

fn mem_free_kib() -> i64 {
    // Compaction drains the per-CPU free lists, which MemFree does not count.
    let _ = std::fs::write("/proc/sys/vm/compact_memory", "1");
    // The counters are folded from per-CPU deltas once a second; fold now.
    let _ = std::fs::write("/proc/sys/vm/stat_refresh", "1");
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemFree:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(-1)
}

fn run(cmd: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| format!("{}: {e}", cmd[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A child process killed (if still running) and reaped on drop, so a
/// failed case does not leave a daemon holding /dev/rmem.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Runs `rmem-agent kernel --json` with `args` on a new target of `pages`
/// pages whose first 64 are hot, until `want` of them are remote (a minute
/// at most), then stops it with SIGTERM. Checks that enough went, that
/// the hot pages stayed, and that the agent exited cleanly; returns the
/// target and the agent's JSON lines.
fn kernel_run(
    env: &Env,
    pages: usize,
    args: &[&str],
    want: u64,
) -> Result<(Target, Vec<serde_json::Value>), String> {
    // Debian's kernel runs DAMON_STAT, which holds DAMON exclusively.
    let _ = std::fs::write(rmem_agent::kmod::damon::DAMON_STAT_ENABLED, "N");
    // DAMON sees a huge page as one: keep the hot 64 pages from making a
    // whole 2 MiB hot.
    let mut t = Target::spawn_with(pages, &["nohuge"])?;
    t.cmd("hot 64")?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let daemon = Command::new(exe.with_file_name("rmem-agent"))
        .args(["kernel", "--server", &env.server.data.to_string()])
        .args(["--pid", &t.pid().to_string(), "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut remote = 0;
    let evicted = wait_until(Duration::from_secs(60), || {
        remote = t.query(&format!("remote 0 {pages}")).unwrap_or(0);
        remote >= want
    });
    // A hot page misjudged comes back at its next touch: take the best of
    // a few looks, not one instant.
    let mut remote_hot = u64::MAX;
    for _ in 0..5 {
        remote_hot = remote_hot.min(t.query("remote 0 64")?);
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let out = daemon.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure(
        evicted,
        format!(
            "{remote} of {pages} pages remote, expected at least {want}; agent said:\n{stdout}"
        ),
    )?;
    ensure(
        out.status.success(),
        format!("rmem-agent kernel exited with {}", out.status),
    )?;
    ensure(
        remote_hot <= 16,
        format!("{remote_hot} of the 64 hot pages were evicted"),
    )?;
    let lines = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Ok((t, lines))
}

struct Env {
    server: ServerProcess,
    agent: Option<KernelAgent>,
}

impl Env {
    /// Runs `f` with this process's kernel agent stopped (`f` runs its
    /// own), starting it again afterwards.
    fn without_agent(&mut self, f: impl FnOnce(&Self) -> Result<(), String>) -> Result<(), String> {
        self.agent = None;
        let result = f(self);
        self.start_agent();
        result
    }

    fn start_agent(&mut self) {
        self.start_agent_with(Duration::ZERO);
    }

    /// An agent that waits `fetch_delay` before each batch of fetches (a
    /// slow network, injected).
    fn start_agent_with(&mut self, fetch_delay: Duration) {
        let mut cfg = KernelConfig::new(self.server.client_config());
        cfg.request_timeout = Duration::from_secs(2);
        cfg.fetch_delay = fetch_delay;
        self.agent = Some(KernelAgent::start(cfg).expect("start the kernel agent"));
    }

    /// A new target with `pages` pages, attached and all of them evicted.
    fn evicted(&self, pages: usize) -> Result<(Target, u64), String> {
        let t = Target::spawn(pages)?;
        let att = self
            .agent()
            .attach(t.pid(), None)
            .map_err(|e| e.to_string())?;
        let moved = self
            .agent()
            .evict(att, t.addr, t.len())
            .map_err(|e| e.to_string())?;
        ensure(moved == pages, format!("evicted {moved} of {pages} pages"))?;
        Ok((t, att))
    }

    fn agent(&self) -> &KernelAgent {
        self.agent.as_ref().expect("agent running")
    }

    fn info(&self) -> rmem_agent::kmod::uapi::Info {
        self.agent().device().info().expect("RMEM_IOC_INFO")
    }

    fn in_use(&self) -> u64 {
        self.info().pages_in_use
    }

    fn stored(&self) -> u64 {
        let mut c = BlockingConnection::connect(&ClientConfig::new(self.server.data.to_string()))
            .expect("connect to the server");
        c.stat().expect("STAT").used_pages
    }

    fn wait_stored(&self, want: u64) -> Result<(), String> {
        if wait_until(Duration::from_secs(10), || self.stored() == want) {
            Ok(())
        } else {
            Err(format!(
                "server holds {} pages, expected {want}",
                self.stored()
            ))
        }
    }

    fn detach(&self, att: u64) -> Result<(), String> {
        self.agent()
            .detach(att)
            .map(|_| ())
            .map_err(|e| format!("detach: {e}"))
    }
}

/// A child in `--target` mode.
struct Target {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    addr: u64,
    pages: usize,
}

impl Target {
    fn spawn(pages: usize) -> Result<Self, String> {
        Self::spawn_with(pages, &[])
    }

    /// With `["nohuge"]` the mapping gets MADV_NOHUGEPAGE.
    fn spawn_with(pages: usize, opts: &[&str]) -> Result<Self, String> {
        let mut child = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .args(["--target", &pages.to_string()])
            .args(opts)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut t = Self {
            child,
            stdin,
            stdout,
            addr: 0,
            pages,
        };
        let first = t.reply()?;
        t.addr = u64::from_str_radix(first.trim_start_matches("ready 0x"), 16)
            .map_err(|_| format!("target said {first:?}"))?;
        Ok(t)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn len(&self) -> u64 {
        (self.pages * PAGE) as u64
    }

    fn send(&mut self, cmd: &str) -> Result<(), String> {
        writeln!(self.stdin, "{cmd}")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("{cmd}: {e}"))
    }

    fn reply(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => Err("the target died".into()),
            Ok(_) => Ok(line.trim().to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A command that answers "ok N".
    fn query(&mut self, cmd: &str) -> Result<u64, String> {
        self.send(cmd)?;
        let r = self.reply()?;
        r.strip_prefix("ok ")
            .and_then(|v| v.parse().ok())
            .ok_or(format!("{cmd}: {r}"))
    }

    fn cmd(&mut self, cmd: &str) -> Result<(), String> {
        self.send(cmd)?;
        let r = self.reply()?;
        ensure(r == "ok", format!("{cmd}: {r}"))
    }

    fn wait_exit(&mut self) -> Result<std::process::ExitStatus, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err("the target did not exit".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The unmodified program: anonymous memory, patterns, commands on stdin.
mod target {
    use super::{PAGE, pattern};
    use std::io::{BufRead, Write};

    struct Mem {
        addr: *mut u8,
        pages: usize,
        /// Pages unmapped by "unmap": not checked any more.
        gone: Vec<bool>,
    }

    impl Mem {
        fn page(&self, i: usize) -> &[u8] {
            // SAFETY: i < pages, the mapping is ours and stays mapped unless
            // marked gone (callers skip those).
            unsafe { std::slice::from_raw_parts(self.addr.wrapping_add(i * PAGE), PAGE) }
        }

        fn set_page(&self, i: usize, contents: &[u8; PAGE]) {
            // SAFETY: as in `page`; nothing else holds a reference into it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    contents.as_ptr(),
                    self.addr.wrapping_add(i * PAGE),
                    PAGE,
                )
            };
        }

        fn write(&self, version: u64) {
            for i in (0..self.pages).filter(|&i| !self.gone[i]) {
                self.set_page(i, &pattern(i as u64, version));
            }
        }

        fn check(&self, version: u64, range: std::ops::Range<usize>) -> Result<(), String> {
            for i in range.filter(|&i| !self.gone[i]) {
                if self.page(i) != pattern(i as u64, version) {
                    return Err(format!("page {i} does not hold version {version}"));
                }
            }
            Ok(())
        }
    }

    pub fn run() {
        let pages: usize = std::env::args()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or(64);
        // SAFETY: a fresh private anonymous mapping.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap");
        if std::env::args().nth(3).as_deref() == Some("nohuge") {
            // SAFETY: advice on our own fresh mapping.
            unsafe { libc::madvise(addr, pages * PAGE, libc::MADV_NOHUGEPAGE) };
        }
        let mut mem = Mem {
            addr: addr.cast(),
            pages,
            gone: vec![false; pages],
        };
        mem.write(1);
        let mut out = std::io::stdout();
        writeln!(out, "ready {:#x}", mem.addr as u64).unwrap();
        out.flush().unwrap();
        for line in std::io::stdin().lock().lines() {
            let line = line.unwrap();
            let w: Vec<&str> = line.split_whitespace().collect();
            let n = |i: usize| -> u64 { w.get(i).and_then(|s| s.parse().ok()).unwrap_or(0) };
            let result = match w.first().copied() {
                Some("check") => mem.check(n(1), 0..pages),
                Some("check-except") => {
                    let (from, count) = (n(2) as usize, n(3) as usize);
                    mem.check(n(1), 0..from)
                        .and_then(|()| mem.check(n(1), from + count..pages))
                }
                Some("write") => {
                    mem.write(n(1));
                    Ok(())
                }
                Some("unmap") => {
                    let (from, count) = (n(1) as usize, n(2) as usize);
                    // SAFETY: a sub-range of our mapping.
                    let rc = unsafe {
                        libc::munmap(mem.addr.wrapping_add(from * PAGE).cast(), count * PAGE)
                    };
                    mem.gone[from..from + count]
                        .iter_mut()
                        .for_each(|g| *g = true);
                    if rc == 0 {
                        Ok(())
                    } else {
                        Err("munmap failed".into())
                    }
                }
                Some("fork-check") => fork_check(&mem, n(1), n(2)),
                Some("check-under-signals") => check_under_signals(&mem, n(1)),
                Some("hot") => {
                    // A thread that keeps reading the first N pages.
                    let (addr, count) = (mem.addr as usize, n(1) as usize);
                    std::thread::spawn(move || {
                        loop {
                            for i in 0..count {
                                // SAFETY: inside the mapping, which lives until exit.
                                let _ = unsafe {
                                    std::ptr::read_volatile((addr + i * PAGE) as *const u8)
                                };
                            }
                            std::thread::sleep(std::time::Duration::from_millis(2));
                        }
                    });
                    Ok(())
                }
                Some("remote") => match remote_pages(&mem, n(1) as usize, n(2) as usize) {
                    Ok(count) => {
                        writeln!(out, "ok {count}").unwrap();
                        out.flush().unwrap();
                        continue;
                    }
                    Err(e) => Err(e),
                },
                Some(c @ ("timed-read" | "timed-read-scattered")) => {
                    match timed_read(&mem, n(1), c == "timed-read") {
                        Ok((p50, p99, mean)) => {
                            writeln!(out, "ok {p50:.1} {p99:.1} {mean:.1}").unwrap();
                            out.flush().unwrap();
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
                Some("threads") => threads(&mem, n(1) as usize, n(2)),
                Some("mmap-during-read") => match mmap_during_read(&mem, n(1) as usize, n(2)) {
                    Ok((loops, longest, read)) => {
                        writeln!(out, "ok {loops} {longest} {read}").unwrap();
                        out.flush().unwrap();
                        continue;
                    }
                    Err(e) => Err(e),
                },
                Some("mremap") => {
                    // Move the mapping: reserve a new place, then MREMAP_FIXED onto it.
                    // SAFETY: a fresh reservation.
                    let to = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            pages * PAGE,
                            libc::PROT_NONE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        )
                    };
                    // SAFETY: moves our own mapping onto our own reservation.
                    let moved = unsafe {
                        libc::mremap(
                            mem.addr.cast(),
                            pages * PAGE,
                            pages * PAGE,
                            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                            to,
                        )
                    };
                    if moved == libc::MAP_FAILED {
                        Err("mremap failed".into())
                    } else {
                        mem.addr = moved.cast();
                        Ok(())
                    }
                }
                Some("exit") => {
                    writeln!(out, "ok").unwrap();
                    out.flush().unwrap();
                    std::process::exit(0);
                }
                _ => Err(format!("unknown command {line:?}")),
            };
            match result {
                Ok(()) => writeln!(out, "ok").unwrap(),
                Err(e) => writeln!(out, "error: {e}").unwrap(),
            }
            out.flush().unwrap();
        }
    }

    /// Times the first touch of every page (each one faults when evicted),
    /// then checks the contents; p50 and p99 in µs.
    /// Times the first read of every page, in order or scattered (each
    /// page 239 pages after the previous one, modulo the size: no two
    /// reads in a row touch neighbours, so the module sees no sequential
    /// scan), then checks every page.
    fn timed_read(mem: &Mem, version: u64, in_order: bool) -> Result<(f64, f64, f64), String> {
        let mut samples = Vec::with_capacity(mem.pages);
        for k in 0..mem.pages {
            let i = if in_order { k } else { k * 239 % mem.pages };
            let p = mem.addr.wrapping_add(i * PAGE);
            let start = std::time::Instant::now();
            // SAFETY: inside our mapping; volatile so the touch happens here.
            let _ = unsafe { std::ptr::read_volatile(p) };
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
        mem.check(version, 0..mem.pages)?;
        let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
        let (p50, p99) = rmem_tests::suite::percentiles(samples);
        Ok((p50, p99, mean))
    }

    /// How many of `count` pages from `from` are not in RAM: pagemap shows
    /// device-private entries as swap entries (bit 62). Reading it does not
    /// fault anything in.
    fn remote_pages(mem: &Mem, from: usize, count: usize) -> Result<u64, String> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open("/proc/self/pagemap").map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; count * 8];
        let first = (mem.addr as u64 / PAGE as u64 + from as u64) * 8;
        f.read_exact_at(&mut buf, first)
            .map_err(|e| e.to_string())?;
        Ok(buf
            .chunks_exact(8)
            .filter(|e| u64::from_le_bytes((*e).try_into().expect("8 bytes")) & (1 << 62) != 0)
            .count() as u64)
    }

    extern "C" fn on_alarm(_: libc::c_int) {}

    /// Checks every page while SIGALRM arrives every 200 µs: a fault must
    /// not be cut short (and retried forever) by signals that do not kill.
    fn check_under_signals(mem: &Mem, version: u64) -> Result<(), String> {
        let timer = |usec: libc::suseconds_t| {
            let t = libc::itimerval {
                it_interval: libc::timeval {
                    tv_sec: 0,
                    tv_usec: usec,
                },
                it_value: libc::timeval {
                    tv_sec: 0,
                    tv_usec: usec,
                },
            };
            // SAFETY: a valid itimerval; the old value is not wanted.
            unsafe { libc::setitimer(libc::ITIMER_REAL, &t, std::ptr::null_mut()) };
        };
        // SAFETY: sigaction is plain data; all zeroes is a valid value.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_alarm as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: installs a handler that does nothing.
        unsafe { libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut()) };
        timer(200);
        let result = mem.check(version, 0..mem.pages);
        timer(0);
        result
    }

    fn fork_check(mem: &Mem, old: u64, new: u64) -> Result<(), String> {
        // SAFETY: the child only touches its copy of the mapping and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let ok = mem.check(old, 0..mem.pages).is_ok() && {
                mem.write(new);
                mem.check(new, 0..mem.pages).is_ok()
            };
            // SAFETY: leaving the forked child without running destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            Ok(())
        } else {
            Err(format!("the forked child failed (status {status:#x})"))
        }
    }

    /// Reads page `i` (evicted: the read faults) while another thread maps
    /// and unmaps one anonymous page in a loop, which takes the mmap_lock
    /// for writing each time. Returns the loops completed during the read,
    /// the longest single mmap+munmap (µs, over the whole run) and how long
    /// the read took (µs); checks the page's contents.
    fn mmap_during_read(mem: &Mem, i: usize, version: u64) -> Result<(u64, u64, u64), String> {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::time::{Duration, Instant};
        if i >= mem.pages {
            return Err(format!("no page {i}"));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let loops = Arc::new(AtomicU64::new(0));
        let mapper = {
            let (stop, loops) = (stop.clone(), loops.clone());
            std::thread::spawn(move || {
                let mut longest = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    // SAFETY: a fresh private anonymous page, unmapped at once.
                    let p = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            PAGE,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        )
                    };
                    if p == libc::MAP_FAILED {
                        return Err("mmap failed".to_string());
                    }
                    // SAFETY: the page just mapped.
                    unsafe { libc::munmap(p, PAGE) };
                    longest = longest.max(start.elapsed());
                    loops.fetch_add(1, Ordering::Relaxed);
                }
                Ok(longest)
            })
        };
        // Let the loop get going before the fault starts.
        std::thread::sleep(Duration::from_millis(50));
        let before = loops.load(Ordering::Relaxed);
        let start = Instant::now();
        // SAFETY: inside our mapping; volatile so the touch happens here.
        let _ = unsafe { std::ptr::read_volatile(mem.addr.wrapping_add(i * PAGE)) };
        let read = start.elapsed();
        let during = loops.load(Ordering::Relaxed) - before;
        stop.store(true, Ordering::Relaxed);
        let longest = mapper
            .join()
            .map_err(|_| "the mapping thread panicked".to_string())??;
        mem.check(version, i..i + 1)?;
        Ok((during, longest.as_micros() as u64, read.as_micros() as u64))
    }

    fn threads(mem: &Mem, n: usize, version: u64) -> Result<(), String> {
        let pages = mem.pages;
        let addr = mem.addr as usize;
        let gone = mem.gone.clone();
        let handles: Vec<_> = (0..n.max(1))
            .map(|t| {
                let gone = gone.clone();
                std::thread::spawn(move || {
                    let m = Mem {
                        addr: addr as *mut u8,
                        pages,
                        gone,
                    };
                    // Every thread reads every page, each from a different start.
                    let start = t * pages / n.max(1);
                    let order: Vec<usize> = (start..pages).chain(0..start).collect();
                    for i in order {
                        m.check(version, i..i + 1)?;
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "a thread panicked".to_string())??;
        }
        Ok(())
    }
}
