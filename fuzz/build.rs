//! `rmem_afl` is set by `fuzz/run.sh` (RUSTFLAGS) for AFL++'s builds.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(rmem_afl)");
}
