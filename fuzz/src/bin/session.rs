//! See [`rmem_fuzz::targets::session`].

fn main() {
    rmem_fuzz::run(rmem_fuzz::targets::session::target);
}
