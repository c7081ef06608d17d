//! See [`rmem_fuzz::targets::replies`].

fn main() {
    rmem_fuzz::run(rmem_fuzz::targets::replies::target);
}
