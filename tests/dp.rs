//! The DP-SGD step, statistically: without noise it is the clipped sum over the expected
//! batch size; each example's contribution is bounded by C; the noise has mean 0 and
//! standard deviation σ·C/B_expected; micro-batching changes nothing; empty batches are
//! noise-only steps; Poisson batch sizes are Binomial(N, q); everything is reproducible
//! from the seed; SGD with momentum and Adam match hand-computed updates.
//!
//! Statistical tolerances are 5 standard errors (a false failure about once in 1.7 million
//! runs), and the streams are seeded, so each test is deterministic.

use pdgc::data::Dataset;
use pdgc::dp::{self, batch_len, stream, Purpose};
use pdgc::{Batch, CompileOptions, Device, DpSettings, Error, Module, Optimizer, OptimizerState, Params, Sampling};
use pdgc::{Labels, Tensor, TensorMap};

const TINY: &str = "
model tiny {
    input x: [1, 6, 6];
    label y: classes(10);
    h = tanh(conv: conv2d(x, 2, kernel=3));
    logits = fc: linear(flatten(h), 10);
    loss cross_entropy(logits, y);
}
";

fn tiny(batch: usize) -> Module {
    Module::from_source("tiny.pdg", TINY, &CompileOptions::new(batch)).expect("compiles")
}

/// A batch whose examples have gradient norms spread over an order of magnitude.
fn spread_batch(module: &Module, n: usize, seed: u64) -> Batch {
    let mut b = Batch::random(&module.graph, n, seed);
    let x = b.inputs.get_mut("x").expect("x");
    for (i, v) in x.data.iter_mut().enumerate() {
        *v *= 0.2 + (i / 36) as f32 * 0.4;
    }
    b
}

fn sgd(lr: f32) -> Optimizer {
    Optimizer::Sgd { lr, momentum: 0.0 }
}

fn diff(a: &Params, b: &Params) -> TensorMap {
    a.tensors
        .iter()
        .map(|(k, t)| {
            let d = t.data.iter().zip(&b.tensors[k].data).map(|(x, y)| x - y).collect();
            (k.clone(), Tensor::new(t.shape.clone(), d))
        })
        .collect()
}

fn flat(m: &TensorMap) -> Vec<f32> {
    m.values().flat_map(|t| t.data.iter().copied()).collect()
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
    }
}

#[test]
fn without_noise_the_update_is_the_clipped_sum_over_the_expected_batch() {
    let module = tiny(16);
    let mut session = module.session(Device::Cpu).expect("session");
    let params = module.init_params(1);
    let batch = spread_batch(&module, 10, 2);
    let norms = session.per_example_norms(&params, &batch).expect("norms");
    let mut sorted = norms.clone();
    sorted.sort_by(f32::total_cmp);
    let clip = sorted[5];
    let expected = session.clipped_grad_sum(&params, &batch, clip).expect("clipped sum");

    let (lr, b_expected) = (0.3f32, 12.5f64);
    let dp = DpSettings { clip, noise_multiplier: 0.0, expected_batch: b_expected };
    let mut after = params.clone();
    let mut state = OptimizerState::default();
    let report = session
        .dp_sgd_step(&mut after, &batch, &dp, &sgd(lr), &mut state, &mut stream(0, Purpose::Noise, 0, 0))
        .expect("step");
    let update = flat(&diff(&after, &params));
    let want: Vec<f32> = flat(&expected.sum).iter().map(|&s| -lr * (s / b_expected as f32)).collect();
    assert_close(&update, &want, 1e-5, "update");
    assert!(norm(&update) > 1e-3, "the step did something");
    assert_eq!(report.batch_size, 10);
    assert_eq!(report.norms, expected.norms);
    assert_eq!(report.losses, expected.loss);
    // Norms above the median are clipped: 4 of 10 (the median itself is not).
    assert!((report.clipped_fraction - 0.4).abs() < 1e-6, "{}", report.clipped_fraction);
    let mean = expected.loss.iter().sum::<f32>() / 10.0;
    assert!((report.loss_mean().expect("loss") - mean).abs() < 1e-5);
}

#[test]
fn every_per_example_contribution_is_bounded_by_the_clip_norm() {
    let module = tiny(16);
    let mut session = module.session(Device::Cpu).expect("session");
    let params = module.init_params(3);
    let batch = spread_batch(&module, 12, 4);
    let grads = session.per_example_grads(&params, &batch).expect("grads");
    let norms = session.per_example_norms(&params, &batch).expect("norms");
    let clip = 0.5 * (norms.iter().copied().fold(f32::INFINITY, f32::min) + norms.iter().copied().fold(0.0, f32::max));
    let dp = DpSettings { clip, noise_multiplier: 0.0, expected_batch: 1.0 };
    let (mut clipped, mut unclipped) = (0, 0);
    for n in 0..12 {
        let g_n: Vec<f32> =
            grads.values().flat_map(|t| t.data[n * t.data.len() / 12..(n + 1) * t.data.len() / 12].to_vec()).collect();
        let g_norm = norm(&g_n);
        assert!((g_norm - norms[n] as f64).abs() < 1e-4 * g_norm, "norm of example {n}");
        let mut after = params.clone();
        session
            .dp_sgd_step(
                &mut after,
                &batch.slice(n, n + 1),
                &dp,
                &sgd(1.0),
                &mut OptimizerState::default(),
                &mut stream(0, Purpose::Noise, 0, 0),
            )
            .expect("step");
        let contribution: Vec<f32> = flat(&diff(&params, &after));
        let c_norm = norm(&contribution);
        assert!(c_norm <= clip as f64 * (1.0 + 1e-5), "example {n}: contribution {c_norm} > C = {clip}");
        let factor = (clip / (norms[n] + 1e-6)).min(1.0);
        let want: Vec<f32> = g_n.iter().map(|&g| g * factor).collect();
        assert_close(&contribution, &want, 1e-5, "clipped gradient");
        if g_norm > clip as f64 {
            clipped += 1;
            assert!((c_norm - clip as f64).abs() < 1e-4 * clip as f64, "a clipped example has norm C");
        } else {
            unclipped += 1;
        }
    }
    assert!(clipped > 0 && unclipped > 0, "both cases seen: {clipped} clipped, {unclipped} not");
}

/// The noise of `steps` steps, each from the same parameters: `−Δp/lr − sum/B`.
fn noise_samples(sigma: f64, clip: f32, b_expected: f64, steps: u64, seed: u64) -> Vec<f64> {
    let module = tiny(8);
    let mut session = module.session(Device::Cpu).expect("session");
    let params = module.init_params(5);
    let batch = spread_batch(&module, 6, 6);
    let sum = flat(&session.clipped_grad_sum(&params, &batch, clip).expect("sum").sum);
    let dp = DpSettings { clip, noise_multiplier: sigma, expected_batch: b_expected };
    let mut out = Vec::new();
    for step in 0..steps {
        let mut after = params.clone();
        session
            .dp_sgd_step(
                &mut after,
                &batch,
                &dp,
                &sgd(1.0),
                &mut OptimizerState::default(),
                &mut stream(seed, Purpose::Noise, 0, step),
            )
            .expect("step");
        for (d, s) in flat(&diff(&params, &after)).iter().zip(&sum) {
            out.push(*d as f64 - *s as f64 / b_expected);
        }
    }
    out
}

#[test]
fn noise_has_mean_zero_and_std_sigma_c_over_the_expected_batch() {
    let (sigma, clip, b_expected) = (1.3, 0.7f32, 5.0);
    let want_std = sigma * clip as f64 / b_expected;
    let x = noise_samples(sigma, clip, b_expected, 100, 11);
    let n = x.len() as f64;
    assert!(n > 10_000.0, "{n} samples");
    let mean = x.iter().sum::<f64>() / n;
    let std = (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    // SE(mean) = s/√n; SE(std) ≈ s/√(2n) for a normal sample.
    assert!(mean.abs() < 5.0 * want_std / n.sqrt(), "mean {mean}, std {want_std}");
    assert!((std - want_std).abs() < 5.0 * want_std / (2.0 * n).sqrt(), "std {std}, want {want_std}");
    // Gaussian shape: P(|z| < 1) = 0.6827, P(|z| < 2) = 0.9545.
    for (k, p) in [(1.0, 0.682_689), (2.0, 0.954_500)] {
        let frac = x.iter().filter(|v| v.abs() < k * want_std).count() as f64 / n;
        assert!((frac - p).abs() < 5.0 * (p * (1.0 - p) / n).sqrt(), "P(|z| < {k}) = {frac}, want {p}");
    }
    // Independent coordinates: the lag-1 correlation is within 5/√n of 0.
    let r = x.windows(2).map(|w| w[0] * w[1]).sum::<f64>() / (n - 1.0) / (want_std * want_std);
    assert!(r.abs() < 5.0 / n.sqrt(), "lag-1 correlation {r}");
}

#[test]
fn noise_is_reproducible_from_the_stream_and_differs_between_streams() {
    let a = noise_samples(1.0, 1.0, 2.0, 2, 7);
    let b = noise_samples(1.0, 1.0, 2.0, 2, 7);
    let c = noise_samples(1.0, 1.0, 2.0, 2, 8);
    assert_eq!(a, b);
    let half = a.len() / 2;
    assert!(a[..half].iter().zip(&a[half..]).all(|(x, y)| x != y), "two steps draw different noise");
    assert!(a.iter().zip(&c).all(|(x, y)| x != y), "two seeds draw different noise");
}

#[test]
fn a_micro_batched_step_equals_the_one_shot_step() {
    let small = tiny(4);
    let large = tiny(32);
    let params = small.init_params(9);
    let batch = spread_batch(&small, 13, 10);
    let dp = DpSettings { clip: 0.8, noise_multiplier: 0.9, expected_batch: 12.0 };
    let opt = Optimizer::Sgd { lr: 0.5, momentum: 0.9 };
    let mut results = Vec::new();
    for module in [&small, &large] {
        let mut session = module.session(Device::Cpu).expect("session");
        let mut p = params.clone();
        let report = session
            .dp_sgd_step(
                &mut p,
                &batch,
                &dp,
                &opt,
                &mut OptimizerState::default(),
                &mut stream(3, Purpose::Noise, 1, 2),
            )
            .expect("step");
        results.push((flat(&p.tensors), report));
    }
    assert_close(&results[0].0, &results[1].0, 1e-6, "params");
    assert_close(&results[0].1.norms, &results[1].1.norms, 1e-6, "norms");
    assert_eq!(results[0].1.batch_size, 13);
    // The small session really was too small for the batch.
    let err = small.session(Device::Cpu).expect("session").clipped_grad_sum(&params, &batch, 0.8).expect_err("13 > 4");
    assert!(matches!(err, Error::BatchTooLarge { batch: 13, max: 4 }), "{err}");
}

fn empty_batch(module: &Module) -> Batch {
    let mut inputs = TensorMap::new();
    inputs.insert("x".into(), Tensor::new(vec![0, 1, 6, 6], vec![]));
    let b = Batch { inputs, labels: Labels::Classes(vec![]) };
    assert_eq!(batch_len(&b), 0);
    let _ = module;
    b
}

#[test]
fn an_empty_batch_is_a_noise_only_step() {
    let module = tiny(4);
    let mut session = module.session(Device::Cpu).expect("session");
    let params = module.init_params(2);
    let batch = empty_batch(&module);

    let quiet = DpSettings { clip: 1.0, noise_multiplier: 0.0, expected_batch: 3.0 };
    let mut p = params.clone();
    let report = session
        .dp_sgd_step(
            &mut p,
            &batch,
            &quiet,
            &sgd(1.0),
            &mut OptimizerState::default(),
            &mut stream(0, Purpose::Noise, 0, 0),
        )
        .expect("empty step");
    assert_eq!(p, params, "no noise, no examples: no change");
    assert_eq!((report.batch_size, report.loss_mean(), report.clipped_fraction), (0, None, 0.0));

    let noisy = DpSettings { clip: 0.5, noise_multiplier: 2.0, expected_batch: 4.0 };
    let mut p = params.clone();
    session
        .dp_sgd_step(
            &mut p,
            &batch,
            &noisy,
            &sgd(1.0),
            &mut OptimizerState::default(),
            &mut stream(4, Purpose::Noise, 0, 0),
        )
        .expect("empty step");
    let update = flat(&diff(&params, &p));
    let mut want: TensorMap = params.tensors.iter().map(|(k, t)| (k.clone(), Tensor::zeros(t.shape.clone()))).collect();
    dp::add_noise_and_scale(&mut want, 2.0 * 0.5, 4.0, &mut stream(4, Purpose::Noise, 0, 0));
    assert_close(&update, &flat(&want), 1e-5, "noise-only update");
    assert!(update.iter().all(|&u| u != 0.0), "every coordinate got noise");
}

/// An empty batch (Poisson sampling draws them) is valid for every entry point, as in PyTorch
/// and Opacus: empty per-example outputs, zero sums. A full batch runs first so that stale
/// buffers would show.
#[test]
fn every_entry_point_accepts_an_empty_batch() {
    let module = tiny(4);
    let params = module.init_params(3);
    let full = spread_batch(&module, 4, 1);
    let empty = full.slice(0, 0);
    assert_eq!(empty.size().expect("an empty batch has a size"), 0);
    for device in [Device::Cpu, Device::Interpreter] {
        let mut s = module.session(device).expect("session");
        let cs = s.clipped_grad_sum(&params, &full, 0.1).expect("full batch");
        assert!(cs.sum.values().any(|t| t.data.iter().any(|&x| x != 0.0)), "the full batch has a non-zero sum");
        s.batch_grad(&params, &full).expect("full batch");

        assert!(s.loss(&params, &empty).expect("loss").is_empty());
        assert!(s.per_example_norms(&params, &empty).expect("norms").is_empty());
        let grads = s.per_example_grads(&params, &empty).expect("grads");
        let cs = s.clipped_grad_sum(&params, &empty, 0.1).expect("clipped sum");
        let bg = s.batch_grad(&params, &empty).expect("batch grad");
        assert!(cs.norms.is_empty() && cs.loss.is_empty());
        for (name, p) in &params.tensors {
            let mut per_example = vec![0];
            per_example.extend(&p.shape);
            assert_eq!(grads[name].shape, per_example, "{name}");
            assert!(grads[name].data.is_empty());
            assert_eq!(cs.sum[name], Tensor::zeros(p.shape.clone()), "{name}");
            assert_eq!(bg[name], Tensor::zeros(p.shape.clone()), "{name}");
        }
        let out = s.forward(&params, &empty).expect("forward");
        assert_eq!(out.shape, vec![0, 10]);
        // The session still works on a full batch afterwards.
        let again = s.clipped_grad_sum(&params, &full, 0.1).expect("full batch again");
        assert_close(&flat(&again.sum), &flat(&s.clipped_grad_sum(&params, &full, 0.1).expect("x").sum), 0.0, "sum");
    }
}

#[test]
fn poisson_batch_sizes_are_binomial_with_mean_qn() {
    let (n, q, steps) = (1000usize, 0.05, 2000u64);
    let sampling = Sampling::Poisson { rate: q };
    let mut sizes = Vec::new();
    let mut hits = vec![0u32; n];
    for step in 0..steps {
        let idx = sampling.indices(n, 17, 0, step);
        assert!(idx.windows(2).all(|w| w[0] < w[1]) && idx.iter().all(|&i| i < n));
        for &i in &idx {
            hits[i] += 1;
        }
        sizes.push(idx.len() as f64);
    }
    let k = steps as f64;
    let mean = sizes.iter().sum::<f64>() / k;
    let var = sizes.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (k - 1.0);
    let (want_mean, want_var) = (q * n as f64, q * (1.0 - q) * n as f64);
    assert!((mean - want_mean).abs() < 5.0 * (want_var / k).sqrt(), "mean size {mean}, want {want_mean}");
    assert!((var - want_var).abs() < 5.0 * want_var * (2.0 / (k - 1.0)).sqrt(), "variance {var}, want {want_var}");
    // Each example is taken at rate q: the hit counts are Binomial(steps, q) too.
    let hit_mean = hits.iter().map(|&h| h as f64).sum::<f64>() / n as f64;
    assert!((hit_mean - q * k).abs() < 5.0 * (q * (1.0 - q) * k / n as f64).sqrt(), "hits {hit_mean}");

    // Small batches: P(empty) = (1 − q)^N.
    let sampling = Sampling::Poisson { rate: 0.1 };
    let trials = 4000;
    let empty = (0..trials).filter(|&s| sampling.indices(10, 5, 1, s).is_empty()).count() as f64 / trials as f64;
    let p = 0.9f64.powi(10);
    assert!((empty - p).abs() < 5.0 * (p * (1.0 - p) / trials as f64).sqrt(), "P(empty) = {empty}, want {p}");
    assert_eq!(sampling.steps_per_epoch(10), 10);
    assert!((sampling.expected_batch(10) - 1.0).abs() < 1e-12);
}

#[test]
fn shuffled_batches_have_fixed_size_and_cover_an_epoch_once() {
    let sampling = Sampling::Shuffle { batch: 10 };
    assert_eq!(sampling.steps_per_epoch(103), 10);
    let epoch0: Vec<Vec<usize>> = (0..10).map(|s| sampling.indices(103, 1, 0, s)).collect();
    assert!(epoch0.iter().all(|b| b.len() == 10));
    let mut all: Vec<usize> = epoch0.concat();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 100, "no example twice in an epoch");
    assert_ne!(sampling.indices(103, 1, 1, 0), epoch0[0], "a new permutation each epoch");
    assert_eq!(sampling.indices(103, 1, 0, 3), epoch0[3], "reproducible");
    for bad in [Sampling::Shuffle { batch: 0 }, Sampling::Shuffle { batch: 104 }, Sampling::Poisson { rate: 1.5 }] {
        assert!(matches!(bad.validate(103), Err(Error::InvalidSetting { .. })), "{bad:?}");
    }
}

fn tiny_dataset(n: usize) -> Dataset {
    let images = (0..n * 36).map(|k| ((k * 7919) % 255) as f32 / 100.0 - 1.2).collect();
    Dataset { images, labels: (0..n).map(|i| (i % 3) as i64).collect(), rows: 6, cols: 6 }
}

/// Three Poisson steps of DP-SGD with momentum from `seed`.
fn three_steps(seed: u64) -> Params {
    let module = tiny(8);
    let mut session = module.session(Device::Cpu).expect("session");
    let data = tiny_dataset(40);
    let sampling = Sampling::Poisson { rate: 0.25 };
    let dp = DpSettings { clip: 1.0, noise_multiplier: 1.0, expected_batch: sampling.expected_batch(40) };
    let opt = Optimizer::Sgd { lr: 0.1, momentum: 0.9 };
    let mut params = module.init_params(0);
    let mut state = OptimizerState::default();
    for step in 0..3 {
        let batch = data.batch(&module.graph, &sampling.indices(40, seed, 0, step)).expect("batch");
        session
            .dp_sgd_step(&mut params, &batch, &dp, &opt, &mut state, &mut stream(seed, Purpose::Noise, 0, step))
            .expect("step");
    }
    params
}

#[test]
fn steps_are_reproducible_from_the_seed() {
    assert_eq!(three_steps(42), three_steps(42));
    assert_ne!(three_steps(42), three_steps(43));
}

fn one_param(v: &[f32]) -> Params {
    let mut tensors = TensorMap::new();
    tensors.insert("w".into(), Tensor::new(vec![v.len()], v.to_vec()));
    Params { tensors }
}

fn grad(v: &[f32]) -> TensorMap {
    one_param(v).tensors
}

#[test]
fn momentum_sgd_matches_a_hand_computed_update() {
    // torch.optim.SGD([w], lr=0.1, momentum=0.9), w = [1, -2], grads [0.5, 1] then [-0.25, 2]:
    // step 1: buf = g1 = [0.5, 1];                       w = [0.95, -2.1]
    // step 2: buf = 0.9 buf + g2 = [0.2, 2.9];           w = [0.93, -2.39]
    let opt = Optimizer::Sgd { lr: 0.1, momentum: 0.9 };
    let mut p = one_param(&[1.0, -2.0]);
    let mut state = OptimizerState::default();
    opt.apply(&mut state, &mut p, &grad(&[0.5, 1.0])).expect("step");
    assert_close(&p.tensors["w"].data, &[0.95, -2.1], 1e-6, "step 1");
    opt.apply(&mut state, &mut p, &grad(&[-0.25, 2.0])).expect("step");
    assert_close(&p.tensors["w"].data, &[0.93, -2.39], 1e-6, "step 2");
    assert_close(&state.buffers["momentum_buffer.w"].data, &[0.2, 2.9], 1e-6, "buffer");
}

#[test]
fn adam_matches_a_hand_computed_update() {
    // torch.optim.Adam([w], lr=0.1) (β = 0.9, 0.999, ε = 1e-8), w = [1], grads 0.5 then -0.25:
    // step 1: m = 0.05, v = 0.00025; m̂ = 0.5, v̂ = 0.25; w = 1 − 0.1·0.5/0.5 = 0.9
    // step 2: m = 0.045 − 0.025 = 0.02, v = 0.00024975 + 0.0000625 = 0.00031225;
    //         m̂ = 0.02/0.19 = 0.1052632, v̂ = 0.00031225/0.001999 = 0.1562031, √v̂ = 0.3952254;
    //         w = 0.9 − 0.1·0.1052632/0.3952254 = 0.8733665
    let opt = Optimizer::adam(0.1);
    let mut p = one_param(&[1.0]);
    let mut state = OptimizerState::default();
    opt.apply(&mut state, &mut p, &grad(&[0.5])).expect("step");
    assert_close(&p.tensors["w"].data, &[0.9], 1e-6, "step 1");
    opt.apply(&mut state, &mut p, &grad(&[-0.25])).expect("step");
    assert_close(&p.tensors["w"].data, &[0.873_366_5], 2e-6, "step 2");
    assert_eq!(state.step, 2);
}

#[test]
fn momentum_through_dp_steps_matches_the_formula_on_clipped_sums() {
    let module = tiny(16);
    let mut session = module.session(Device::Cpu).expect("session");
    let p0 = module.init_params(12);
    let (b1, b2) = (spread_batch(&module, 7, 1), spread_batch(&module, 9, 2));
    let (clip, bexp, lr, mu) = (0.3f32, 8.0f32, 0.2f32, 0.9f32);
    let dp = DpSettings { clip, noise_multiplier: 0.0, expected_batch: bexp as f64 };
    let opt = Optimizer::Sgd { lr, momentum: mu };
    let mut p = p0.clone();
    let mut state = OptimizerState::default();
    let mut rng = stream(0, Purpose::Noise, 0, 0);
    session.dp_sgd_step(&mut p, &b1, &dp, &opt, &mut state, &mut rng).expect("step 1");
    let p1 = p.clone();
    session.dp_sgd_step(&mut p, &b2, &dp, &opt, &mut state, &mut rng).expect("step 2");

    let g1: Vec<f32> =
        flat(&session.clipped_grad_sum(&p0, &b1, clip).expect("sum").sum).iter().map(|s| s / bexp).collect();
    let g2: Vec<f32> =
        flat(&session.clipped_grad_sum(&p1, &b2, clip).expect("sum").sum).iter().map(|s| s / bexp).collect();
    let want1: Vec<f32> = flat(&p0.tensors).iter().zip(&g1).map(|(w, g)| w - lr * g).collect();
    assert_close(&flat(&p1.tensors), &want1, 1e-5, "step 1");
    let want2: Vec<f32> =
        flat(&p1.tensors).iter().zip(g1.iter().zip(&g2)).map(|(w, (a, b))| w - lr * (mu * a + b)).collect();
    assert_close(&flat(&p.tensors), &want2, 1e-5, "step 2");
}

#[test]
fn optimizer_state_round_trips_through_safetensors() {
    let dir = tempfile::Builder::new().prefix("pdgc-dp-").tempdir().expect("temp dir");
    let path = dir.path().join("opt.safetensors");
    let opt = Optimizer::adam(0.01);
    let mut p = one_param(&[1.0, 2.0, 3.0]);
    let mut state = OptimizerState::default();
    for g in [[0.1, -0.2, 0.3], [0.5, 0.5, -1.0]] {
        opt.apply(&mut state, &mut p, &grad(&g)).expect("step");
    }
    state.save(&path, &opt).expect("save");
    let loaded = OptimizerState::load(&path, &opt, &p).expect("load");
    assert_eq!(loaded, state);
    let (mut a, mut b) = (p.clone(), p.clone());
    let (mut sa, mut sb) = (state, loaded);
    opt.apply(&mut sa, &mut a, &grad(&[0.3, 0.3, 0.3])).expect("step");
    opt.apply(&mut sb, &mut b, &grad(&[0.3, 0.3, 0.3])).expect("step");
    assert_eq!(a, b);

    let err = OptimizerState::load(&path, &Optimizer::adam(0.02), &p).expect_err("other optimizer");
    assert!(matches!(err, Error::Checkpoint { .. }) && err.to_string().contains("Adam"), "{err}");
    let err = OptimizerState::load(&path, &opt, &one_param(&[1.0])).expect_err("other shapes");
    assert!(err.to_string().contains("buffer `exp_avg"), "{err}");
}

#[test]
fn bad_settings_are_typed_errors() {
    let module = tiny(4);
    let mut session = module.session(Device::Cpu).expect("session");
    let mut p = module.init_params(0);
    let batch = spread_batch(&module, 2, 0);
    let mut rng = stream(0, Purpose::Noise, 0, 0);
    let mut st = OptimizerState::default();
    let cases = [
        DpSettings { clip: 0.0, noise_multiplier: 1.0, expected_batch: 2.0 },
        DpSettings { clip: 1.0, noise_multiplier: -1.0, expected_batch: 2.0 },
        DpSettings { clip: 1.0, noise_multiplier: f64::NAN, expected_batch: 2.0 },
        DpSettings { clip: 1.0, noise_multiplier: 1.0, expected_batch: 0.0 },
    ];
    for dp in cases {
        let err = session.dp_sgd_step(&mut p, &batch, &dp, &sgd(0.1), &mut st, &mut rng).expect_err("bad setting");
        assert!(matches!(err, Error::BadClipNorm(_) | Error::InvalidSetting { .. }), "{err}");
    }
    assert!(Optimizer::Sgd { lr: 0.1, momentum: 1.0 }.validate().is_err());
    assert!(Optimizer::Sgd { lr: -0.1, momentum: 0.0 }.validate().is_err());
    assert!(Optimizer::adam(0.1).validate().is_ok());
}
