//! Memory: a session under a small budget runs a batch as micro-batches and gets the
//! one-shot results; a budget too small for one example, or an output larger than the
//! disk, is a typed error before any work; `pdgc grads` streams its file.
//!
//! Results agree with the one-shot run to 1e-5 relative (max difference over the largest
//! magnitude of the tensor), not bit for bit: sums over examples (batch gradient, clipped
//! sum) are added run by run, in another order; and per-example results go through
//! contractions whose rows are the run's examples, where the GEMM library may block a run
//! of 2 differently from a run of 8 (measured: the last bits of some logits differ). The
//! interpreter, which has no such blocking, gives bit-identical per-example results.

mod common;

use pdgc::lower::{EntryKind, Role};
use pdgc::{Batch, CompileOptions, Device, Error, Module, TensorMap};

fn cifar(batch: usize) -> Module {
    let src = std::fs::read_to_string("samples/cifar_cnn.pdg").expect("sample");
    Module::from_source("samples/cifar_cnn.pdg", &src, &CompileOptions::new(batch)).expect("compiles")
}

/// A budget that holds `kind`'s buffers for `n` examples but not for `n + 1`.
fn budget_for(m: &Module, kind: EntryKind, n: u64) -> u64 {
    let out = m.program.find(&Role::Activation(m.graph.loss.input().0)).into_iter().collect::<Vec<_>>();
    pdgc::memory::layout(&m.program, kind, n, &out).bytes()
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs() as f64)).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs())) / scale
}

fn assert_close(what: &str, ours: &[f32], one_shot: &[f32]) {
    let e = max_rel(ours, one_shot);
    assert!(e <= 1e-5, "{what}: relative difference {e:e}");
}

fn assert_maps_close(what: &str, ours: &TensorMap, one_shot: &TensorMap) {
    assert_eq!(ours.keys().collect::<Vec<_>>(), one_shot.keys().collect::<Vec<_>>());
    for (name, t) in ours {
        assert_eq!(t.shape, one_shot[name].shape);
        assert_close(&format!("{what} `{name}`"), &t.data, &one_shot[name].data);
    }
}

#[test]
fn a_small_budget_runs_micro_batches_with_the_one_shot_results() {
    let m = cifar(8);
    let params = m.init_params(3);
    let batch = Batch::random(&m.graph, 8, 4);
    let mut one = m.session(Device::Cpu).expect("session");
    one.set_memory_budget(u64::MAX);
    let mut small = m.session(Device::Cpu).expect("session");

    for kind in [
        EntryKind::Loss,
        EntryKind::BatchGrad,
        EntryKind::PerExampleGrads,
        EntryKind::PerExampleNorms,
        EntryKind::ClippedSum,
    ] {
        assert_eq!(one.micro_batch(kind).expect("fits").0, 8);
        small.set_memory_budget(budget_for(&m, kind, 3));
        let (micro, bytes) = small.micro_batch(kind).expect("fits");
        assert_eq!(micro, 3, "{kind:?}: 3 examples fit the budget, 4 do not");
        assert!(bytes <= small.memory_budget());
        match kind {
            EntryKind::Loss => {
                assert_close("loss", &small.loss(&params, &batch).unwrap(), &one.loss(&params, &batch).unwrap());
                let (f, f1) = (small.forward(&params, &batch).unwrap(), one.forward(&params, &batch).unwrap());
                assert_eq!(f.shape, f1.shape);
                assert_close("forward", &f.data, &f1.data);
            }
            EntryKind::BatchGrad => {
                let (g, l) = small.batch_grad_and_loss(&params, &batch).unwrap();
                let (g1, l1) = one.batch_grad_and_loss(&params, &batch).unwrap();
                assert_close("loss", &l, &l1);
                assert_maps_close("batch gradient", &g, &g1);
            }
            EntryKind::PerExampleGrads => {
                let g = small.per_example_grads(&params, &batch).unwrap();
                assert_maps_close("per-example gradients", &g, &one.per_example_grads(&params, &batch).unwrap());
            }
            EntryKind::PerExampleNorms => {
                let n = small.per_example_norms(&params, &batch).unwrap();
                assert_close("norms", &n, &one.per_example_norms(&params, &batch).unwrap());
            }
            EntryKind::ClippedSum => {
                let c = small.clipped_grad_sum(&params, &batch, 0.5).unwrap();
                let c1 = one.clipped_grad_sum(&params, &batch, 0.5).unwrap();
                assert_close("norms", &c.norms, &c1.norms);
                assert_close("loss", &c.loss, &c1.loss);
                assert_maps_close("clipped sum", &c.sum, &c1.sum);
            }
        }
    }
}

const TINY: &str = "
model tiny {
    input x: [2, 6, 6];
    label y: classes(4);
    h = tanh(conv: conv2d(x, 3, kernel=3));
    logits = fc: linear(flatten(h), 4);
    loss cross_entropy(logits, y);
}
";

#[test]
fn the_interpreter_micro_batches_bit_for_bit() {
    let m = Module::from_source("tiny.pdg", TINY, &CompileOptions::new(5)).expect("compiles");
    let params = m.init_params(5);
    let batch = Batch::random(&m.graph, 5, 6);
    let mut one = m.session(Device::Interpreter).expect("session");
    let mut small = m.session(Device::Interpreter).expect("session");
    small.set_memory_budget(budget_for(&m, EntryKind::PerExampleGrads, 2));
    assert_eq!(small.micro_batch(EntryKind::PerExampleGrads).unwrap().0, 2);
    assert_eq!(small.per_example_grads(&params, &batch).unwrap(), one.per_example_grads(&params, &batch).unwrap());
    small.set_memory_budget(budget_for(&m, EntryKind::PerExampleNorms, 1));
    assert_eq!(small.micro_batch(EntryKind::PerExampleNorms).unwrap().0, 1);
    assert_eq!(small.per_example_norms(&params, &batch).unwrap(), one.per_example_norms(&params, &batch).unwrap());
}

const CONVS: &str = "
model convs {
    input x: [4, 9, 9];
    label y: classes(3);
    a = relu(c1: conv2d(x, 6, kernel=3, padding=1));
    b = tanh(c2: conv2d(a, 6, kernel=3, stride=2, groups=2));
    c = relu(c3: conv2d(b, 4, kernel=2, dilation=2, padding=1));
    logits = fc: linear(flatten(c), 3);
    loss cross_entropy(logits, y);
}
";

/// Every entry point of `a` and `b` (same model, same batch) agrees: bit for bit, or
/// within 1e-5 relative.
fn assert_sessions_agree(
    a: &mut pdgc::Session,
    b: &mut pdgc::Session,
    params: &pdgc::Params,
    batch: &Batch,
    exact: bool,
) {
    let check = |what: &str, x: &[f32], y: &[f32]| {
        if exact {
            assert_eq!(x, y, "{what}");
        } else {
            assert_close(what, x, y);
        }
    };
    let maps = |what: &str, x: &TensorMap, y: &TensorMap| {
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
        for (name, t) in x {
            assert_eq!(t.shape, y[name].shape);
            check(&format!("{what} `{name}`"), &t.data, &y[name].data);
        }
    };
    check("loss", &a.loss(params, batch).unwrap(), &b.loss(params, batch).unwrap());
    let (g, l) = a.batch_grad_and_loss(params, batch).unwrap();
    let (g1, l1) = b.batch_grad_and_loss(params, batch).unwrap();
    check("loss", &l, &l1);
    maps("batch gradient", &g, &g1);
    maps(
        "per-example gradients",
        &a.per_example_grads(params, batch).unwrap(),
        &b.per_example_grads(params, batch).unwrap(),
    );
    check("norms", &a.per_example_norms(params, batch).unwrap(), &b.per_example_norms(params, batch).unwrap());
    let (c, c1) = (a.clipped_grad_sum(params, batch, 0.5).unwrap(), b.clipped_grad_sum(params, batch, 0.5).unwrap());
    check("clipped-sum norms", &c.norms, &c1.norms);
    maps("clipped sum", &c.sum, &c1.sum);
}

/// Conv launches run in chunks of examples when their im2col columns are large. Forced
/// here with a chunk budget of one byte (one example per chunk), every entry point gives
/// the batched launches' results, for each strategy that reads columns (unfold, ghost and
/// its book-keeping, and naive, whose columns stay batched), strided, grouped and dilated:
/// bit for bit in the interpreter, within 1e-5 relative on the CPU, where the GEMM library
/// may block a chunk of one example differently from a batch.
#[test]
fn chunked_conv_launches_give_the_batched_results() {
    use pdgc::ops::Strategy;
    assert_chunks_agree(
        "convs.pdg",
        CONVS,
        &[
            &[("c1", Strategy::Unfold), ("c2", Strategy::Ghost), ("c3", Strategy::Naive)],
            &[("c1", Strategy::Ghost), ("c2", Strategy::Naive), ("c3", Strategy::Unfold)],
        ],
    );
}

/// The same for convs written in index notation, whose window products (forward pass,
/// input gradient, weight gradients per example and summed over the batch) run in chunks
/// as the built-in conv's do.
#[test]
fn chunked_window_products_give_the_batched_results() {
    use pdgc::ops::Strategy;
    let src = std::fs::read_to_string("tests/data/models/index_conv.pdg").expect("test model");
    assert_chunks_agree("index_conv.pdg", &src, &[&[("c1", Strategy::Unfold), ("c2", Strategy::Ghost)]]);
}

/// A ghost layer whose columns are kept but whose Gram matrices for the batch exceed the
/// chunk budget computes them in chunks of examples: index_conv's `c1` (T = 144, 166 KB of
/// Gram matrices per example) under a 100 kB budget that still keeps its 78 kB of columns.
#[test]
fn ghost_gram_matrices_beyond_the_budget_run_in_chunks() {
    use pdgc::lower::LaunchMode;
    use pdgc::ops::Strategy;
    let src = std::fs::read_to_string("tests/data/models/index_conv.pdg").expect("test model");
    let mut opts = CompileOptions::new(5);
    opts.overrides = vec![("c1".to_string(), Strategy::Ghost)];
    opts.private_bytes = 0; // columns for the batch, kept from the forward pass
    let batched = Module::from_source("index_conv.pdg", &src, &opts).expect("compiles");
    opts.chunk_bytes = 100_000;
    let chunked = Module::from_source("index_conv.pdg", &src, &opts).expect("compiles");
    let ghost = chunked.program.kernels.iter().position(|k| k.name == "n1_c1_weight_ghost").expect("c1's ghost kernel");
    assert!(!chunked.program.kernels.iter().any(|k| k.name == "n1_c1_weight_ghost_im2col"), "c1 keeps its columns");
    let launches: Vec<_> =
        chunked.program.entries.iter().flat_map(|e| &e.launches).filter(|l| l.kernel == ghost).collect();
    assert!(!launches.is_empty());
    for l in launches {
        assert!(matches!(l.mode, LaunchMode::Chunked { examples: 1, .. }), "{:?}", l.mode);
    }
    assert_modules_agree(&chunked, &batched, 3, 4);
}

/// `chunked` and `batched` (one source, other chunk budgets) give the same results on every
/// entry point, for parameters of seed `params` and a batch of 5 of seed `examples`: bit for
/// bit in the interpreter, to rounding on the CPU.
fn assert_modules_agree(chunked: &Module, batched: &Module, params: u64, examples: u64) {
    let params = batched.init_params(params);
    let batch = Batch::random(&batched.graph, 5, examples);
    for (device, exact) in [(Device::Interpreter, true), (Device::Cpu, false)] {
        let mut a = chunked.session(device).expect("session");
        let mut b = batched.session(device).expect("session");
        assert_sessions_agree(&mut a, &mut b, &params, &batch, exact);
    }
}

/// Compiles `src` with each set of strategy overrides, batched and with a chunk budget of
/// one byte, and checks that the chunked module runs chunks, holds less, and gives the
/// batched module's results on every entry point (a ghost layer's Gram matrices from the
/// kept columns against those from columns gathered in chunks).
fn assert_chunks_agree(name: &str, src: &str, override_sets: &[&[(&str, pdgc::ops::Strategy)]]) {
    use pdgc::lower::LaunchMode;
    for overrides in override_sets {
        let mut opts = CompileOptions::new(5);
        opts.overrides = overrides.iter().map(|(l, s)| (l.to_string(), *s)).collect();
        opts.private_bytes = 0; // columns in workspaces for the batch, which chunks then cut
        let batched = Module::from_source(name, src, &opts).expect("compiles");
        opts.chunk_bytes = 1;
        let chunked = Module::from_source(name, src, &opts).expect("compiles");
        let groups = |m: &Module| {
            m.program
                .entries
                .iter()
                .flat_map(|e| &e.launches)
                .filter(|l| matches!(l.mode, LaunchMode::Chunked { .. }))
                .count()
        };
        assert_eq!(groups(&batched), 0);
        assert!(groups(&chunked) > 0);
        // A ghost layer whose columns are not kept gathers them for its Gram contractions.
        if overrides.iter().any(|(_, s)| *s == pdgc::ops::Strategy::Ghost) {
            let gathers = chunked.program.kernels.iter().any(|k| k.name.ends_with("_weight_ghost_im2col"));
            assert!(gathers, "{name}: no ghost layer gathers its columns");
        }
        for kind in EntryKind::ALL {
            let (b, c) = (budget_for(&batched, kind, 5), budget_for(&chunked, kind, 5));
            assert!(c < b, "{kind:?}: chunks hold less than the batch ({c} vs {b} bytes)");
        }
        assert_modules_agree(&chunked, &batched, 7, 8);
    }
}

#[test]
fn a_budget_below_one_example_is_a_typed_error() {
    let m = cifar(4);
    let params = m.init_params(1);
    let batch = Batch::random(&m.graph, 4, 1);
    let mut s = m.session(Device::Cpu).expect("session");
    s.set_memory_budget(1 << 10);
    let e = s.clipped_grad_sum(&params, &batch, 1.0).expect_err("1 KiB holds nothing");
    assert!(matches!(e, Error::OutOfMemory { budget: Some(1024), .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("one example of the clipped-sum step") && msg.contains("--memory-budget"), "{msg}");
    assert!(msg.contains("1.0 KiB"), "{msg}");
}

#[test]
fn the_arena_is_smaller_than_the_buffers_it_holds() {
    let m = cifar(16);
    for kind in [EntryKind::BatchGrad, EntryKind::ClippedSum] {
        let l = pdgc::memory::layout(&m.program, kind, 16, &[]);
        let used: u64 =
            l.offsets.iter().zip(&m.program.buffers).filter(|(o, _)| o.is_some()).map(|(_, b)| b.len(16) * 4).sum();
        assert!(l.bytes() * 10 < used * 8, "{kind:?}: the arena ({}) saves under 20% of {used}", l.bytes());
    }
}

#[test]
fn grads_streams_micro_batches_into_one_file() {
    let dir = std::env::temp_dir().join(format!("pdgc-memory-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let m = cifar(6);
    let params = dir.join("params.safetensors");
    let batch = dir.join("batch.safetensors");
    let (code, _, stderr) = common::pdgc(&["init", "samples/cifar_cnn.pdg", "-o", params.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    write_batch(&batch, &Batch::random(&m.graph, 6, 7));
    let run = |out: &std::path::Path, budget: Option<&str>| {
        let mut args = vec![
            "grads",
            "samples/cifar_cnn.pdg",
            "--params",
            params.to_str().unwrap(),
            "--batch",
            batch.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--clip",
            "1.0",
            "--device",
            "cpu",
        ];
        if let Some(b) = budget {
            args.extend(["--memory-budget", b]);
        }
        let (code, _, stderr) = common::pdgc(&args);
        assert_eq!(code, 0, "{stderr}");
        stderr
    };
    let whole = dir.join("whole.safetensors");
    let parts = dir.join("parts.safetensors");
    assert!(!run(&whole, None).contains("micro-batches"));
    let budget = budget_for(&m, EntryKind::PerExampleGrads, 2).to_string();
    let stderr = run(&parts, Some(&budget));
    assert!(stderr.contains("running in micro-batches of 2"), "{stderr}");
    let read = |p: &std::path::Path| -> Vec<(String, Vec<usize>, Vec<u8>)> {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<_> = st.tensors().into_iter().map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let (a, b) = (read(&whole), read(&parts));
    assert_eq!(a.len(), b.len());
    for ((na, sa, da), (nb, sb, db)) in a.iter().zip(&b) {
        assert_eq!((na, sa), (nb, sb));
        let f = |d: &[u8]| d.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>();
        assert_close(na, &f(db), &f(da));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn write_batch(path: &std::path::Path, b: &Batch) {
    let pdgc::Labels::Classes(classes) = &b.labels else { panic!("class labels") };
    let x = &b.inputs["x"];
    let xb: Vec<u8> = x.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let yb: Vec<u8> = classes.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        ("x", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, x.shape.clone(), &xb).unwrap()),
        ("y", safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![classes.len()], &yb).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Where only the norms are wanted, `direct` computes each conv's per-example squared norms
/// as it computes the gradient, element by element, and never stores the gradient: no
/// launch of the norms entry binds a per-example gradient buffer (so the arena holds none),
/// and the norms equal those of `unfold`, which does store it.
#[test]
fn direct_norms_store_no_per_example_gradient() {
    use pdgc::lower::{EntryKind, Role};
    use pdgc::ops::Strategy;
    let src = std::fs::read_to_string("samples/cifar_cnn.pdg").expect("sample");
    let layers = ["conv1", "conv2", "conv3", "conv4", "conv5", "conv6"];
    let compile = |s: Strategy| {
        let mut opts = CompileOptions::new(4);
        opts.overrides = layers.iter().map(|l| (l.to_string(), s)).collect();
        Module::from_source("cifar_cnn.pdg", &src, &opts).expect("compiles")
    };
    let (direct, unfold) = (compile(Strategy::Direct), compile(Strategy::Unfold));
    let norms = direct.program.entry(EntryKind::PerExampleNorms);
    let stored: Vec<&str> = norms
        .launches
        .iter()
        .flat_map(|l| &l.args)
        .map(|b| direct.program.buffer(*b))
        .filter(|b| matches!(&b.role, Role::PerExampleGrad(p) if p.starts_with("conv")))
        .map(|b| b.name.as_str())
        .collect();
    assert!(stored.is_empty(), "the norms entry stores {stored:?}");
    let params = direct.init_params(5);
    let batch = Batch::random(&direct.graph, 4, 6);
    let mut a = direct.session(Device::Cpu).expect("session");
    let mut b = unfold.session(Device::Cpu).expect("session");
    assert_close(
        "norms",
        &a.per_example_norms(&params, &batch).unwrap(),
        &b.per_example_norms(&params, &batch).unwrap(),
    );
}
