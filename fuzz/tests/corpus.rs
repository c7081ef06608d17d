//! Every input kept in `fuzz/corpus/` (the seeds, and what campaigns found
//! worth keeping, crashes fixed included) runs through its target without a
//! panic: a regression test for the fuzzers' findings, on every build.

#[test]
fn the_corpus_runs_clean() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, target) in rmem_fuzz::TARGETS {
        let dir = root.join(name);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            target(&std::fs::read(&path).unwrap());
            n += 1;
        }
        assert!(n > 0, "no corpus for {name} in {}", dir.display());
    }
}

#[test]
fn the_seeds_are_in_the_corpus() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, seeds) in rmem_fuzz::seeds::all() {
        for (i, seed) in seeds.iter().enumerate() {
            let f = root.join(name).join(format!("seed-{i}"));
            assert_eq!(
                std::fs::read(&f).ok().as_ref(),
                Some(seed),
                "{} is not the seed the encoders make now: run `cargo run -p rmem-fuzz --bin rmem-fuzz-seeds`",
                f.display()
            );
        }
    }
}
