//! Turning SIGINT and SIGTERM into a future, so daemons can drain and exit 0.

use tokio::signal::unix::{SignalKind, signal};

/// Which signal asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Interrupt,
    Terminate,
}

impl std::fmt::Display for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Interrupt => "SIGINT",
            Self::Terminate => "SIGTERM",
        })
    }
}

/// Installs the SIGINT and SIGTERM handlers now and returns a future that
/// resolves on the first of them. Install before announcing readiness, so
/// a stop request that follows it at once is not lost to the default
/// action (which would kill the process without draining).
///
/// # Panics
/// If the signal handlers cannot be installed (only possible outside a
/// tokio runtime with signal support, which is a programming error).
pub fn stop_signal() -> impl std::future::Future<Output = StopSignal> {
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => StopSignal::Terminate,
            _ = int.recv() => StopSignal::Interrupt,
        }
    }
}
