//! Generated-kernel snapshots: for every sample, the lowered program (buffers, entry
//! points, kernel IR), the Cranelift IR of every kernel and the CUDA C module. A change to
//! lowering or to a backend shows up here as a diff of the generated code.
//!
//! Re-bless with `INSTA_UPDATE=always cargo test --test kernels`.

use pdgc::{CompileOptions, Module};

fn module(path: &std::path::Path) -> Module {
    let src = std::fs::read_to_string(path).expect("readable sample");
    Module::from_source(&path.display().to_string(), &src, &CompileOptions::new(8)).expect("sample compiles")
}

#[test]
fn every_sample_lowers_and_its_kernels_are_snapshotted() {
    insta::glob!("../samples", "*.pdg", |path| {
        let m = module(path);
        insta::assert_snapshot!("program", m.program.to_string());
    });
}

#[test]
fn every_sample_kernel_has_its_clif_snapshotted() {
    // Without FMA the text is the same on every x86-64 host.
    let options = pdgc_codegen::cpu::CpuOptions { vectorize: true, fma: false };
    let backend = pdgc_codegen::cpu::CpuBackend::with_options(options).expect("host ISA");
    insta::glob!("../samples", "*.pdg", |path| {
        let m = module(path);
        let mut text = String::new();
        for k in &m.program.kernels {
            text.push_str(&backend.clif_text(k).expect("translates"));
            text.push('\n');
        }
        insta::assert_snapshot!("clif", text);
    });
}

#[test]
fn every_sample_kernel_compiles_on_the_cpu() {
    insta::glob!("../samples", "*.pdg", |path| {
        let m = module(path);
        let mut backend = pdgc_codegen::cpu::CpuBackend::new().expect("host ISA");
        let compiled = backend.compile(&m.program.kernels).expect("every kernel JIT-compiles");
        assert_eq!(compiled.len(), m.program.kernels.len());
    });
}

#[test]
fn every_sample_has_its_cuda_c_snapshotted() {
    insta::glob!("../samples", "*.pdg", |path| {
        let m = module(path);
        // As a session at the compiled batch renders it (32-bit indices where they fit).
        let cuda = pdgc_codegen::cuda::render_module_for(&m.program.kernels, Some(m.options.batch as u64))
            .expect("every kernel renders");
        assert_eq!(cuda.kernels.len(), m.program.kernels.len());
        insta::assert_snapshot!("cuda", cuda.source);
    });
}
