//! Writes every target's seed inputs under DIR (default `fuzz/corpus`).

fn main() {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    for (target, inputs) in rmem_fuzz::seeds::all() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for (i, input) in inputs.iter().enumerate() {
            let f = d.join(format!("seed-{i}"));
            std::fs::write(&f, input).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        }
        println!("{target}: {} seeds in {}", inputs.len(), d.display());
    }
}
