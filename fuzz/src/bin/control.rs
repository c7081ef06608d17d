//! See [`rmem_fuzz::targets::control`].

fn main() {
    rmem_fuzz::run(rmem_fuzz::targets::control::target);
}
