//! rmem's fuzz targets, one binary each (`src/bin/`), driven by AFL++.
//!
//! - `wire`: every frame of a byte stream decoded as a request and as a
//!   response (the codec both sides use).
//! - `session`: a memory server's session state machine fed a client's byte
//!   stream (HELLO, then any request), against a small in-memory store.
//! - `replies`: the client's checks of a server's replies (HELLO_OK, GET_OK
//!   checksums, statuses).
//! - `control`: the coordinator's model fed a sequence of protobuf requests
//!   (register, heartbeat, allocate, release, intervals, invalidations,
//!   acknowledgements), as its gRPC services decode and apply them.
//!
//! Built normally, a target runs each file named on its command line (or
//! its standard input) once: that replays a corpus or a crash, and is what
//! the tests do with `fuzz/corpus/`. Built by `fuzz/run.sh` with AFL++'s
//! instrumentation (`--cfg rmem_afl`), it runs in AFL's persistent mode.
//! A panic is a finding: under AFL it aborts the process.

use std::io::Read;

pub mod seeds;
/// The targets, one module each; each binary runs one.
pub mod targets {
    pub mod control;
    pub mod replies;
    pub mod session;
    pub mod wire;
}

/// A target: runs one input.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus test and the seeds.
pub const TARGETS: [(&str, Target); 4] = [
    ("wire", targets::wire::target),
    ("session", targets::session::target),
    ("replies", targets::replies::target),
    ("control", targets::control::target),
];

/// Runs `target` over the inputs: AFL's, or the files named on the
/// command line, or standard input.
pub fn run(mut target: impl FnMut(&[u8])) {
    #[cfg(rmem_afl)]
    afl::run(&mut target);
    #[cfg(not(rmem_afl))]
    {
        let files: Vec<String> = std::env::args().skip(1).collect();
        if files.is_empty() {
            let mut data = Vec::new();
            std::io::stdin()
                .read_to_end(&mut data)
                .expect("standard input is readable");
            target(&data);
        }
        for f in files {
            let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{f}: {e}"));
            target(&data);
        }
    }
}

/// AFL++'s persistent mode over its runtime (`afl-compiler-rt.o`, linked by
/// `fuzz/run.sh`): the fork server starts once, then each test case is read
/// from standard input in a loop in the same process.
#[cfg(rmem_afl)]
mod afl {
    use super::Read;

    unsafe extern "C" {
        fn __afl_persistent_loop(max: u32) -> i32;
        fn __afl_manual_init();
    }

    /// afl-fuzz looks for these in the binary to use persistent mode and a
    /// deferred fork server.
    static PERSISTENT: &[u8] = b"##SIG_AFL_PERSISTENT##\0";
    static DEFERRED: &[u8] = b"##SIG_AFL_DEFER_FORKSRV##\0";

    pub fn run(target: &mut dyn FnMut(&[u8])) {
        // Keep the signatures in the binary.
        unsafe {
            std::ptr::read_volatile(&PERSISTENT);
            std::ptr::read_volatile(&DEFERRED);
        }
        // A panic is a crash for AFL.
        std::panic::set_hook(Box::new(|info| {
            eprintln!("{info}");
            std::process::abort();
        }));
        unsafe { __afl_manual_init() };
        let mut data = Vec::new();
        while unsafe { __afl_persistent_loop(10_000) } != 0 {
            data.clear();
            if std::io::stdin().read_to_end(&mut data).is_ok() {
                target(&data);
            }
        }
    }
}
