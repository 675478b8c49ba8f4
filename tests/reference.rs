//! Proves the f64 reference evaluator (`pdgc::reference`), the oracle every other numerical
//! test trusts:
//!
//! 1. Finite differences, for every sample network (except the three ImageNet-sized ones,
//!    alexnet, vgg16 and resnet18_gn, replaced by the scaled-down residual GroupNorm block
//!    `tests/data/models/gn_residual_block.pdg`) and the geometry model
//!    `tests/data/models/conv_geometry.pdg` and the per-side padding model
//!    `tests/data/models/per_side_padding.pdg`, with seeded random parameters and inputs:
//!    - per-example gradients against central differences (ε = 1e-6) of each example's own
//!      loss, on up to 20 sampled entries of every parameter tensor (biases included) and
//!      along one random direction through the whole tensor;
//!    - the sum over examples of the per-example gradients against the finite-difference
//!      gradient of the summed loss (a few entries, and one random direction through all
//!      parameters at once).
//!
//!    Tolerance: `|fd − g| ≤ 1e-5 · max(|g|, 1e-3)`, i.e. a relative error of 1e-5 for entries
//!    above 1e-3 and an absolute one of 1e-8 below (central differences in f64 at ε = 1e-6
//!    carry rounding noise of about 1e-10 · |ℓ|, which no relative test can see through for
//!    entries near zero). Along a (unit) direction `v` the scale is `Σ|g_i v_i|` instead of
//!    `|g|`. A check that fails is retried once at ε/10, since ReLU and max-pool kinks inside
//!    [θ−ε, θ+ε] spoil a central difference (see `retry_at_kinks`).
//!
//! 2. PyTorch vectors: `tests/data/*.safetensors`, written by `tests/data/make_vectors.py`
//!    with `torch.func.vmap(torch.func.grad(loss))` in float64. The reference must reproduce
//!    each file's per-example `loss`, `output` and every `grad.<param>` from the same
//!    parameters, inputs and labels. Tolerance per tensor `t` (reference `a`, torch `b`):
//!    `|a − b| ≤ 1e-4 · max(|b|, 1e-3 · max|t_b|, 1e-8)`, i.e. a relative error of 1e-4, except
//!    for entries below a thousandth of the tensor's largest magnitude, which are held to that
//!    floor (they are the sums that cancel, where relative error means nothing), and an
//!    absolute 1e-12 for tensors that are zero up to rounding.
//!
//! Plus the reference's error paths (missing or misshapen parameters and inputs, bad labels).
//!
//! Tests compile pdgc without optimizations (about 3e8 FLOP/s for these loops), so by default
//! the number of single entries per tensor comes from a FLOP budget per model (see
//! `ENTRY_BUDGET_FLOPS`): the small models get all 20, the cifar and toy networks as few as 1
//! for their early layers, whose every finite difference reruns nearly the whole network. The
//! random-direction checks still cover every entry of every tensor. For all 20 entries
//! everywhere: `PDGC_REFERENCE_FULL=1 cargo test --release --test reference`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pdgc::graph::{numel, Graph, LabelSpec, NodeId, Op};
use pdgc::reference::{
    evaluate, finite_difference, finite_difference_along, finite_differences, loss_only, Batch, Labels, Output, Params,
    ReferenceError,
};

// ---------------------------------------------------------------------------------------------
// Helpers: a tiny seeded RNG, model loading, random parameters and batches.

/// SplitMix64: small, seedable, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn load_graph(rel: &str) -> Graph {
    let path = root().join(rel);
    let src = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let front = pdgc::compile_front(&src);
    front.graph.unwrap_or_else(|| panic!("{rel} does not check: {:?}", front.diagnostics))
}

/// PyTorch's default init for conv and linear (U(±1/√fan_in) for weight and bias); norm
/// weights 1 + 0.1·N(0,1) and biases 0.1·N(0,1) (PyTorch starts at 1 and 0; perturbing them
/// makes their gradients and their effect on the layers below non-trivial).
fn random_params(graph: &Graph, rng: &mut Rng) -> Params {
    let mut params = Params::new();
    for spec in &graph.params {
        let len = numel(&spec.shape) as usize;
        let node = graph.node(spec.node);
        let is_bias = spec.name.ends_with(".bias");
        let values: Vec<f64> = match &node.op {
            Op::Conv(c) => {
                let fan_in = c.in_channels / c.groups * c.kernel.iter().product::<usize>();
                let bound = 1.0 / (fan_in as f64).sqrt();
                (0..len).map(|_| rng.range(-bound, bound)).collect()
            }
            Op::Linear(l) => {
                let bound = 1.0 / (l.in_features as f64).sqrt();
                (0..len).map(|_| rng.range(-bound, bound)).collect()
            }
            // Layers written in index notation: uniform in ±1/√fan-in, the fan-in being the
            // elements of a parameter's trailing dims (as tests/data/make_vectors.py draws).
            Op::Index(_) => {
                let fan_in = spec.shape[1..].iter().product::<usize>().max(1);
                let bound = 1.0 / (fan_in as f64).sqrt();
                (0..len).map(|_| rng.range(-bound, bound)).collect()
            }
            _ if is_bias => (0..len).map(|_| 0.1 * rng.normal()).collect(),
            _ => (0..len).map(|_| 1.0 + 0.1 * rng.normal()).collect(),
        };
        params.insert(spec.name.clone(), values);
    }
    params
}

fn random_batch(graph: &Graph, size: usize, rng: &mut Rng) -> Batch {
    let mut inputs = BTreeMap::new();
    for node in graph.inputs() {
        let Op::Input { name } = &node.op else { unreachable!() };
        let len = size * numel(&node.shape) as usize;
        inputs.insert(name.clone(), (0..len).map(|_| rng.normal()).collect());
    }
    let labels = match &graph.label {
        LabelSpec::Classes { classes, .. } => Labels::Classes((0..size).map(|_| rng.below(*classes)).collect()),
        LabelSpec::Target { shape, .. } => {
            Labels::Target((0..size * numel(shape) as usize).map(|_| rng.normal()).collect())
        }
    };
    Batch { inputs, labels, size }
}

// ---------------------------------------------------------------------------------------------
// 1. Finite differences.

const EPS: f64 = 1e-6;
const FD_RTOL: f64 = 1e-5;
/// Below this magnitude an entry is compared absolutely (at FD_RTOL · FD_FLOOR).
const FD_FLOOR: f64 = 1e-3;

/// Relative error of `fd` against `g` at scale `scale` (≥ |g|), with the FD floor.
fn fd_error(fd: f64, g: f64, scale: f64) -> f64 {
    (fd - g).abs() / scale.max(FD_FLOOR)
}

struct FdReport {
    checked: usize,
    retried: usize,
    worst: f64,
    worst_at: String,
}

impl FdReport {
    fn new() -> Self {
        FdReport { checked: 0, retried: 0, worst: 0.0, worst_at: String::new() }
    }

    fn record(&mut self, err: f64, what: impl Fn() -> String, failures: &mut Vec<String>) {
        self.checked += 1;
        if err > self.worst {
            self.worst = err;
            self.worst_at = what();
        }
        if err > FD_RTOL {
            failures.push(format!("{} (relative error {err:.3e})", what()));
        }
    }
}

/// Sampled entries per parameter tensor (all of them when the tensor is smaller).
const ENTRIES: usize = 20;
/// The forward FLOPs the sampled entries of one model may cost, by default: the test
/// profile builds pdgc without optimizations (about 1e8 FLOP/s here), and each entry costs
/// two forward passes of every example from the parameter's layer on. Set
/// `PDGC_REFERENCE_FULL=1` to check ENTRIES entries of every tensor of every model (best with
/// `cargo test --release --test reference`).
const ENTRY_BUDGET_FLOPS: f64 = 2e9;

/// How many entries of a parameter of `node` to check: ENTRIES, or fewer where the share of
/// the budget of a parameter tensor does not pay for them (at least one).
fn entries(graph: &Graph, node: NodeId, batch: usize) -> usize {
    if std::env::var_os("PDGC_REFERENCE_FULL").is_some_and(|v| v != "0") {
        return ENTRIES;
    }
    let suffix: u64 = graph.nodes[node.index()..].iter().map(|n| n.flops).sum();
    let per_entry = 2.0 * batch as f64 * suffix as f64;
    let share = ENTRY_BUDGET_FLOPS / graph.params.len() as f64;
    ((share / per_entry) as usize).clamp(1, ENTRIES)
}

/// How many single entries to check against the finite difference of the summed loss (each
/// costs two full forward passes of the batch): 3, or 1 for the large samples by default.
fn sum_entries(graph: &Graph, batch: usize) -> usize {
    if std::env::var_os("PDGC_REFERENCE_FULL").is_some_and(|v| v != "0") {
        return 3;
    }
    let per_entry = 2.0 * batch as f64 * graph.flops() as f64;
    ((ENTRY_BUDGET_FLOPS / 4.0 / per_entry) as usize).clamp(1, 3)
}

/// `v / ‖v‖`. Random directions have unit norm, so that a step of ε along one moves each
/// pre-activation no more than a step of ε along one parameter does (a longer step would
/// straddle more ReLU and max-pool kinks).
fn unit(v: Vec<f64>) -> Vec<f64> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

/// Every check of section 1 for one model.
fn check_finite_differences(rel: &str, batch_size: usize, seed: u64) {
    let started = std::time::Instant::now();
    let graph = load_graph(rel);
    let mut rng = Rng(seed);
    let params = random_params(&graph, &mut rng);
    let batch = random_batch(&graph, batch_size, &mut rng);
    let out = evaluate(&graph, &params, &batch).expect("evaluate");
    let b = batch.size;
    assert_eq!(out.loss.len(), b);
    assert!(out.loss.iter().all(|l| l.is_finite()), "{rel}: non-finite loss {:?}", out.loss);
    // The forward of `evaluate` and of `loss_only` are the same computation.
    assert_eq!(loss_only(&graph, &params, &batch).unwrap(), out.loss, "{rel}: loss_only");

    let mut report = FdReport::new();
    let mut failures = Vec::new();
    for spec in &graph.params {
        let len = numel(&spec.shape) as usize;
        let g = &out.grads[&spec.name];
        assert_eq!(g.len(), b * len, "{rel}: {} gradient length", spec.name);
        assert!(g.iter().any(|&v| v != 0.0), "{rel}: {} has an all-zero gradient", spec.name);

        // Sampled single entries, per example.
        let idx = sample_indices(len, entries(&graph, spec.node, b), &mut rng);
        let all_fd = finite_differences(&graph, &params, &batch, &spec.name, &idx, EPS).unwrap();
        for (&i, fd) in idx.iter().zip(all_fd) {
            let want: Vec<(f64, f64)> = (0..b).map(|n| (g[n * len + i], g[n * len + i].abs())).collect();
            let retry = |eps| finite_difference(&graph, &params, &batch, &spec.name, i, eps).unwrap();
            let fd = retry_at_kinks(fd, retry, &want, &mut report);
            for n in 0..b {
                let gn = g[n * len + i];
                report.record(
                    fd_error(fd[n], gn, gn.abs()),
                    || format!("{rel}: {}[{i}] example {n}: fd {:.12e} vs grad {gn:.12e}", spec.name, fd[n]),
                    &mut failures,
                );
            }
        }

        // One random direction through the whole tensor, per example.
        let v = unit((0..len).map(|_| rng.normal()).collect());
        let want: Vec<(f64, f64)> = (0..b)
            .map(|n| {
                let gn = &g[n * len..(n + 1) * len];
                let dot: f64 = gn.iter().zip(&v).map(|(a, b)| a * b).sum();
                let scale: f64 = gn.iter().zip(&v).map(|(a, b)| (a * b).abs()).sum();
                (dot, scale)
            })
            .collect();
        let fd = |eps| finite_difference_along(&graph, &params, &batch, &spec.name, &v, eps).unwrap();
        let fd = retry_at_kinks(fd(EPS), fd, &want, &mut report);
        for n in 0..b {
            let (dot, scale) = want[n];
            report.record(
                fd_error(fd[n], dot, scale),
                || {
                    format!(
                        "{rel}: {} along a random direction, example {n}: fd {:.12e} vs ⟨grad, v⟩ {dot:.12e}",
                        spec.name, fd[n]
                    )
                },
                &mut failures,
            );
        }
    }

    // The sum over examples of the per-example gradients is the gradient of the summed loss:
    // a few single entries ...
    let summed_loss = |p: &Params| -> f64 { loss_only(&graph, p, &batch).unwrap().iter().sum() };
    let mut sum_checks = 0;
    let sum_entries = sum_entries(&graph, b);
    let stride = (graph.params.len() / sum_entries).max(1);
    for spec in graph.params.iter().rev().step_by(stride).take(sum_entries) {
        let len = numel(&spec.shape) as usize;
        let i = rng.below(len);
        let sum: f64 = (0..b).map(|n| out.grads[&spec.name][n * len + i]).sum();
        let fd = |eps: f64| {
            let mut plus = params.clone();
            let mut minus = params.clone();
            plus.get_mut(&spec.name).unwrap()[i] += eps;
            minus.get_mut(&spec.name).unwrap()[i] -= eps;
            let step = plus[&spec.name][i] - minus[&spec.name][i];
            vec![(summed_loss(&plus) - summed_loss(&minus)) / step]
        };
        let fd = retry_at_kinks(fd(EPS), fd, &[(sum, sum.abs())], &mut report)[0];
        report.record(
            fd_error(fd, sum, sum.abs()),
            || format!("{rel}: Σ_n grad {}[{i}] {sum:.12e} vs fd of Σ_n loss {fd:.12e}", spec.name),
            &mut failures,
        );
        sum_checks += 1;
    }
    // ... and one random direction through all parameters at once.
    let mut dirs: BTreeMap<&str, Vec<f64>> =
        graph.params.iter().map(|p| (p.name.as_str(), (0..numel(&p.shape)).map(|_| rng.normal()).collect())).collect();
    let norm = dirs.values().flatten().map(|v| v * v).sum::<f64>().sqrt();
    dirs.values_mut().flatten().for_each(|v| *v /= norm);
    let shifted = |eps: f64, sign: f64| -> Params {
        let mut p = params.clone();
        for (name, v) in &dirs {
            for (t, d) in p.get_mut(*name).unwrap().iter_mut().zip(v) {
                *t += sign * eps * d;
            }
        }
        p
    };
    let (mut dot, mut scale) = (0.0, 0.0);
    for (name, v) in &dirs {
        let len = v.len();
        for n in 0..b {
            for (gi, vi) in out.grads[*name][n * len..(n + 1) * len].iter().zip(v) {
                dot += gi * vi;
                scale += (gi * vi).abs();
            }
        }
    }
    let fd = |eps: f64| vec![(summed_loss(&shifted(eps, 1.0)) - summed_loss(&shifted(eps, -1.0))) / (2.0 * eps)];
    let fd = retry_at_kinks(fd(EPS), fd, &[(dot, scale)], &mut report)[0];
    report.record(
        fd_error(fd, dot, scale),
        || format!("{rel}: Σ_n grad along a random direction of all params {dot:.12e} vs fd of Σ_n loss {fd:.12e}"),
        &mut failures,
    );

    eprintln!(
        "{rel}: B={b}, {} parameter tensors, {} finite-difference checks ({sum_checks} + 1 of the summed loss), \
         {} retried at ε/10, max relative error {:.2e} at {} ({:.1} s)",
        graph.params.len(),
        report.checked,
        report.retried,
        report.worst,
        report.worst_at,
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{rel}: {} of {} finite-difference checks fail:\n{}",
        failures.len(),
        report.checked,
        failures.join("\n")
    );
}

/// Central differences `values` (taken at ε), retried with `fd(ε/10)` where one misses its
/// target `(value, scale)`.
///
/// ReLU, leaky ReLU and max-pool have kinks: a central difference whose interval [θ−ε, θ+ε]
/// moves some pre-activation across 0 (or changes a pooling window's argmax) is off by up to
/// the jump in slope, however right the gradient is. The chance of straddling a kink shrinks
/// with ε, while at ε/10 the rounding noise (≈ 1e-9 · |ℓ|) still stays under the tolerance,
/// so a genuine gradient error fails both times.
fn retry_at_kinks(
    mut values: Vec<f64>,
    fd: impl Fn(f64) -> Vec<f64>,
    want: &[(f64, f64)],
    report: &mut FdReport,
) -> Vec<f64> {
    let bad: Vec<usize> = (0..want.len()).filter(|&n| fd_error(values[n], want[n].0, want[n].1) > FD_RTOL).collect();
    if !bad.is_empty() {
        let again = fd(EPS / 10.0);
        for n in bad {
            values[n] = again[n];
            report.retried += 1;
        }
    }
    values
}

/// `k` distinct indices below `len` (all of them if `len ≤ k`), always including the first
/// and the last.
fn sample_indices(len: usize, k: usize, rng: &mut Rng) -> Vec<usize> {
    if len <= k {
        return (0..len).collect();
    }
    let mut idx = vec![0, len - 1];
    while idx.len() < k {
        let i = rng.below(len);
        if !idx.contains(&i) {
            idx.push(i);
        }
    }
    idx
}

/// The samples covered here, and those left out (with the model that stands in for them).
const FD_SAMPLES: &[&str] = &[
    "mnist_cnn",
    "cifar_cnn",
    "conv1d_net",
    "depthwise_separable",
    "regression_mlp_ln",
    "toy_l2_r4_k3",
    "toy_l3_r2_k5",
    "toy_l4_r2_k3",
    "depthwise_index",
    "gated_bilinear",
];
const TOO_LARGE: &[&str] = &["alexnet", "vgg16", "resnet18_gn"];

#[test]
fn every_sample_is_covered_or_explicitly_excluded() {
    let mut names: Vec<String> = std::fs::read_dir(root().join("samples"))
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            (path.extension()? == "pdg").then(|| path.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    for name in &names {
        assert!(
            FD_SAMPLES.contains(&name.as_str()) || TOO_LARGE.contains(&name.as_str()),
            "samples/{name}.pdg has no finite-difference test in tests/reference.rs"
        );
    }
}

#[test]
fn fd_mnist_cnn() {
    check_finite_differences("samples/mnist_cnn.pdg", 3, 1);
}

#[test]
fn fd_cifar_cnn() {
    check_finite_differences("samples/cifar_cnn.pdg", 2, 2);
}

#[test]
fn fd_conv1d_net() {
    check_finite_differences("samples/conv1d_net.pdg", 3, 3);
}

#[test]
fn fd_depthwise_separable() {
    check_finite_differences("samples/depthwise_separable.pdg", 2, 4);
}

#[test]
fn fd_regression_mlp_ln() {
    check_finite_differences("samples/regression_mlp_ln.pdg", 3, 5);
}

#[test]
fn fd_toy_l2_r4_k3() {
    check_finite_differences("samples/toy_l2_r4_k3.pdg", 2, 6);
}

#[test]
fn fd_toy_l3_r2_k5() {
    check_finite_differences("samples/toy_l3_r2_k5.pdg", 2, 7);
}

#[test]
fn fd_toy_l4_r2_k3() {
    check_finite_differences("samples/toy_l4_r2_k3.pdg", 2, 8);
}

#[test]
fn fd_gn_residual_block() {
    check_finite_differences("tests/data/models/gn_residual_block.pdg", 3, 9);
}

#[test]
fn fd_per_side_padding() {
    check_finite_differences("tests/data/models/per_side_padding.pdg", 3, 12);
}

#[test]
fn fd_conv_geometry() {
    check_finite_differences("tests/data/models/conv_geometry.pdg", 3, 10);
}

#[test]
fn fd_hardswish_net() {
    check_finite_differences("tests/data/models/hardswish_net.pdg", 3, 11);
}

#[test]
fn fd_depthwise_index() {
    check_finite_differences("samples/depthwise_index.pdg", 2, 13);
}

#[test]
fn fd_gated_bilinear() {
    check_finite_differences("samples/gated_bilinear.pdg", 3, 14);
}

// ---------------------------------------------------------------------------------------------
// 2. PyTorch vectors.

/// A float tensor read from a safetensors file (F64, F32 or I64, little-endian), as f64.
struct Tensor {
    shape: Vec<usize>,
    data: Vec<f64>,
}

fn read_tensor(st: &safetensors::SafeTensors<'_>, name: &str) -> Tensor {
    use safetensors::Dtype;
    let view = st.tensor(name).unwrap_or_else(|e| panic!("tensor `{name}`: {e}"));
    let bytes = view.data();
    let data: Vec<f64> = match view.dtype() {
        Dtype::F64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        Dtype::I64 => bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        other => panic!("tensor `{name}`: unexpected dtype {other:?}"),
    };
    assert_eq!(data.len(), view.shape().iter().product::<usize>(), "tensor `{name}`");
    Tensor { shape: view.shape().to_vec(), data }
}

/// Per-tensor comparison: `|a − b| ≤ TORCH_RTOL · max(|b|, 1e-3 · max|b|, TORCH_FLOOR)`.
/// Returns the worst scaled error.
const TORCH_RTOL: f64 = 1e-4;
/// Magnitudes below this count as zero (an absolute tolerance of 1e-12): a gradient that is
/// zero mathematically is rounding noise in practice (e.g. the affine parameters of a norm
/// layer followed directly by a per-channel norm, which cancels them).
const TORCH_FLOOR: f64 = 1e-8;

fn compare(what: &str, ours: &[f64], torch: &[f64], failures: &mut Vec<String>) -> f64 {
    assert_eq!(ours.len(), torch.len(), "{what}: length");
    let peak = torch.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let floor = (1e-3 * peak).max(TORCH_FLOOR);
    let mut worst: f64 = 0.0;
    let mut worst_at = 0;
    for (i, (a, b)) in ours.iter().zip(torch).enumerate() {
        let err = (a - b).abs() / b.abs().max(floor);
        let err = if err.is_nan() { f64::INFINITY } else { err };
        if err > worst {
            worst = err;
            worst_at = i;
        }
    }
    if worst > TORCH_RTOL {
        failures.push(format!(
            "{what}: relative error {worst:.3e} at [{worst_at}]: ours {:.12e}, torch {:.12e}",
            ours[worst_at], torch[worst_at]
        ));
    }
    worst
}

fn check_torch_vectors(file: &str) {
    let path: PathBuf = root().join("tests/data").join(file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors header");
    let meta = meta.metadata().clone().expect("metadata with the model path");
    let model = &meta["model"];
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let graph = load_graph(model);

    let loss = read_tensor(&st, "loss");
    let b = loss.shape[0];
    let mut inputs = BTreeMap::new();
    for node in graph.inputs() {
        let Op::Input { name } = &node.op else { unreachable!() };
        let t = read_tensor(&st, name);
        let mut expect = vec![b];
        expect.extend(&node.shape);
        assert_eq!(t.shape, expect, "{file}: input `{name}` shape");
        inputs.insert(name.clone(), t.data);
    }
    let label = read_tensor(&st, graph.label.name());
    let labels = match &graph.label {
        LabelSpec::Classes { .. } => Labels::Classes(label.data.iter().map(|&y| y as usize).collect()),
        LabelSpec::Target { .. } => Labels::Target(label.data),
    };
    let params: Params = graph
        .params
        .iter()
        .map(|p| {
            let t = read_tensor(&st, &p.name);
            assert_eq!(t.shape, p.shape, "{file}: parameter `{}` shape", p.name);
            (p.name.clone(), t.data)
        })
        .collect();
    let batch = Batch { inputs, labels, size: b };
    let out: Output = evaluate(&graph, &params, &batch).expect("evaluate");

    let mut failures = Vec::new();
    let mut worst = Vec::new();
    worst.push(("loss".to_string(), compare(&format!("{file}: loss"), &out.loss, &loss.data, &mut failures)));
    let output = read_tensor(&st, "output");
    worst.push(("output".to_string(), compare(&format!("{file}: output"), &out.output, &output.data, &mut failures)));
    for p in &graph.params {
        let name = format!("grad.{}", p.name);
        let t = read_tensor(&st, &name);
        let mut expect = vec![b];
        expect.extend(&p.shape);
        assert_eq!(t.shape, expect, "{file}: `{name}` shape");
        let w = compare(&format!("{file}: {name}"), &out.grads[&p.name], &t.data, &mut failures);
        worst.push((name, w));
    }
    let (at, max) = worst.iter().fold(("", 0.0f64), |(a, m), (n, w)| if *w > m { (n.as_str(), *w) } else { (a, m) });
    eprintln!(
        "{file} ({model}, torch {}): B={b}, {} tensors compared, max relative error {max:.2e} ({at})",
        meta.get("torch").map_or("?", |s| s.as_str()),
        worst.len()
    );
    assert!(failures.is_empty(), "{file}:\n{}", failures.join("\n"));
}

#[test]
fn torch_mnist_cnn() {
    check_torch_vectors("mnist_cnn.safetensors");
}

#[test]
fn torch_cifar_cnn() {
    check_torch_vectors("cifar_cnn.safetensors");
}

#[test]
fn torch_conv1d_net() {
    check_torch_vectors("conv1d_net.safetensors");
}

#[test]
fn torch_depthwise_separable() {
    check_torch_vectors("depthwise_separable.safetensors");
}

#[test]
fn torch_regression_mlp_ln() {
    check_torch_vectors("regression_mlp_ln.safetensors");
}

#[test]
fn torch_gn_residual_block() {
    check_torch_vectors("gn_residual_block.safetensors");
}

#[test]
fn torch_conv_geometry() {
    check_torch_vectors("conv_geometry.safetensors");
}

#[test]
fn torch_hardswish_net() {
    check_torch_vectors("hardswish_net.safetensors");
}

#[test]
fn torch_per_side_padding() {
    check_torch_vectors("per_side_padding.safetensors");
}

#[test]
fn torch_depthwise_index() {
    check_torch_vectors("depthwise_index.safetensors");
}

#[test]
fn torch_gated_bilinear() {
    check_torch_vectors("gated_bilinear.safetensors");
}

/// Every vector file in tests/data has a test above (a new one must be added there).
#[test]
fn every_vector_file_is_tested() {
    const TESTED: &[&str] = &[
        "mnist_cnn",
        "cifar_cnn",
        "conv1d_net",
        "depthwise_separable",
        "regression_mlp_ln",
        "gn_residual_block",
        "conv_geometry",
        "hardswish_net",
        "per_side_padding",
        "depthwise_index",
        "gated_bilinear",
    ];
    for entry in std::fs::read_dir(root().join("tests/data")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let stem = path.file_stem().unwrap().to_string_lossy();
            assert!(TESTED.contains(&stem.as_ref()), "{} has no test", path.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Error paths.

fn small() -> (Graph, Params, Batch) {
    let graph = load_graph("samples/conv1d_net.pdg");
    let mut rng = Rng(42);
    let params = random_params(&graph, &mut rng);
    let batch = random_batch(&graph, 2, &mut rng);
    (graph, params, batch)
}

#[test]
fn missing_and_misshapen_parameters_are_errors() {
    let (graph, mut params, batch) = small();
    params.remove("conv2.bias");
    assert_eq!(evaluate(&graph, &params, &batch).unwrap_err(), ReferenceError::MissingParam("conv2.bias".into()));
    let (graph, mut params, batch) = small();
    params.get_mut("gn3.weight").unwrap().pop();
    assert_eq!(
        loss_only(&graph, &params, &batch).unwrap_err(),
        ReferenceError::ParamLength { name: "gn3.weight".into(), expected: 32, got: 31 }
    );
}

#[test]
fn missing_and_misshapen_inputs_are_errors() {
    let (graph, params, mut batch) = small();
    batch.inputs.get_mut("signal").unwrap().push(0.0);
    assert!(matches!(
        evaluate(&graph, &params, &batch).unwrap_err(),
        ReferenceError::InputLength { expected: 256, got: 257, .. }
    ));
    batch.inputs.clear();
    assert_eq!(evaluate(&graph, &params, &batch).unwrap_err(), ReferenceError::MissingInput("signal".into()));
}

#[test]
fn bad_labels_are_errors() {
    let (graph, params, mut batch) = small();
    batch.labels = Labels::Classes(vec![1, 5]);
    assert_eq!(
        evaluate(&graph, &params, &batch).unwrap_err(),
        ReferenceError::LabelOutOfRange { example: 1, label: 5, classes: 5 }
    );
    batch.labels = Labels::Classes(vec![1]);
    assert!(matches!(
        evaluate(&graph, &params, &batch).unwrap_err(),
        ReferenceError::LabelLength { expected: 2, got: 1, .. }
    ));
    batch.labels = Labels::Target(vec![0.0; 10]);
    assert!(matches!(evaluate(&graph, &params, &batch).unwrap_err(), ReferenceError::LabelKind { .. }));
}

#[test]
fn finite_difference_rejects_bad_indices() {
    let (graph, params, batch) = small();
    assert!(matches!(
        finite_difference(&graph, &params, &batch, "fc.bias", 5, EPS).unwrap_err(),
        ReferenceError::ParamIndex { index: 5, len: 5, .. }
    ));
    assert_eq!(
        finite_difference(&graph, &params, &batch, "nope.weight", 0, EPS).unwrap_err(),
        ReferenceError::MissingParam("nope.weight".into())
    );
}

#[test]
fn an_empty_batch_is_fine() {
    let (graph, params, mut batch) = small();
    batch.size = 0;
    batch.inputs.insert("signal".into(), vec![]);
    batch.labels = Labels::Classes(vec![]);
    let out = evaluate(&graph, &params, &batch).unwrap();
    assert!(out.loss.is_empty() && out.output.is_empty());
    assert!(out.grads.values().all(|g| g.is_empty()));
}
