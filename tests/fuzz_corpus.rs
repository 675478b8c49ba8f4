//! Replays the fuzzer's corpus (`fuzz/corpus/front`) through the same code the fuzz target
//! runs, so inputs that once crashed the front end stay fixed without cargo-fuzz.

use std::path::Path;

#[test]
fn front_end_survives_every_corpus_input() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/front");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/front exists") {
        let path = entry.expect("readable entry").path();
        let bytes = std::fs::read(&path).expect("readable corpus file");
        let Ok(src) = std::str::from_utf8(&bytes) else {
            continue;
        };
        let front = pdgc::compile_front(src);
        let text = pdgc::diag::render("corpus.pdg", src, &front.diagnostics);
        assert_eq!(front.diagnostics.is_empty(), text.is_empty(), "{}", path.display());
        if let Some(g) = &front.graph {
            assert!(!g.to_string().is_empty());
        }
        count += 1;
    }
    assert!(count >= 40, "expected the seeded corpus, found {count} inputs");
}
