//! Fuzzes the front end: any text must parse and check without panicking, and every
//! diagnostic must render (spans inside the source, on char boundaries).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(src) = std::str::from_utf8(data) {
        let front = pdgc::compile_front(src);
        let _ = pdgc::diag::render("fuzz.pdg", src, &front.diagnostics);
        if let Some(graph) = &front.graph {
            let _ = graph.to_string();
            let _ = pdgc::report::check_report(graph).to_string();
        }
    }
});
