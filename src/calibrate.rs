//! `pdgc calibrate`: measures this machine with the CPU backend's own kernels and turns the
//! timings into a [`DeviceProfile`] the planner reads (`pdgc explain --device FILE`).
//!
//! Every measurement compiles kernels of the kernel IR with the Cranelift backend and runs
//! them exactly as a session does on `Device::Cpu` (`CompiledKernel::run_parallel` with the
//! session's thread count), so the profile describes the code pdgc emits, not the
//! hardware's datasheet. One function per field:
//! - [`peak_flops`]: the best FLOP/s of conv-like weight-gradient contractions (the
//!   non-private kernels, every example's product summed in partial sums, and `unfold`'s,
//!   one GEMM per example, examples split over the threads), as the pipeline compiles them
//!   for a one-conv net ([`conv_kernels`]);
//! - [`half_efficiency_flops`]: the `H` of [`DeviceProfile::gemm_efficiency`]'s ramp
//!   `F / (F + H)`, fitted to a sweep of square contractions ([`sweep_rates`], whose
//!   largest ones also count for the peak);
//! - [`bandwidth`]: bytes read and written per second by a scaled copy;
//! - [`launch_latency`]: seconds per launch of a kernel that does nearly nothing;
//! - [`window_efficiency`] and [`gram_efficiency`]: the `direct` conv kernel (unit-stride
//!   loop nests) and the ghost conv kernel (strided reductions) timed as a fraction of the
//!   measured peak, their operations counted as the cost model counts them
//!   ([`pdgc_codegen::analysis::work`]), i.e. the factors the cost model gives loop nests;
//! - [`total_memory`]: `MemTotal` of `/proc/meminfo`; the tile edge is `cpu2`'s.
//!
//! Each timing is the median of several samples, each sample long enough (repeated
//! launches) for the clock to resolve it. [`Sizes::quick`] makes everything small enough
//! for tests: its numbers show that the machinery works, not what the machine does.

use std::path::{Path, PathBuf};
use std::time::Instant;

use pdgc_codegen::cpu::{CompiledKernel, CpuBackend};
use pdgc_codegen::ir::{Affine, Arg, ArgId, Dim, Expr, Extent, Kernel, Loop, LoopKind, Mode, Stmt, VarId};

use crate::error::{Error, Result};
use crate::module::{CompileOptions, Module};
use crate::plan::DeviceProfile;

/// What `pdgc calibrate` runs with.
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// Worker threads, as a session's `set_threads`.
    pub threads: usize,
    /// Small sizes and few repeats (seconds, for tests); the numbers are then not meaningful.
    pub quick: bool,
    /// The profile's name.
    pub name: String,
}

/// The problem sizes of one calibration run.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// Samples per timing (the median is kept).
    pub repeats: usize,
    /// The shortest sample, seconds: a fast kernel is launched repeatedly within one.
    pub min_sample: f64,
    /// Weight-gradient contractions `(Cout, d, T, examples)` for the peak.
    pub peak: Vec<(usize, usize, usize, usize)>,
    /// Edges `s` of the square `s×s×s` contractions of the efficiency sweep.
    pub sweep: Vec<usize>,
    /// Bytes of the streamed buffer (the copy reads this many and writes as many).
    pub stream_bytes: usize,
    /// 3×3 convolutions (padding 1) `(Cin, Cout, H = W, examples)` for the window and Gram
    /// efficiencies.
    pub window: Vec<(usize, usize, usize, usize)>,
    pub gram: Vec<(usize, usize, usize, usize)>,
}

impl Sizes {
    /// The full calibration: under half a minute on two cores.
    pub fn full() -> Sizes {
        Sizes {
            repeats: 9,
            min_sample: 0.05,
            peak: vec![(64, 576, 1024, 4), (128, 1152, 256, 4), (256, 2304, 64, 4)],
            sweep: vec![8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384],
            stream_bytes: 256 << 20,
            window: vec![(32, 32, 32, 8), (64, 64, 16, 8), (128, 128, 8, 8)],
            gram: vec![(16, 16, 16, 4), (32, 32, 14, 4), (64, 64, 8, 8)],
        }
    }

    /// Seconds even in a debug build; the numbers only show that the machinery works.
    pub fn quick() -> Sizes {
        Sizes {
            repeats: 3,
            min_sample: 0.001,
            peak: vec![(16, 72, 64, 2)],
            sweep: vec![16, 32, 64],
            stream_bytes: 1 << 20,
            window: vec![(4, 4, 8, 2)],
            gram: vec![(4, 4, 4, 2)],
        }
    }
}

/// One point of the efficiency sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SweepPoint {
    pub flops: f64,
    /// Measured FLOP/s over the peak (tile padding divided out). The time is the whole
    /// launch's, so a call's fixed costs are part of the ramp.
    pub efficiency: f64,
}

/// A calibration's result: the profile and the sweep it was fitted to.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub profile: DeviceProfile,
    pub sweep: Vec<SweepPoint>,
}

/// Measures everything and returns the profile; `progress` gets one line per measurement.
pub fn calibrate(opts: &CalibrateOptions, progress: &mut dyn FnMut(&str)) -> Result<Calibration> {
    if opts.threads == 0 {
        return Err(Error::InvalidSetting {
            name: "--threads",
            value: "0".into(),
            reason: "at least one thread is needed".into(),
        });
    }
    let sizes = if opts.quick { Sizes::quick() } else { Sizes::full() };
    let memory = total_memory(Path::new("/proc/meminfo"))?;
    let mut bench = Bencher::new(opts.threads, &sizes)?;
    let mut profile = DeviceProfile { name: opts.name.clone(), memory, ..DeviceProfile::cpu2() };
    profile.launch_latency = launch_latency(&mut bench, progress)?;
    profile.bandwidth = bandwidth(&mut bench, sizes.stream_bytes, progress)?;
    let peak = peak_flops(&mut bench, &sizes.peak, progress)?;
    let rates = sweep_rates(&mut bench, &sizes.sweep, progress)?;
    // The sweep's largest contractions are large contractions too: none may beat the peak.
    profile.peak_flops = rates.iter().map(|&(_, r)| r).fold(peak, f64::max);
    if profile.peak_flops > peak {
        progress(&format!("peak_flops: {:.2} GFLOP/s, from the sweep", profile.peak_flops / 1e9));
    }
    let sweep = sweep_efficiencies(&rates, &profile);
    profile.half_efficiency_flops = half_efficiency_flops(&sweep)?;
    let shown: Vec<String> = sweep.iter().map(|p| format!("{:.1}%", 100.0 * p.efficiency)).collect();
    progress(&format!(
        "half_efficiency_flops: fitted {:.3e} FLOPs to the sweep's efficiencies {}",
        profile.half_efficiency_flops,
        shown.join(", ")
    ));
    profile.window_efficiency = window_efficiency(&mut bench, &sizes.window, &profile, progress)?;
    profile.gram_efficiency = gram_efficiency(&mut bench, &sizes.gram, &profile, progress)?;
    Ok(Calibration { profile, sweep })
}

/// Compiles kernels and times them on the session's threads.
pub struct Bencher {
    backend: CpuBackend,
    threads: usize,
    repeats: usize,
    min_sample: f64,
}

/// A compiled kernel with buffers for one batch size.
struct Prepared {
    kernel: CompiledKernel,
    bufs: Vec<Vec<f32>>,
    batch: u64,
}

impl Bencher {
    fn new(threads: usize, sizes: &Sizes) -> Result<Bencher> {
        let backend = CpuBackend::new().map_err(|e| Error::Backend(e.to_string()))?;
        Ok(Bencher { backend, threads, repeats: sizes.repeats.max(1), min_sample: sizes.min_sample })
    }

    /// Compiles `kernel` and allocates its buffers for `batch`, inputs filled with small
    /// values (no denormals, no NaN).
    fn prepare(&mut self, kernel: Result<Kernel>, batch: usize) -> Result<Prepared> {
        let kernel = kernel?;
        let compiled =
            self.backend.compile(std::slice::from_ref(&kernel)).map_err(|e| Error::Backend(e.to_string()))?;
        let kernel = compiled.into_iter().next().ok_or_else(|| Error::Internal("no kernel compiled".into()))?;
        let batch = batch as u64;
        // One buffer per bound argument (the backend provides private memory).
        let bufs = kernel
            .args()
            .iter()
            .filter(|a| a.is_bound())
            .map(|a| buffer(a, batch))
            .collect::<Result<Vec<Vec<f32>>>>()?;
        Ok(Prepared { kernel, bufs, batch })
    }

    /// The median seconds of one launch of `p`.
    fn seconds(&self, p: &mut Prepared) -> Result<f64> {
        let threads = self.threads;
        let mut launch = || -> Result<()> {
            let mut slices: Vec<&mut [f32]> = p.bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
            p.kernel.run_parallel(&mut slices, p.batch, threads).map_err(|e| Error::Backend(e.to_string()))
        };
        // A warm-up launch (pages touched, caches and threads woken) that also sizes the
        // samples.
        let start = Instant::now();
        launch()?;
        let once = start.elapsed().as_secs_f64().max(1e-9);
        let launches = (self.min_sample / once).ceil().clamp(1.0, 1e6) as usize;
        let mut samples = Vec::with_capacity(self.repeats);
        for _ in 0..self.repeats {
            let start = Instant::now();
            for _ in 0..launches {
                launch()?;
            }
            samples.push(start.elapsed().as_secs_f64() / launches as f64);
        }
        Ok(median(samples))
    }
}

fn buffer(a: &Arg, batch: u64) -> Result<Vec<f32>> {
    let len = a
        .checked_len(batch)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| Error::Internal(format!("calibration buffer `{}` is too large", a.name)))?;
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::OutOfMemory {
        what: format!("the calibration buffer `{}`", a.name),
        bytes: len as u64 * 4,
        budget: None,
        advice: "use --quick".into(),
    })?;
    match a.mode {
        Mode::Out => v.resize(len, 0.0),
        Mode::In | Mode::InOut | Mode::Private => v.extend((0..len).map(|i| (i % 251) as f32 / 251.0 - 0.5)),
    }
    Ok(v)
}

/// The middle sample (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Seconds per launch of a kernel that stores one zero per worker thread, its grid split
/// over the threads: the fixed cost of a parallel dispatch.
pub fn launch_latency(bench: &mut Bencher, progress: &mut dyn FnMut(&str)) -> Result<f64> {
    let rows = bench.threads;
    let mut p = bench.prepare(Ok(trivial_kernel()), rows)?;
    let secs = bench.seconds(&mut p)?;
    progress(&format!("launch_latency: {:.2} µs per launch ({rows} grid iterations)", secs * 1e6));
    Ok(secs)
}

/// `z[n, 0] = 0`, grid over the batch.
fn trivial_kernel() -> Kernel {
    let n = VarId(0);
    let body = vec![Stmt::Store {
        arg: ArgId(0),
        index: vec![Affine::var(n), Affine::constant(0)],
        value: Expr::Const(0.0),
        accumulate: false,
    }];
    Kernel {
        name: "calibrate_launch".into(),
        args: vec![Arg { name: "z".into(), dims: vec![Dim::Batch, Dim::Fixed(1)], mode: Mode::Out }],
        vars: vec!["n".into()],
        accs: vec![],
        grid: Loop { var: n, extent: Extent::Batch, kind: LoopKind::Serial, body },
    }
}

/// Row length of the streaming kernel: 256 KiB rows.
const STREAM_ROW: usize = 1 << 16;

/// Bytes per second of `y = 2·x` over `bytes`-sized buffers (rows split over the threads):
/// the bytes read plus the bytes written, as the cost model counts them.
pub fn bandwidth(bench: &mut Bencher, bytes: usize, progress: &mut dyn FnMut(&str)) -> Result<f64> {
    let rows = (bytes / 4).div_ceil(STREAM_ROW).max(1);
    let mut p = bench.prepare(Ok(scale_kernel()), rows)?;
    let secs = bench.seconds(&mut p)?;
    let moved = 2.0 * (rows * STREAM_ROW * 4) as f64;
    let bw = moved / secs;
    progress(&format!("bandwidth: {:.2} GB/s (y = 2x over 2 × {} MiB)", bw / 1e9, (rows * STREAM_ROW * 4) >> 20));
    Ok(bw)
}

/// `y[n, i] = 2·x[n, i]`, grid over rows, the inner loop a vector loop.
fn scale_kernel() -> Kernel {
    let (n, i) = (VarId(0), VarId(1));
    let index = vec![Affine::var(n), Affine::var(i)];
    let dims = vec![Dim::Batch, Dim::Fixed(STREAM_ROW as u32)];
    let store = Stmt::Store {
        arg: ArgId(1),
        index: index.clone(),
        value: Expr::mul(Expr::Const(2.0), Expr::load(ArgId(0), index)),
        accumulate: false,
    };
    let inner = Stmt::Loop(Loop {
        var: i,
        extent: Extent::Fixed(STREAM_ROW as u32),
        kind: LoopKind::Vector,
        body: vec![store],
    });
    Kernel {
        name: "calibrate_stream".into(),
        args: vec![
            Arg { name: "x".into(), dims: dims.clone(), mode: Mode::In },
            Arg { name: "y".into(), dims, mode: Mode::Out },
        ],
        vars: vec!["n".into(), "i".into()],
        accs: vec![],
        grid: Loop { var: n, extent: Extent::Batch, kind: LoopKind::Serial, body: vec![inner] },
    }
}

/// The kernels `pdgc` compiles, for `batch` examples, for a one-conv net whose conv (layer
/// `c`, node 1, under `strategy`) is `conv` on an input of shape `input`, named `n1_c_{w}`
/// for each `w` in `what` that the program has (or `n1_c_{w}_fused`, with the gather of its
/// columns, either followed by `__` and the next launch's kernel), in launch order: what a session runs for that conv. An error where it has none
/// of them.
fn conv_kernels(conv: &str, input: &str, strategy: &str, batch: usize, what: &[&str]) -> Result<Vec<Kernel>> {
    let module = one_conv_net(&format!("@strategy({strategy}) c: {conv}"), input, batch)?;
    let names: Vec<String> = what.iter().map(|w| format!("n1_c_{w}")).collect();
    // A kernel with its columns' gather fused in (`lower::fuse`) counts as the product's, and
    // so does one that also runs the next launch (`lower::chain`: the forward pass with the
    // global average pool that reads its output, an in-cache pass over it).
    let named = |k: &&Kernel| {
        names.iter().any(|n| {
            let fused = format!("{n}_fused");
            [n, &fused].iter().any(|m| k.name == **m || k.name.starts_with(&format!("{m}__")))
        })
    };
    let kernels: Vec<Kernel> = module.program.kernels.iter().filter(named).cloned().collect();
    if kernels.is_empty() {
        return Err(Error::Internal(format!("calibration: none of {names:?} in the program of `{conv}`")));
    }
    Ok(kernels)
}

/// A net of one conv layer `conv` (`c: conv2d(x, ...)`, node 1) on an input of shape
/// `input`, then global average pooling, a linear layer and cross-entropy, compiled for
/// `batch` examples.
fn one_conv_net(conv: &str, input: &str, batch: usize) -> Result<Module> {
    let source = format!(
        "model calibrate {{\n    input x: [{input}];\n    label y: classes(2);\n    h = {conv};\n    \
         logits = fc: linear(global_avg_pool(h), 2);\n    loss cross_entropy(logits, y);\n}}\n"
    );
    Module::from_source("calibrate.pdg", &source, &CompileOptions::new(batch))
}

/// The weight gradient of `conv1d(x, cout, 1)` on `d` channels of length `t` (the
/// contraction `cout × d × t` per example) as `pdgc` compiles it: `what` names the kernels
/// (see [`conv_kernels`]).
fn weight_grad_kernels((cout, d, t, batch): (usize, usize, usize, usize), what: &[&str]) -> Result<Vec<Kernel>> {
    conv_kernels(&format!("conv1d(x, {cout}, 1, bias=false)"), &format!("{d}, {t}"), "unfold", batch, what)
}

/// FLOP/s of `kernels` run one after the other on `batch` examples, for `flops` operations.
fn rate(bench: &mut Bencher, kernels: Vec<Kernel>, batch: usize, flops: f64) -> Result<f64> {
    let mut secs = 0.0;
    for k in kernels {
        let mut p = bench.prepare(Ok(k), batch)?;
        secs += bench.seconds(&mut p)?;
    }
    Ok(flops / secs)
}

/// FLOP/s of the non-private weight-gradient kernels `dW = Σ_n dY_n · U_nᵀ` on `batch`
/// examples of a `cout × d × t` contraction.
fn batch_grad_rate(bench: &mut Bencher, shape: (usize, usize, usize, usize)) -> Result<f64> {
    let (cout, d, t, batch) = shape;
    rate(
        bench,
        weight_grad_kernels(shape, &["weight_batch_grad_parts", "weight_batch_grad"])?,
        batch,
        (2 * batch * cout * d * t) as f64,
    )
}

/// The best FLOP/s of large conv-like contractions, each run both as the non-private
/// kernels (every example's product summed, in partial sums) and as `unfold`'s
/// per-example kernel (examples split over the threads).
pub fn peak_flops(
    bench: &mut Bencher,
    shapes: &[(usize, usize, usize, usize)],
    progress: &mut dyn FnMut(&str),
) -> Result<f64> {
    let mut best: f64 = 0.0;
    for (i, &(cout, d, t, batch)) in shapes.iter().enumerate() {
        let batched = batch_grad_rate(bench, (cout, d, t, batch))?;
        let flops = (2 * batch * cout * d * t) as f64;
        let unfold = weight_grad_kernels((cout, d, t, batch), &["weight_unfold"])?;
        let per_example = rate(bench, unfold, batch, flops)?;
        progress(&format!(
            "peak_flops {}/{}: {cout}×{d}×{t}, {batch} examples: {:.2} GFLOP/s batched, {:.2} GFLOP/s per example",
            i + 1,
            shapes.len(),
            batched / 1e9,
            per_example / 1e9
        ));
        best = best.max(batched).max(per_example);
    }
    Ok(best)
}

/// FLOP/s of square `s×s×s` contractions for each edge `s` in `edges` (one example, the
/// non-private kernel, whole launches timed, so a call's fixed costs are part of them):
/// `(s, FLOP/s)`.
pub fn sweep_rates(bench: &mut Bencher, edges: &[usize], progress: &mut dyn FnMut(&str)) -> Result<Vec<(usize, f64)>> {
    let mut rates = Vec::with_capacity(edges.len());
    for &s in edges {
        let rate = batch_grad_rate(bench, (s, s, s, 1))?;
        progress(&format!("sweep {s}×{s}×{s} ({:.2e} FLOPs): {:.2} GFLOP/s", (2 * s * s * s) as f64, rate / 1e9));
        rates.push((s, rate));
    }
    Ok(rates)
}

/// The sweep's efficiencies on `dev`'s peak, the tile padding divided out as
/// [`DeviceProfile::gemm_efficiency`] multiplies it in.
pub fn sweep_efficiencies(rates: &[(usize, f64)], dev: &DeviceProfile) -> Vec<SweepPoint> {
    // gemm_efficiency's tile padding alone: without a ramp.
    let no_ramp = DeviceProfile { half_efficiency_flops: 0.0, ..dev.clone() };
    rates
        .iter()
        .map(|&(s, rate)| {
            let (flops, e) = ((2 * s * s * s) as f64, s as u64);
            SweepPoint { flops, efficiency: rate / (dev.peak_flops * no_ramp.gemm_efficiency(e, e, e, flops)) }
        })
        .collect()
}

/// The `H` of the ramp `F / (F + H)` that fits the sweep best in log space (the least
/// squares of `ln e − ln(F / (F + H))`, efficiencies above 1 taken as 1), searched over
/// 1 to 10¹⁴ FLOPs in steps of 10^0.01. `H` is where the fitted curve reaches half the peak.
/// An error where no point has a positive finite efficiency.
pub fn half_efficiency_flops(points: &[SweepPoint]) -> Result<f64> {
    let usable: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.flops > 0.0 && p.efficiency > 0.0 && p.efficiency.is_finite())
        .map(|p| (p.flops, p.efficiency.min(1.0).ln()))
        .collect();
    if usable.is_empty() {
        return Err(Error::Device(
            "no contraction of the sweep has a measured efficiency: half_efficiency_flops cannot be fitted".into(),
        ));
    }
    if usable.is_empty() {
        return Err(Error::Device(
            "no contraction of the sweep has a measured efficiency: half_efficiency_flops cannot be fitted".into(),
        ));
    }
    let error = |h: f64| -> f64 { usable.iter().map(|(f, le)| (le - (f / (f + h)).ln()).powi(2)).sum() };
    (0..=1400)
        .map(|x| 10f64.powf(x as f64 / 100.0))
        .min_by(|a, b| error(*a).total_cmp(&error(*b)))
        .ok_or_else(|| Error::Internal("the search grid is empty".into()))
}

/// One kernel timed against the GEMM the cost model would run instead.
struct Versus {
    label: String,
    kernel: Result<Kernel>,
    batch: usize,
}

/// A 3×3 convolution with padding 1 of the window and Gram measurements.
#[derive(Clone, Copy)]
struct ConvShape {
    cin: usize,
    cout: usize,
    hw: usize,
    batch: usize,
    /// `hw²` output positions.
    t: usize,
}

/// The median over `shapes` of each kernel `versus` gives's FLOP/s over `dev`'s peak, its
/// operations counted as the cost model counts them ([`pdgc_codegen::analysis::work::work`]).
fn median_ratio(
    bench: &mut Bencher,
    what: &str,
    shapes: &[(usize, usize, usize, usize)],
    dev: &DeviceProfile,
    progress: &mut dyn FnMut(&str),
    versus: impl Fn(ConvShape) -> Versus,
) -> Result<f64> {
    let mut ratios = Vec::with_capacity(shapes.len());
    for &(cin, cout, hw, batch) in shapes {
        let run = versus(ConvShape { cin, cout, hw, batch, t: hw * hw });
        let kernel = run.kernel?;
        let flops = pdgc_codegen::analysis::work::work(&kernel, run.batch as u64).flops() as f64;
        let mut p = bench.prepare(Ok(kernel), run.batch)?;
        let rate = flops / bench.seconds(&mut p)?;
        let model = dev.peak_flops;
        progress(&format!(
            "{what}: {}, {} examples: {:.2} GFLOP/s, {:.4} of the peak",
            run.label,
            run.batch,
            rate / 1e9,
            rate / model
        ));
        ratios.push(rate / model);
    }
    Ok(median(ratios))
}

/// `direct`'s FLOP/s over `dev`'s peak: the factor the cost model gives the operations of
/// unit-stride loop nests as `window_efficiency`. The median over `shapes`.
pub fn window_efficiency(
    bench: &mut Bencher,
    shapes: &[(usize, usize, usize, usize)],
    dev: &DeviceProfile,
    progress: &mut dyn FnMut(&str),
) -> Result<f64> {
    median_ratio(bench, "window_efficiency", shapes, dev, progress, |s| Versus {
        label: format!("direct conv 3×3 {}→{} on {}×{}", s.cin, s.cout, s.hw, s.hw),
        kernel: conv_kernels(
            &format!("conv2d(x, {}, 3, padding=1, bias=false)", s.cout),
            &format!("{}, {}, {}", s.cin, s.hw, s.hw),
            "direct",
            s.batch,
            &["weight_direct"],
        )
        .map(|mut kernels| kernels.swap_remove(0)),
        batch: s.batch,
    })
}

/// Ghost norm's FLOP/s (its Gram products read the columns with a stride of T) over
/// `dev`'s peak: the factor the cost model gives the operations of strided loop nests as
/// `gram_efficiency`. The median over `shapes`.
pub fn gram_efficiency(
    bench: &mut Bencher,
    shapes: &[(usize, usize, usize, usize)],
    dev: &DeviceProfile,
    progress: &mut dyn FnMut(&str),
) -> Result<f64> {
    median_ratio(bench, "gram_efficiency", shapes, dev, progress, |s| Versus {
        label: format!("ghost conv 3×3 {}→{} on {}×{} (T = {})", s.cin, s.cout, s.hw, s.hw, s.t),
        kernel: ghost_loop_nest(s),
        batch: s.batch,
    })
}

/// The ghost norm kernel of the weight of a 3×3 conv (padding 1) of shape `s` in its loop-nest
/// form, the one the lowering makes where the conv's im2col columns are not kept (its Gram
/// entries summed in registers over strided reads of the output gradient and the input
/// window; with kept columns the Gram matrices are contractions, timed as GEMMs).
fn ghost_loop_nest(s: ConvShape) -> Result<Kernel> {
    use crate::lower::index::{ghost_kernel, tensor_info};
    let conv = format!("c: conv2d(x, {}, 3, padding=1, bias=false)", s.cout);
    let module = one_conv_net(&conv, &format!("{}, {}, {}", s.cin, s.hw, s.hw), 1)?;
    let graph = &module.graph;
    let grads = crate::grad::differentiate(graph);
    let node = graph.nodes.iter().find(|n| n.layer.as_deref() == Some("c")).map(|n| n.id);
    let missing = || Error::Internal("calibration: the conv's derived equations are missing".into());
    let step = node.and_then(|id| grads.step(id)).ok_or_else(missing)?;
    let layer = crate::grad::as_index_layer(graph, graph.node(step.node)).ok_or_else(missing)?;
    let form = step.param_grads.first().and_then(|pg| crate::grad::layer::ghost_form(&pg.eq)).ok_or_else(missing)?;
    let info = |t: &str| tensor_info(&layer, t);
    ghost_kernel("calibrate_ghost", &form, &step.ranges, &info, 0, 1).map(|(k, _)| k)
}

/// The machine's RAM: `MemTotal` of a `/proc/meminfo`-style file, in bytes.
pub fn total_memory(meminfo: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(meminfo).map_err(|source| Error::Read { path: meminfo.into(), source })?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::Device(format!("{}: no `MemTotal: N kB` line", meminfo.display())))?;
    Ok(kib * 1024)
}

/// This machine's host name made safe for a file name (letters, digits, `-`, `_`, `.`),
/// or `cpu` where it has none.
pub fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String =
        raw.trim().chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    if name.is_empty() || name.starts_with('.') {
        "cpu".into()
    } else {
        name
    }
}

/// The default output file, `profile-<host>.json` in the current directory.
pub fn default_output() -> PathBuf {
    PathBuf::from(format!("profile-{}.json", host_name()))
}

/// Fails early, before a minute of measuring, where `path`'s directory does not exist.
pub fn check_output_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if dir.is_dir() {
        return Ok(());
    }
    Err(Error::Write {
        path: path.into(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("no directory {}", dir.display())),
    })
}

/// Writes `profile` as pretty JSON to `path` atomically: a temporary file in the same
/// directory, renamed over `path` once complete.
pub fn write_profile(profile: &DeviceProfile, path: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(profile).map_err(|e| Error::Internal(e.to_string()))?;
    let file = path.file_name().ok_or_else(|| Error::Write {
        path: path.into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, json + "\n").map_err(|source| Error::Write { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        Error::Write { path: path.into(), source }
    })
}

/// The summary table: each field as measured beside `cpu2`'s built-in value.
pub fn summary(profile: &DeviceProfile) -> String {
    let cpu2 = DeviceProfile::cpu2();
    let rows: [(&str, String, String); 8] = [
        ("peak_flops", format!("{:.3e} FLOP/s", profile.peak_flops), format!("{:.3e}", cpu2.peak_flops)),
        ("bandwidth", format!("{:.3e} B/s", profile.bandwidth), format!("{:.3e}", cpu2.bandwidth)),
        ("launch_latency", format!("{:.3e} s", profile.launch_latency), format!("{:.3e}", cpu2.launch_latency)),
        ("half_efficiency_flops", format!("{:.3e} FLOPs", profile.half_efficiency_flops), {
            format!("{:.3e}", cpu2.half_efficiency_flops)
        }),
        ("window_efficiency", format!("{:.4}", profile.window_efficiency), format!("{:.4}", cpu2.window_efficiency)),
        ("gram_efficiency", format!("{:.4}", profile.gram_efficiency), format!("{:.4}", cpu2.gram_efficiency)),
        ("memory", format!("{} B", profile.memory), format!("{}", cpu2.memory)),
        ("tile", format!("{} (cpu2's)", profile.tile), format!("{}", cpu2.tile)),
    ];
    let mut out = format!("{:<22} {:<24} {}\n", "field", profile.name, "cpu2 (built in)");
    for (field, measured, builtin) in rows {
        out += &format!("{field:<22} {measured:<24} {builtin}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_recovers_the_ramp_it_was_given() {
        for h in [2e5, 3.7e6] {
            let points: Vec<SweepPoint> = [1e3, 1e4, 1e5, 1e6, 1e7, 1e8]
                .iter()
                .map(|&flops| SweepPoint { flops, efficiency: flops / (flops + h) })
                .collect();
            let fitted = half_efficiency_flops(&points).expect("fits");
            assert!((fitted / h - 1.0).abs() < 0.025, "{fitted} for {h}");
        }
        let unmeasured = [SweepPoint { flops: 1e3, efficiency: f64::NAN }];
        assert!(matches!(half_efficiency_flops(&unmeasured), Err(Error::Device(_))));
    }

    #[test]
    fn the_median_is_the_middle_sample() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn memory_comes_from_memtotal_with_clear_errors() {
        let dir = std::env::temp_dir().join(format!("pdgc-calibrate-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = dir.join("meminfo");
        std::fs::write(&good, "MemTotal:       24684232 kB\nMemFree: 1 kB\n").expect("write");
        assert_eq!(total_memory(&good).expect("parses"), 24684232 * 1024);
        let bad = dir.join("bad");
        std::fs::write(&bad, "MemFree: 1 kB\n").expect("write");
        let e = total_memory(&bad).expect_err("no MemTotal").to_string();
        assert!(e.contains("MemTotal"), "{e}");
        let e = total_memory(&dir.join("missing")).expect_err("no file").to_string();
        assert!(e.contains("cannot read"), "{e}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn a_quick_calibration_writes_a_profile_that_loads() {
        let opts = CalibrateOptions { threads: 2, quick: true, name: "test-quick".into() };
        let mut lines = Vec::new();
        let cal = calibrate(&opts, &mut |l| lines.push(l.to_string())).expect("calibrates");
        assert!(lines.iter().any(|l| l.starts_with("bandwidth")), "{lines:?}");
        assert_eq!(cal.sweep.len(), Sizes::quick().sweep.len());
        let dir = std::env::temp_dir().join(format!("pdgc-calibrate-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("p.json");
        write_profile(&cal.profile, &path).expect("writes");
        let loaded = DeviceProfile::load(&path).expect("loads");
        assert_eq!(loaded, cal.profile);
        // Nothing but the profile is left in the directory.
        assert_eq!(std::fs::read_dir(&dir).expect("lists").count(), 1);
        std::fs::remove_dir_all(&dir).expect("clean up");
        assert!(cal.profile.peak_flops.is_finite() && cal.profile.peak_flops > 0.0);
    }

    #[test]
    fn zero_threads_is_a_setting_error() {
        let opts = CalibrateOptions { threads: 0, quick: true, name: "x".into() };
        assert!(matches!(calibrate(&opts, &mut |_| {}), Err(Error::InvalidSetting { .. })));
    }
}
