//! Numbers: for every small sample and every strategy, pdgc's per-example gradients equal
//! the f64 reference evaluator, sum to the batch gradient, give the reference's norms and
//! clipped sums; the JIT equals the kernel-IR interpreter; and everything matches the
//! vectors PyTorch wrote (tests/data). Written once, run per backend.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pdgc::ops::Strategy;
use pdgc::reference;
use pdgc::{Batch, CompileOptions, Device, Labels, Module, Params, TensorMap};

/// Where `samples/` and `tests/data/` are: the repository, or `$PDGC_TEST_ROOT` when this
/// test binary runs from the GPU bundle (`scripts/gpu-bundle.sh`) on a machine without the
/// source tree.
fn root() -> PathBuf {
    std::env::var_os("PDGC_TEST_ROOT").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).expect("test input exists")
}

fn module(rel: &str, batch: usize, overrides: Vec<(String, Strategy)>) -> Module {
    module_with(rel, batch, overrides, pdgc::lower::PRIVATE_COLUMN_BYTES)
}

/// [`module`] with at most `private_bytes` of one example's im2col columns in private
/// memory (0: none, every conv's columns in workspaces for the batch).
fn module_with(rel: &str, batch: usize, overrides: Vec<(String, Strategy)>, private_bytes: u64) -> Module {
    let mut opts = CompileOptions::new(batch);
    opts.overrides = overrides;
    opts.private_bytes = private_bytes;
    Module::from_source(rel, &read(rel), &opts).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn to_reference(params: &Params, batch: &Batch) -> (reference::Params, reference::Batch) {
    let p = params.tensors.iter().map(|(k, t)| (k.clone(), t.data.iter().map(|&x| x as f64).collect())).collect();
    let size = batch.size().expect("valid batch");
    let b = reference::Batch {
        inputs: batch.inputs.iter().map(|(k, t)| (k.clone(), t.data.iter().map(|&x| x as f64).collect())).collect(),
        labels: match &batch.labels {
            Labels::Classes(v) => reference::Labels::Classes(v.iter().map(|&x| x as usize).collect()),
            Labels::Target(t) => reference::Labels::Target(t.data.iter().map(|&x| x as f64).collect()),
        },
        size,
    };
    (p, b)
}

/// max |ours − expected| / max(max |expected|, floor): a tensor-scaled relative error.
fn rel_err(ours: &[f32], expected: &[f64]) -> f64 {
    assert_eq!(ours.len(), expected.len());
    let scale = expected.iter().fold(0f64, |a, b| a.max(b.abs())).max(1e-8);
    ours.iter().zip(expected).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max) / scale
}

fn check_grads(what: &str, ours: &TensorMap, expected: &BTreeMap<String, Vec<f64>>, tol: f64) {
    for (name, e) in expected {
        let o = ours.get(name).unwrap_or_else(|| panic!("{what}: no {name}"));
        let err = rel_err(&o.data, e);
        assert!(err < tol, "{what}: {name} differs by {err:.2e} (relative to its largest entry)");
    }
}

/// The strategies to force, one configuration each (`None`: the cost model's choice).
fn configs(m: &Module) -> Vec<Option<Strategy>> {
    let mut out = vec![None];
    for s in [Strategy::Naive, Strategy::Crb, Strategy::Unfold, Strategy::Direct, Strategy::Outer, Strategy::Ghost] {
        if m.plans[2].layers.iter().any(|l| l.costs.iter().any(|c| c.strategy == s)) {
            out.push(Some(s));
        }
    }
    out
}

fn forced(m: &Module, s: Strategy) -> Vec<(String, Strategy)> {
    m.plans[2].layers.iter().filter(|l| l.costs.iter().any(|c| c.strategy == s)).map(|l| (l.layer.clone(), s)).collect()
}

/// Every entry point against the reference, for one model, strategy configuration and
/// device.
fn check_model(rel: &str, batch_size: usize, device: Device, only_auto: bool) {
    check_model_with(rel, batch_size, device, only_auto, pdgc::lower::PRIVATE_COLUMN_BYTES)
}

/// [`check_model`] with at most `private_bytes` of one example's columns in private memory.
fn check_model_with(rel: &str, batch_size: usize, device: Device, only_auto: bool, private_bytes: u64) {
    let base = module_with(rel, batch_size, vec![], private_bytes);
    let params = base.init_params(3);
    let batch = Batch::random(&base.graph, batch_size, 11);
    let (rp, rb) = to_reference(&params, &batch);
    let expected = reference::evaluate(&base.graph, &rp, &rb).expect("reference runs");
    let b = batch_size;
    let ref_norms: Vec<f64> = (0..b)
        .map(|n| {
            expected
                .grads
                .values()
                .map(|g| {
                    let per = g.len() / b;
                    g[n * per..(n + 1) * per].iter().map(|x| x * x).sum::<f64>()
                })
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let clip = (ref_norms.iter().sum::<f64>() / b as f64) as f32; // clips about half of them
    let ref_sum: BTreeMap<String, Vec<f64>> = expected
        .grads
        .iter()
        .map(|(k, g)| {
            let per = g.len() / b;
            let sum = (0..per)
                .map(|j| (0..b).map(|n| g[n * per + j] * (clip as f64 / (ref_norms[n] + 1e-6)).min(1.0)).sum())
                .collect();
            (k.clone(), sum)
        })
        .collect();
    let configs = if only_auto { vec![None] } else { configs(&base) };
    for config in configs {
        let what = format!("{rel} {:?} {}", device, config.map_or("auto".into(), |s: Strategy| s.to_string()));
        let m = match config {
            None => base.clone(),
            Some(s) => module_with(rel, batch_size, forced(&base, s), private_bytes),
        };
        let mut s = m.session(device).expect("session");
        let loss = s.loss(&params, &batch).expect("loss");
        assert!(rel_err(&loss, &expected.loss) < 1e-5, "{what}: loss");
        let pe = s.per_example_grads(&params, &batch).expect("per-example grads");
        check_grads(&format!("{what} grads"), &pe, &expected.grads, 2e-5);
        // Σ_n of the per-example grads is the batch gradient.
        let bg = s.batch_grad(&params, &batch).expect("batch grad");
        for (name, g) in &pe {
            let per = g.data.len() / b;
            let summed: Vec<f64> = (0..per).map(|j| (0..b).map(|n| g.data[n * per + j] as f64).sum()).collect();
            assert!(rel_err(&bg[name].data, &summed) < 1e-5, "{what}: Σ_n {name} ≠ batch gradient");
        }
        let norms = s.per_example_norms(&params, &batch).expect("norms");
        // A norm sums the squares of every parameter's gradient (~600k terms on cifar_cnn).
        // The CPU JIT sums in four vector lanes; the CUDA code sums a layer's squares in 128
        // per-thread partial sums added as a tree (in one thread, in order, where a kernel
        // is not block-cooperative), whose f32 rounding error grows at worst like
        // sqrt(terms)·2^-24 ≈ 5e-5 there.
        let norm_tol = match device {
            Device::CudaHost | Device::Cuda => 1e-4,
            _ => 2e-5,
        };
        assert!(rel_err(&norms, &ref_norms) < norm_tol, "{what}: norms {norms:?} vs {ref_norms:?}");
        let cs = s.clipped_grad_sum(&params, &batch, clip).expect("clipped sum");
        check_grads(&format!("{what} clipped sum"), &cs.sum, &ref_sum, 2.5 * norm_tol);
    }
}

#[test]
fn mnist_cnn_every_strategy_matches_the_reference() {
    check_model("samples/mnist_cnn.pdg", 3, Device::Cpu, false);
}

#[test]
fn cifar_cnn_every_strategy_matches_the_reference() {
    check_model("samples/cifar_cnn.pdg", 2, Device::Cpu, false);
}

#[test]
fn conv1d_net_every_strategy_matches_the_reference() {
    check_model("samples/conv1d_net.pdg", 3, Device::Cpu, false);
}

#[test]
fn depthwise_separable_every_strategy_matches_the_reference() {
    check_model("samples/depthwise_separable.pdg", 2, Device::Cpu, false);
}

#[test]
fn regression_mlp_ln_every_strategy_matches_the_reference() {
    check_model("samples/regression_mlp_ln.pdg", 3, Device::Cpu, false);
}

#[test]
fn toy_grid_matches_the_reference() {
    for rel in ["samples/toy_l2_r4_k3.pdg", "samples/toy_l3_r2_k5.pdg", "samples/toy_l4_r2_k3.pdg"] {
        check_model(rel, 2, Device::Cpu, true);
    }
}

#[test]
fn test_models_every_strategy_matches_the_reference() {
    for rel in [
        "tests/data/models/gn_residual_block.pdg",
        "tests/data/models/conv_geometry.pdg",
        "tests/data/models/hardswish_net.pdg",
        "tests/data/models/per_side_padding.pdg",
        "tests/data/models/linear_rows.pdg",
        "tests/data/models/overlapping_max_pool.pdg",
        "tests/data/models/labels_named_like_the_loss.pdg",
        "tests/data/models/target_named_dy.pdg",
    ] {
        check_model(rel, 2, Device::Cpu, false);
    }
}

/// The convs' columns in workspaces for the batch, kept from the forward pass or gathered
/// again (what convs with columns too large for private memory do), on every strategy.
#[test]
fn columns_for_the_batch_match_the_reference() {
    for rel in ["samples/mnist_cnn.pdg", "tests/data/models/conv_geometry.pdg", "tests/data/models/index_conv.pdg"] {
        check_model_with(rel, 3, Device::Cpu, false, 0);
    }
    check_model_with("tests/data/models/conv_geometry.pdg", 2, Device::Interpreter, true, 0);
}

#[test]
fn layers_written_in_index_notation_match_the_reference() {
    for rel in [
        "samples/depthwise_index.pdg",
        "samples/gated_bilinear.pdg",
        "tests/data/models/index_depthwise.pdg",
        "tests/data/models/index_gated_mlp.pdg",
        "tests/data/models/index_paramfree.pdg",
        "tests/data/models/index_conv.pdg",
    ] {
        check_model(rel, 3, Device::Cpu, false);
        check_model(rel, 2, Device::Interpreter, true);
    }
}

#[test]
fn the_interpreter_agrees_with_the_reference() {
    check_model("samples/mnist_cnn.pdg", 2, Device::Interpreter, false);
    check_model("tests/data/models/conv_geometry.pdg", 2, Device::Interpreter, true);
    check_model("tests/data/models/linear_rows.pdg", 3, Device::Interpreter, true);
}

// The CUDA backend's code, compiled for this CPU and run one GPU block at a time, on the
// models and strategies the GPU test runs: every other model in each of two tests, which
// run side by side (the host harness is single-threaded, and slow).
#[test]
fn the_generated_cuda_c_agrees_with_the_reference() {
    for &(rel, b) in CUDA_MODELS.iter().step_by(2) {
        check_model(rel, b, Device::CudaHost, false);
    }
}

#[test]
fn the_generated_cuda_c_agrees_with_the_reference_on_the_other_models() {
    for &(rel, b) in CUDA_MODELS.iter().skip(1).step_by(2) {
        check_model(rel, b, Device::CudaHost, false);
    }
}

/// The models the CUDA tests run, with their batch sizes.
const CUDA_MODELS: [(&str, usize); 13] = [
    ("samples/mnist_cnn.pdg", 3),
    ("samples/cifar_cnn.pdg", 2),
    ("samples/conv1d_net.pdg", 3),
    ("samples/depthwise_separable.pdg", 2),
    ("samples/regression_mlp_ln.pdg", 3),
    ("tests/data/models/conv_geometry.pdg", 2),
    ("tests/data/models/gn_residual_block.pdg", 2),
    ("tests/data/models/per_side_padding.pdg", 2),
    ("samples/depthwise_index.pdg", 2),
    ("samples/gated_bilinear.pdg", 2),
    ("tests/data/models/index_conv.pdg", 2),
    ("tests/data/models/linear_rows.pdg", 2),
    ("tests/data/models/overlapping_max_pool.pdg", 2),
];

/// Whether a CUDA device is usable here. `PDGC_REQUIRE_GPU=1` (scripts/gpu-check.sh) turns
/// its absence into a failure; otherwise the CUDA tests say they skipped.
fn gpu_here(test: &str) -> bool {
    match pdgc_codegen::cuda::device::CudaDevice::open(0) {
        Ok(dev) => {
            eprintln!("{test}: on {} ({})", dev.name(), dev.arch());
            true
        }
        Err(e) if std::env::var("PDGC_REQUIRE_GPU").is_ok_and(|v| v == "1") => panic!("PDGC_REQUIRE_GPU=1 but {e}"),
        Err(e) => {
            eprintln!("{test}: SKIPPED: {e}");
            false
        }
    }
}

#[test]
fn cuda_every_strategy_matches_the_reference() {
    if !gpu_here("cuda_every_strategy_matches_the_reference") {
        return;
    }
    for (rel, b) in CUDA_MODELS {
        check_model(rel, b, Device::Cuda, false);
    }
}

#[test]
fn cuda_matches_pytorch_vectors() {
    if !gpu_here("cuda_matches_pytorch_vectors") {
        return;
    }
    pytorch_vectors_on(Device::Cuda);
}

#[test]
fn auto_without_cuda_runs_on_the_cpu_and_says_why() {
    let m = module("samples/mnist_cnn.pdg", 2, vec![]);
    let s = m.session(Device::Auto).expect("an Auto session always starts");
    match pdgc_codegen::cuda::device::CudaDevice::open(0) {
        Ok(_) => assert!(s.device_description().starts_with("cuda"), "{}", s.device_description()),
        Err(_) => {
            assert!(s.device_description().starts_with("cpu"), "{}", s.device_description());
            assert!(s.fallback_reason().is_some_and(|r| !r.is_empty()));
            let err = m.session(Device::Cuda).err().expect("Device::Cuda without a GPU is an error");
            assert!(matches!(err, pdgc::Error::Device(_)), "{err}");
        }
    }
}

#[test]
fn per_example_grads_match_central_finite_differences() {
    // f64 finite differences of each example's own loss, on a few entries per tensor.
    let rel = "tests/data/models/gn_residual_block.pdg";
    let m = module(rel, 2, vec![]);
    let params = m.init_params(5);
    let batch = Batch::random(&m.graph, 2, 9);
    let (rp, rb) = to_reference(&params, &batch);
    let ours = m.session(Device::Cpu).expect("session").per_example_grads(&params, &batch).expect("grads");
    for p in &m.graph.params {
        let per = ours[&p.name].data.len() / 2;
        for index in [0, per / 3, per - 1] {
            let fd = reference::finite_difference(&m.graph, &rp, &rb, &p.name, index, 1e-5).expect("fd");
            for n in 0..2 {
                let got = ours[&p.name].data[n * per + index] as f64;
                assert!(
                    (got - fd[n]).abs() <= 1e-3 * fd[n].abs().max(1e-2),
                    "{}[{index}] example {n}: {got} vs fd {}",
                    p.name,
                    fd[n]
                );
            }
        }
    }
}

/// f64 tensors of a safetensors file written by `tests/data/make_vectors.py`.
fn torch_vectors(rel: &str) -> (BTreeMap<String, (Vec<usize>, Vec<f64>)>, String) {
    let bytes = std::fs::read(root().join(rel)).expect("vectors exist");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("metadata");
    let model = meta.metadata().as_ref().and_then(|m| m.get("model").cloned()).expect("model path in metadata");
    let mut out = BTreeMap::new();
    for (name, t) in st.tensors() {
        let data: Vec<f64> = match t.dtype() {
            safetensors::Dtype::F64 => {
                t.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8"))).collect()
            }
            safetensors::Dtype::I64 => {
                t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8")) as f64).collect()
            }
            safetensors::Dtype::F32 => {
                t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4")) as f64).collect()
            }
            other => panic!("{rel}: unexpected dtype {other:?} for {name}"),
        };
        out.insert(name.to_string(), (t.shape().to_vec(), data));
    }
    (out, model)
}

#[test]
fn per_example_grads_match_pytorch_vectors() {
    pytorch_vectors_on(Device::Cpu);
}

fn pytorch_vectors_on(device: Device) {
    let dir = root().join("tests/data");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("tests/data")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "PyTorch vectors missing: {files:?}");
    for file in files {
        let (v, model_path) = torch_vectors(&format!("tests/data/{file}"));
        let rel = model_path.trim_start_matches("./");
        let b = v["loss"].0[0];
        let m = module(rel, b, vec![]);
        let to_t = |name: &str| {
            let (shape, data) = &v[name];
            pdgc::Tensor::new(shape.clone(), data.iter().map(|&x| x as f32).collect())
        };
        let params = Params { tensors: m.graph.params.iter().map(|p| (p.name.clone(), to_t(&p.name))).collect() };
        let inputs = m
            .graph
            .inputs()
            .map(|n| match &n.op {
                pdgc::graph::Op::Input { name } => (name.clone(), to_t(name)),
                _ => unreachable!(),
            })
            .collect();
        let label = m.graph.label.name().to_string();
        let labels = match &m.graph.label {
            pdgc::graph::LabelSpec::Classes { .. } => Labels::Classes(v[&label].1.iter().map(|&x| x as i64).collect()),
            pdgc::graph::LabelSpec::Target { .. } => Labels::Target(to_t(&label)),
        };
        let batch = Batch { inputs, labels };
        for config in configs(&m) {
            let mm = match config {
                None => m.clone(),
                Some(s) => module(rel, b, forced(&m, s)),
            };
            let mut s = mm.session(device).expect("session");
            let loss = s.loss(&params, &batch).expect("loss");
            assert!(rel_err(&loss, &v["loss"].1) < 1e-4, "{file}: loss");
            let pe = s.per_example_grads(&params, &batch).expect("grads");
            let expected: BTreeMap<String, Vec<f64>> =
                m.graph.params.iter().map(|p| (p.name.clone(), v[&format!("grad.{}", p.name)].1.clone())).collect();
            check_grads(&format!("{file} vs PyTorch ({config:?})"), &pe, &expected, 1e-4);
        }
    }
}

/// The depthwise convolutions written by hand in index notation compute what the built-in
/// grouped conv computes: the same outputs (through the losses) and the same per-example
/// gradients, for every strategy of the hand-written layers, on the same parameters.
#[test]
fn hand_written_depthwise_conv_equals_the_built_in_grouped_conv() {
    let rel = "samples/depthwise_index.pdg";
    let twin_src = read(rel)
        .replace("dw1: depthwise3(h)", "dw1: conv2d(h, 16, 3, padding=1, groups=16)")
        .replace("dw2: depthwise3s2(h)", "dw2: conv2d(h, 32, 3, stride=2, padding=1, groups=32)");
    assert_equals_twin(rel, &twin_src, &["dw1", "dw2"], &[Strategy::Naive, Strategy::Unfold, Strategy::Direct]);
}

#[test]
fn hand_written_conv_equals_the_built_in_conv() {
    // Its forward pass, per-example weight gradients and input gradient run as im2col
    // columns and one contraction per example, then col2im for the input gradient (the
    // lowering's window products), as the built-in conv's do. By default each kernel
    // gathers (or scatters) one example's columns in private memory around its contraction.
    let rel = "tests/data/models/index_conv.pdg";
    let unfold = vec![("c1".into(), Strategy::Unfold), ("c2".into(), Strategy::Unfold)];
    let m = module(rel, 2, unfold.clone());
    // (A kernel may also run the launch after it, `lower::chain`: `{name}__{next}`.)
    for name in ["n1_c1_fwd0_fused", "n3_c2_fwd0_fused", "n3_c2_weight_unfold_fused", "n3_c2_bwd_dx0_fused"] {
        let named = |k: &&pdgc_codegen::ir::Kernel| k.name == name || k.name.starts_with(&format!("{name}__"));
        let k = m.program.kernels.iter().find(named).unwrap_or_else(|| panic!("no kernel {name}"));
        assert!(k.has_contractions() && k.args.iter().any(|a| a.mode == pdgc_codegen::ir::Mode::Private), "{k}");
    }
    assert!(!m.program.kernels.iter().any(|k| k.name.contains("im2col")), "columns gathered for the batch");
    // With columns for the batch (private memory off), the weight gradients read the columns
    // the forward pass gathered (small enough to keep): no second im2col.
    let m = module_with(rel, 2, unfold, 0);
    assert!(!m.program.kernels.iter().any(|k| k.name.ends_with("weight_unfold_im2col")), "columns gathered twice");
    for name in [
        "n1_c1_fwd0_im2col",
        "n1_c1_fwd0",
        "n3_c2_fwd0_im2col",
        "n3_c2_weight_unfold",
        "n3_c2_bwd_dx0",
        "n3_c2_bwd_dx0_col2im_first",
    ] {
        let k = m.program.kernels.iter().find(|k| k.name == name).unwrap_or_else(|| panic!("no kernel {name}"));
        assert_eq!(k.has_contractions(), !name.contains("im2col") && !name.contains("col2im"), "{name}");
    }
    // Book-keeping (after ghost norms) sums the weight gradient over the batch on the same
    // columns, reading the output gradient scaled by the clip factors: one more contraction,
    // split into partial sums over the examples, which a second kernel adds up.
    let m = module_with(rel, 2, vec![("c2".into(), Strategy::Ghost)], 0);
    let kernel = |name: &str| m.program.kernels.iter().find(|k| k.name == name).expect(name);
    assert!(kernel("n3_c2_weight_bookkeep_parts").has_contractions());
    assert!(!kernel("n3_c2_weight_bookkeep").has_contractions());
    // Its ghost norm's Gram products read the kept columns, not the input through the window.
    let k = m.program.kernels.iter().find(|k| k.name == "n3_c2_weight_ghost").expect("a ghost kernel");
    assert!(k.args.iter().any(|a| a.name == "cols'") && !k.args.iter().any(|a| a.name == "X"), "{k}");
    let twin_src = read(rel)
        .replace("c1: conv3(x, 8)", "c1: conv2d(x, 8, 3, padding=1)")
        .replace("c2: conv3s2(h, 16)", "c2: conv2d(h, 16, 3, stride=2, padding=1, bias=false)");
    assert_equals_twin(rel, &twin_src, &["c1", "c2"], &[Strategy::Naive, Strategy::Unfold, Strategy::Direct]);
}

/// The model `rel`, whose `layers` are written in index notation, against `twin_src`, the
/// same model with built-in layers in their place, on the same parameters (reshaped where
/// the hand-written layers' shapes differ): losses, per-example gradients and norms, with
/// each of `strategies` forced on `layers`.
fn assert_equals_twin(rel: &str, twin_src: &str, layers: &[&str], strategies: &[Strategy]) {
    assert_ne!(read(rel), twin_src, "{rel}: the twin replaced the hand-written layers");
    let b = 3;
    let twin = Module::from_source("twin", twin_src, &CompileOptions::new(b)).expect("twin compiles");
    let twin_params = twin.init_params(5);
    let hand = module(rel, b, vec![]);
    let mut params = twin_params.clone();
    for p in &hand.graph.params {
        let t = params.tensors.get_mut(&p.name).expect("same parameter names");
        assert_eq!(t.data.len() as u64, pdgc::graph::numel(&p.shape), "{}", p.name);
        t.shape = p.shape.clone();
    }
    let batch = Batch::random(&twin.graph, b, 17);
    let mut ts = twin.session(Device::Cpu).expect("session");
    let twin_loss = ts.loss(&twin_params, &batch).expect("loss");
    let twin_grads = ts.per_example_grads(&twin_params, &batch).expect("grads");
    let twin_norms = ts.per_example_norms(&twin_params, &batch).expect("norms");
    for &strategy in strategies {
        let forced = layers.iter().map(|l| (l.to_string(), strategy)).collect();
        let m = module(rel, b, forced);
        let mut s = m.session(Device::Cpu).expect("session");
        let loss = s.loss(&params, &batch).expect("loss");
        let expected: Vec<f64> = twin_loss.iter().map(|&x| x as f64).collect();
        assert!(rel_err(&loss, &expected) < 1e-5, "{rel} {strategy}: loss {loss:?} vs {twin_loss:?}");
        let grads = s.per_example_grads(&params, &batch).expect("grads");
        for (name, g) in &twin_grads {
            let expected: Vec<f64> = g.data.iter().map(|&x| x as f64).collect();
            let err = rel_err(&grads[name].data, &expected);
            assert!(err < 2e-5, "{rel} {strategy}: per-example {name} differs by {err:e}");
        }
        let norms = s.per_example_norms(&params, &batch).expect("norms");
        let expected: Vec<f64> = twin_norms.iter().map(|&x| x as f64).collect();
        assert!(rel_err(&norms, &expected) < 2e-5, "{rel} {strategy}: norms {norms:?} vs {twin_norms:?}");
    }
}
