//! The CUDA backend without a GPU: every kernel of every sample, at several batch sizes
//! (the plan, so the kernels, depend on the batch), compiles with NVRTC to a cubin for
//! sm_80 and sm_90, and `ptxas` accepts the PTX; a broken module yields NVRTC's log and the
//! source.
//!
//! These need libnvrtc (and ptxas for the PTX check). CI installs both from PyPI and sets
//! `PDGC_REQUIRE_NVRTC=1`, which turns a missing library into a failure; without it (a
//! fresh machine) the tests say they skipped and pass.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use pdgc::{CompileOptions, Module};
use pdgc_codegen::cuda::nvrtc::{self, Arch, Opt};
use pdgc_codegen::cuda::{render_module, render_module_for, CudaError};

fn required() -> bool {
    std::env::var("PDGC_REQUIRE_NVRTC").is_ok_and(|v| v == "1")
}

/// Whether NVRTC is here; panics if it is required and missing.
fn nvrtc_here(test: &str) -> bool {
    match nvrtc::available() {
        Ok(_) => true,
        Err(e) if required() => panic!("PDGC_REQUIRE_NVRTC=1 but {e}"),
        Err(e) => {
            eprintln!("{test}: SKIPPED: {e}");
            false
        }
    }
}

/// ptxas: `$PDGC_PTXAS`, else the one on PATH.
fn ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PDGC_PTXAS") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("ptxas")).find(|p| p.is_file())
}

fn samples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/samples"))
        .expect("samples/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "pdg"))
        .collect();
    v.sort();
    v
}

/// The distinct CUDA modules of every sample at batches 1, 32 and 256 as sessions render
/// them (32-bit indices where they fit that batch), and at 256 with 64-bit indices
/// throughout.
fn sample_modules() -> Vec<(String, String, usize)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for path in samples() {
        let src = std::fs::read_to_string(&path).expect("readable");
        for batch in [1, 32, 256] {
            let m = Module::from_source(&path.display().to_string(), &src, &CompileOptions::new(batch))
                .expect("sample compiles");
            let forms: &[Option<u64>] = if batch == 256 { &[Some(256), None] } else { &[Some(batch as u64)] };
            for &max_batch in forms {
                let cuda = render_module_for(&m.program.kernels, max_batch).expect("renders");
                assert_eq!(cuda.kernels.len(), m.program.kernels.len());
                if seen.insert(cuda.source.clone()) {
                    let bits = if max_batch.is_some() { "" } else { ", 64-bit indices" };
                    out.push((format!("{} (batch {batch}{bits})", m.name), cuda.source, m.program.kernels.len()));
                }
            }
        }
    }
    out
}

/// Runs `job` on every item, on all cores.
fn parallel<T: Sync>(items: &[T], job: impl Fn(&T) + Sync) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match items.get(i) {
                    Some(item) => job(item),
                    None => break,
                }
            });
        }
    });
}

#[test]
fn every_sample_compiles_to_cubin_for_sm80_and_sm90() {
    if !nvrtc_here("every_sample_compiles_to_cubin_for_sm80_and_sm90") {
        return;
    }
    let modules = sample_modules();
    let jobs: Vec<(&(String, String, usize), Arch)> =
        modules.iter().flat_map(|m| [(m, Arch(80)), (m, Arch(90))]).collect();
    // Fast-compile mode: every check NVRTC and ptxas make still runs, ~10x sooner.
    parallel(&jobs, |((what, source, _), arch)| {
        let cubin = nvrtc::compile_cubin(source, "pdgc_module.cu", *arch, Opt::FastCompile)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{what}: the {arch} cubin is not an ELF image");
    });
    let kernels: usize = modules.iter().map(|m| m.2).sum();
    eprintln!("{} distinct modules, {kernels} kernels, compiled for sm_80 and sm_90", modules.len());
}

#[test]
fn every_sample_compiles_with_full_optimization_for_sm80_and_sm90() {
    if !nvrtc_here("every_sample_compiles_with_full_optimization_for_sm80_and_sm90") {
        return;
    }
    // What a session on an A100/H100/H200 compiles, at the batch gpu-check times.
    let jobs: Vec<(PathBuf, Arch)> =
        samples().into_iter().flat_map(|p| [(p.clone(), Arch(80)), (p, Arch(90))]).collect();
    let started = std::time::Instant::now();
    parallel(&jobs, |(path, arch)| {
        let src = std::fs::read_to_string(path).expect("sample");
        let name = path.display().to_string();
        let m = Module::from_source(&name, &src, &CompileOptions::new(256)).expect("compiles");
        let cuda = render_module_for(&m.program.kernels, Some(256)).expect("renders");
        let t = std::time::Instant::now();
        let cubin = nvrtc::compile_cubin(&cuda.source, "pdgc_module.cu", *arch, Opt::Full)
            .unwrap_or_else(|e| panic!("{name} for {arch}: {e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{name}: the {arch} cubin is not an ELF image");
        eprintln!(
            "{name} for {arch}: {} kernels at full optimization in {:.1} s",
            cuda.kernels.len(),
            t.elapsed().as_secs_f64()
        );
    });
    eprintln!("{} modules at full optimization in {:.1} s", jobs.len(), started.elapsed().as_secs_f64());
}

#[test]
fn ptxas_accepts_the_ptx_of_every_sample() {
    if !nvrtc_here("ptxas_accepts_the_ptx_of_every_sample") {
        return;
    }
    let Some(ptxas) = ptxas() else {
        assert!(!required(), "PDGC_REQUIRE_NVRTC=1 but no ptxas (set PDGC_PTXAS or put it on PATH)");
        eprintln!("ptxas_accepts_the_ptx_of_every_sample: SKIPPED: no ptxas on PATH");
        return;
    };
    let dir = std::env::temp_dir().join(format!("pdgc-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let modules = sample_modules();
    let jobs: Vec<(usize, Arch)> = (0..modules.len()).flat_map(|i| [(i, Arch(80)), (i, Arch(90))]).collect();
    parallel(&jobs, |&(i, arch)| {
        let (what, source, _) = &modules[i];
        let ptx = nvrtc::compile_ptx(source, "pdgc_module.cu", arch, Opt::FastCompile)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(ptx.contains(".entry"), "{what}: no kernel entry in the PTX");
        let file = dir.join(format!("m{i}_{}.ptx", arch.0));
        std::fs::write(&file, &ptx).expect("write ptx");
        let out = Command::new(&ptxas)
            .arg(format!("-arch=sm_{}", arch.0))
            .arg("-o")
            .arg(dir.join(format!("m{i}_{}.cubin", arch.0)))
            .arg(&file)
            .output()
            .expect("ptxas runs");
        assert!(
            out.status.success(),
            "{what}: ptxas rejected the {arch} PTX:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_broken_module_yields_the_log_and_the_source() {
    if !nvrtc_here("a_broken_module_yields_the_log_and_the_source") {
        return;
    }
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/samples/mnist_cnn.pdg")).expect("sample");
    let m = Module::from_source("mnist_cnn", &src, &CompileOptions::new(4)).expect("compiles");
    let cuda = render_module(&m.program.kernels).expect("renders");
    // Break one statement: an undeclared identifier.
    let broken = cuda.source.replacen("tanhf(", "tanh_not_a_function(", 1);
    assert_ne!(broken, cuda.source);
    let err = nvrtc::compile_cubin(&broken, "broken.cu", Arch(90), Opt::FastCompile).expect_err("must not compile");
    let CudaError::Compile { arch, log, code, .. } = &err else { panic!("expected a compile error, got {err}") };
    assert_eq!(arch, "sm_90");
    assert!(log.contains("tanh_not_a_function"), "the log names the culprit: {log}");
    assert!(log.contains("error"), "{log}");
    assert_eq!(code, &broken);
    // The message carries the numbered source, so the log's line can be found.
    let line = broken.lines().position(|l| l.contains("tanh_not_a_function")).expect("line") + 1;
    let text = err.to_string();
    assert!(text.contains(&format!("{line:5} | ")), "numbered source in the message");
    assert!(
        text.contains(&format!("({line})")) || text.contains(&format!("{line}:")),
        "the log cites line {line}: {log}"
    );
}
