//! See [`rmem_fuzz::targets::wire`].

fn main() {
    rmem_fuzz::run(rmem_fuzz::targets::wire::target);
}
