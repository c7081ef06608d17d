//! The case runner of the in-guest suites (`tests/vm/run.sh`): each case
//! prints one line, the suite ends with `N passed, M failed`.

use std::time::Instant;

/// Cases run one after another; a panic fails its case, not the suite.
#[derive(Debug, Default)]
pub struct Suite {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    /// Runs only the cases whose name holds one of these words, separated
    /// by commas (a debugging aid).
    pub only: Option<String>,
}

impl Suite {
    /// Runs one case and prints `ok` or `FAILED` with its time.
    pub fn case(&mut self, name: &str, f: impl FnOnce() -> Result<(), String>) {
        if self
            .only
            .as_ref()
            .is_some_and(|only| !only.split(',').any(|w| name.contains(w)))
        {
            self.skipped += 1;
            return;
        }
        let start = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .unwrap_or_else(|p| Err(format!("panicked: {p:?}")));
        match result {
            Ok(()) => {
                self.passed += 1;
                println!("ok     {name} ({:.1?})", start.elapsed());
            }
            Err(e) => {
                self.failed += 1;
                println!("FAILED {name} ({:.1?}): {e}", start.elapsed());
            }
        }
    }

    /// Prints the summary and exits (1 on any failure).
    pub fn finish(&self) -> ! {
        if self.skipped > 0 {
            println!(
                "{} passed, {} failed, {} skipped",
                self.passed, self.failed, self.skipped
            );
        } else {
            println!("{} passed, {} failed", self.passed, self.failed);
        }
        std::process::exit(i32::from(self.failed > 0));
    }
}

/// `Err(msg)` unless `cond`.
pub fn ensure(cond: bool, msg: impl Into<String>) -> Result<(), String> {
    if cond { Ok(()) } else { Err(msg.into()) }
}

/// p50 and p99 of `samples`.
pub fn percentiles(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99))
}
