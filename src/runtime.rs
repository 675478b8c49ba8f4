//! Sessions: a compiled program bound to a device. A session runs an entry point of the
//! program (loss, batch gradient, per-example grads, norms, clipped sum) on a batch and
//! returns named tensors.
//!
//! Memory: the host buffers live in one arena laid out per entry by the buffer plan
//! ([`crate::memory`]), so buffers whose lifetimes do not overlap share memory. Each entry
//! runs on at most as many examples at a time as fit the session's memory budget (by
//! default, what the machine has available): a larger batch is cut into micro-batches,
//! whose per-example results are concatenated and whose sums are added. The arena is
//! allocated fallibly; a failure is [`Error::OutOfMemory`], never an abort.
//!
//! The session only moves data in and out of buffers and launches kernels; all arithmetic
//! happens in the kernels. Backends: CUDA (the program's CUDA C compiled by NVRTC for the
//! device, buffers in device memory), the Cranelift CPU JIT, and the kernel-IR interpreter
//! (slow; the test oracle for the JIT).
//!
//! Host buffers exist for every backend: inputs are bound into them, and on CUDA they are
//! uploaded before a run (only the inputs: parameters, batch, labels, clip norm) and results
//! are downloaded from the device when read.

use std::sync::Arc;

use pdgc_codegen::buffer::AlignedBuf;
use pdgc_codegen::cpu::{CompiledKernel, CpuBackend};
use pdgc_codegen::cuda::device::{CudaDevice, DeviceBuffer, LoadedModule, View};
use pdgc_codegen::cuda::host::HostModule;
use pdgc_codegen::interp;

use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::lower::{BufId, EntryKind, LaunchMode, Program, Role};
use crate::memory::{self, Layout};
use crate::tensor::{Batch, Labels, Params, Tensor, TensorMap};

/// Where a session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// CUDA if a GPU, its driver and NVRTC are present, else the CPU (the reason is
    /// logged at debug level and kept in [`Session::fallback_reason`]).
    Auto,
    /// The Cranelift JIT on this machine's cores.
    Cpu,
    /// The first CUDA GPU; an error (not a fallback) when there is none.
    Cuda,
    /// The kernel-IR reference interpreter: exact semantics, slow; for testing.
    Interpreter,
    /// The generated CUDA C compiled for this machine by its C++ compiler and run with the
    /// launch grid a GPU gets, one block at a time, the threads of a block-cooperative kernel
    /// as coroutines through its barriers (`pdgc_codegen::cuda::host`): checks the CUDA
    /// backend's code without a GPU. Slow; for testing.
    CudaHost,
}

enum Executor {
    Cpu(Vec<CompiledKernel>),
    Interpreter,
    Cuda(Box<CudaExec>),
    CudaHost(HostModule),
}

/// A program loaded on a GPU, with one device buffer per program buffer.
struct CudaExec {
    dev: CudaDevice,
    module: LoadedModule,
    buffers: Vec<DeviceBuffer>,
}

impl CudaExec {
    fn new(program: &Program, max_batch: usize) -> Result<CudaExec> {
        let dev = CudaDevice::open(0).map_err(|e| Error::Device(e.to_string()))?;
        let rendered = pdgc_codegen::cuda::render_module_for(&program.kernels, Some(max_batch as u64))
            .map_err(|e| Error::Backend(e.to_string()))?;
        let module = dev.load(&rendered, &program.kernels).map_err(|e| Error::Backend(e.to_string()))?;
        let buffers = program
            .buffers
            .iter()
            .map(|b| dev.alloc(b.len(max_batch as u64) as usize))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Device(e.to_string()))?;
        Ok(CudaExec { dev, module, buffers })
    }
}

/// The results of a clipped-sum step.
#[derive(Debug, Clone)]
pub struct ClippedSum {
    /// `Σ_n min(1, C/‖g_n‖) g_n` per parameter.
    pub sum: TensorMap,
    /// `‖g_n‖` over all parameters, `[B]`.
    pub norms: Vec<f32>,
    /// The per-example losses, `[B]`.
    pub loss: Vec<f32>,
}

/// What a fresh arena holds: NaN in debug builds, so that a kernel reading memory no
/// earlier launch of the entry wrote shows up in the numeric tests; zero otherwise.
const POISON: f32 = if cfg!(debug_assertions) { f32::NAN } else { 0.0 };

fn entry_index(kind: EntryKind) -> usize {
    EntryKind::ALL.iter().position(|k| *k == kind).expect("every entry kind is listed")
}

pub struct Session {
    graph: Arc<Graph>,
    program: Arc<Program>,
    executor: Executor,
    /// The host buffers of the entry last bound, at the offsets of its layout (multiples of
    /// 64 bytes from the arena's start, which is on a cache line: every buffer is).
    arena: AlignedBuf,
    /// Per entry (in [`EntryKind::ALL`] order), its layout for runs of its micro-batch size;
    /// computed on first use.
    layouts: Vec<Option<Layout>>,
    /// The entry whose layout the arena holds now.
    bound: Option<EntryKind>,
    /// The network's output buffer (read by `forward`).
    output: Vec<BufId>,
    budget: u64,
    max_batch: usize,
    threads: usize,
    /// Per-kernel cumulative seconds and launches, when profiling is on.
    /// Per kernel while profiling: seconds, launches, FLOPs of those launches.
    profile: Option<Vec<KernelTime>>,
    /// Why `Device::Auto` did not get CUDA.
    fallback: Option<String>,
}

impl Session {
    pub fn new(graph: Arc<Graph>, program: Arc<Program>, max_batch: usize, device: Device) -> Result<Session> {
        let cpu = |program: &Program| -> Result<Executor> {
            let mut backend = CpuBackend::new().map_err(|e| Error::Backend(e.to_string()))?;
            Ok(Executor::Cpu(backend.compile(&program.kernels).map_err(|e| Error::Backend(e.to_string()))?))
        };
        let mut fallback = None;
        let executor = match device {
            Device::Interpreter => Executor::Interpreter,
            Device::Cpu => cpu(&program)?,
            Device::Cuda => Executor::Cuda(Box::new(CudaExec::new(&program, max_batch)?)),
            Device::CudaHost => {
                let rendered = pdgc_codegen::cuda::render_module_for(&program.kernels, Some(max_batch as u64))
                    .map_err(|e| Error::Backend(e.to_string()))?;
                Executor::CudaHost(
                    pdgc_codegen::cuda::host::compile(&rendered, &program.kernels)
                        .map_err(|e| Error::Backend(e.to_string()))?,
                )
            }
            Device::Auto => match CudaExec::new(&program, max_batch) {
                Ok(exec) => Executor::Cuda(Box::new(exec)),
                Err(e) => {
                    log::debug!("Device::Auto: using the CPU, because CUDA is not usable: {e}");
                    fallback = Some(e.to_string());
                    cpu(&program)?
                }
            },
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let output = memory::output(&graph, &program);
        Ok(Session {
            graph,
            program,
            executor,
            arena: AlignedBuf::new(),
            layouts: vec![None; EntryKind::ALL.len()],
            bound: None,
            output,
            budget: memory::default_budget(),
            max_batch,
            threads,
            profile: None,
            fallback,
        })
    }

    /// What the session runs on, e.g. `cuda (NVIDIA H200, sm_90)` or `cpu (2 threads)`.
    pub fn device_description(&self) -> String {
        match &self.executor {
            Executor::Cpu(_) => format!("cpu ({} threads)", self.threads),
            Executor::Interpreter => "interpreter".to_string(),
            Executor::CudaHost(_) => {
                "cuda-host (CUDA C on the CPU, one block at a time, its threads as coroutines)".to_string()
            }
            Executor::Cuda(c) => format!("cuda ({}, {})", c.dev.name(), c.dev.arch()),
        }
    }

    /// Why a [`Device::Auto`] session runs on the CPU rather than CUDA (`None` if it did
    /// not fall back).
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Sets the number of worker threads (default: all cores).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// Sets the memory budget of the host arena in bytes (default: 90% of the memory the
    /// machine has available when the session is made). Runs that would need more are cut
    /// into micro-batches.
    pub fn set_memory_budget(&mut self, bytes: u64) {
        self.budget = bytes;
        self.layouts = vec![None; EntryKind::ALL.len()];
        self.bound = None;
    }

    pub fn memory_budget(&self) -> u64 {
        self.budget
    }

    /// The layout `kind` runs with: its largest micro-batch within the budget.
    fn layout(&mut self, kind: EntryKind) -> Result<&Layout> {
        let i = entry_index(kind);
        if self.layouts[i].is_none() {
            let layout = memory::micro_batch(&self.program, kind, self.max_batch as u64, self.budget, &self.output)
                .map_err(|one| Error::OutOfMemory {
                    what: format!("one example of the {} step", kind.name()),
                    bytes: one.bytes(),
                    budget: Some(self.budget),
                    advice: "raise --memory-budget, or free memory".into(),
                })?;
            self.layouts[i] = Some(layout);
        }
        Ok(self.layouts[i].as_ref().expect("just computed"))
    }

    /// How many examples one run of `kind` takes (the micro-batch size within the budget)
    /// and the bytes of host memory its buffers take.
    pub fn micro_batch(&mut self, kind: EntryKind) -> Result<(usize, u64)> {
        let l = self.layout(kind)?;
        Ok((l.batch as usize, l.bytes()))
    }

    /// The host memory a step of `kind` on `batch` examples holds outside the arena: the
    /// caller's parameters and the results read out (see [`memory::outside`]).
    pub fn outside_bytes(&mut self, kind: EntryKind, batch: usize) -> Result<u64> {
        let micro = self.layout(kind)?.batch;
        Ok(memory::outside(&self.program, kind, batch as u64, micro))
    }

    /// Starts (or restarts) timing every kernel launch.
    pub fn enable_profiling(&mut self) {
        self.profile = Some(vec![KernelTime::default(); self.program.kernels.len()]);
    }

    /// Per kernel launched since profiling started: name and totals, slowest first.
    pub fn profile(&self) -> Vec<(String, KernelTime)> {
        let Some(p) = &self.profile else { return Vec::new() };
        let mut rows: Vec<(String, KernelTime)> = p
            .iter()
            .enumerate()
            .filter(|(_, t)| t.launches > 0)
            .map(|(i, t)| (self.program.kernels[i].name.clone(), *t))
            .collect();
        rows.sort_by(|a, b| b.1.secs.total_cmp(&a.1.secs));
        rows
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Lays the arena out for `kind`, growing it (fallibly) if needed.
    fn prepare(&mut self, kind: EntryKind) -> Result<()> {
        let len = self.layout(kind)?.len as usize;
        self.arena.grow(len, POISON).map_err(|_| Error::OutOfMemory {
            what: format!("the {} step's buffers", kind.name()),
            bytes: len as u64 * 4,
            budget: None,
            advice: "lower --memory-budget to run in smaller micro-batches, or free memory".into(),
        })?;
        self.bound = Some(kind);
        Ok(())
    }

    /// The arena range of buffer `id` for a batch of `batch` (`None`: unused by the entry).
    fn range(&self, id: BufId, batch: u64) -> Option<std::ops::Range<usize>> {
        let layout = self.layouts[entry_index(self.bound?)].as_ref()?;
        let start = layout.offsets[id.0 as usize]? as usize;
        Some(start..start + self.program.buffer(id).len(batch) as usize)
    }

    /// Writes the inputs of one run (`batch` holds at most one micro-batch) into the arena.
    fn bind(&mut self, params: &Params, batch: &Batch) -> Result<usize> {
        let b = batch.size()?;
        let program = Arc::clone(&self.program);
        for (i, decl) in program.buffers.iter().enumerate() {
            let id = BufId(i as u32);
            let data: &[f32] = match &decl.role {
                Role::Param(name) => {
                    let t = params.get(name).ok_or_else(|| Error::MissingTensor {
                        file: "params".into(),
                        name: name.clone(),
                        hint: String::new(),
                    })?;
                    if t.shape != decl.shape {
                        return Err(Error::Shape {
                            file: "params".into(),
                            name: name.clone(),
                            expected: format!("{:?}", decl.shape),
                            found: t.shape.clone(),
                        });
                    }
                    &t.data
                }
                Role::Input(name) => {
                    let t = batch.inputs.get(name).ok_or_else(|| Error::MissingTensor {
                        file: "batch".into(),
                        name: name.clone(),
                        hint: " (a model input)".into(),
                    })?;
                    if t.shape[1..] != decl.shape[..] {
                        return Err(Error::Shape {
                            file: "batch".into(),
                            name: name.clone(),
                            expected: format!("[B, {:?}]", decl.shape),
                            found: t.shape.clone(),
                        });
                    }
                    &t.data
                }
                Role::Label => match &batch.labels {
                    Labels::Classes(v) => {
                        if let Some(r) = self.range(id, b as u64) {
                            for (dst, &c) in self.arena[r].iter_mut().zip(v) {
                                *dst = c as f32;
                            }
                        }
                        continue;
                    }
                    Labels::Target(t) => &t.data,
                },
                _ => continue,
            };
            if let Some(r) = self.range(id, b as u64) {
                self.arena[r.start..r.start + data.len()].copy_from_slice(data);
            }
        }
        Ok(b)
    }

    fn set_clip_norm(&mut self, clip: f32) {
        if let Some(r) = self.program.find(&Role::ClipNorm).and_then(|id| self.range(id, 1)) {
            self.arena[r.start] = clip;
        }
    }

    /// Copies the bound inputs (parameters, batch, labels, clip norm) to the device.
    fn upload_inputs(&mut self, batch: usize) -> Result<()> {
        if !matches!(self.executor, Executor::Cuda(_)) {
            return Ok(());
        }
        for (i, decl) in self.program.buffers.iter().enumerate() {
            if !memory::is_bound(&decl.role) {
                continue;
            }
            let Some(r) = self.range(BufId(i as u32), batch as u64) else { continue };
            let Executor::Cuda(c) = &mut self.executor else { unreachable!("checked above") };
            c.dev.upload(&mut c.buffers[i], &self.arena[r]).map_err(|e| Error::Device(e.to_string()))?;
        }
        Ok(())
    }

    /// Runs one entry point on the bound buffers.
    fn run(&mut self, kind: EntryKind, batch: usize) -> Result<()> {
        if batch == 0 {
            return Ok(()); // Nothing to launch: `read` gives the empty batch's results.
        }
        self.upload_inputs(batch)?;
        let program = Arc::clone(&self.program);
        let launches = &program.entry(kind).launches;
        for launch in launches {
            let mut seen = launch.args.clone();
            seen.sort();
            seen.dedup();
            if seen.len() != launch.args.len() {
                return Err(Error::Internal(format!(
                    "kernel {} binds one buffer twice",
                    program.kernels[launch.kernel].name
                )));
            }
        }
        let mut i = 0;
        while i < launches.len() {
            let launch = &launches[i];
            match launch.mode {
                LaunchMode::Grid => self.launch(&program, launch.kernel, &launch.args, batch as u64, None)?,
                LaunchMode::PerExample => {
                    for n in 0..batch {
                        self.launch(&program, launch.kernel, &launch.args, 1, Some(n))?;
                    }
                }
                LaunchMode::Chunked { group, examples } => {
                    // The group's launches run together on each chunk of examples: as few
                    // chunks as hold `examples` each, of near-equal sizes (128 examples in
                    // chunks of at most 104 run as 64 + 64, not 104 + 24).
                    let len = launches[i..].iter().take_while(|l| l.mode == launch.mode).count();
                    let chunks = batch.div_ceil((examples as usize).max(1));
                    let step = batch.div_ceil(chunks.max(1)).max(1);
                    for start in (0..batch).step_by(step) {
                        let rows = step.min(batch - start);
                        for l in &launches[i..i + len] {
                            self.launch(&program, l.kernel, &l.args, rows as u64, Some(start))?;
                        }
                    }
                    debug_assert!(launches[i + len..].iter().all(|l| !matches!(l.mode,
                        LaunchMode::Chunked { group: g, .. } if g == group)));
                    i += len;
                    continue;
                }
            }
            i += 1;
        }
        Ok(())
    }

    /// Launches one kernel on `batch` examples. With `start = Some(n)`, batched buffers
    /// are narrowed to examples `n..n + batch` (a chunk workspace to its first `batch`
    /// examples) and the kernel sees a batch of `batch`.
    fn launch(
        &mut self,
        program: &Program,
        kernel: usize,
        args: &[BufId],
        batch: u64,
        start: Option<usize>,
    ) -> Result<()> {
        let started = self.profile.is_some().then(std::time::Instant::now);
        if let Executor::Cuda(c) = &self.executor {
            let views: Vec<View<'_>> = args
                .iter()
                .map(|id| {
                    let decl = program.buffer(*id);
                    let buffer = &c.buffers[id.0 as usize];
                    let (offset, len) = narrow(decl, start, batch);
                    View { buffer, offset, len }
                })
                .collect();
            c.dev.launch(&c.module, kernel, &views, batch).map_err(|e| Error::Backend(e.to_string()))?;
            if let (Some(p), Some(t)) = (&mut self.profile, started) {
                c.dev.synchronize().map_err(|e| Error::Device(e.to_string()))?;
                p[kernel].add(t.elapsed().as_secs_f64(), &program.kernels[kernel], batch);
            }
            return Ok(());
        }
        let mut ranges = Vec::with_capacity(args.len());
        for id in args {
            let decl = program.buffer(*id);
            let whole = self.range(*id, batch).ok_or_else(|| {
                Error::Internal(format!("buffer {} of kernel {} has no place in the arena", decl.name, kernel))
            })?;
            let (offset, len) = narrow(decl, start, batch);
            ranges.push(whole.start + offset..whole.start + offset + len);
        }
        let mut slices = carve(&mut self.arena, &ranges)?;
        let result = match &self.executor {
            Executor::Cpu(kernels) => kernels[kernel]
                .run_parallel(&mut slices, batch, self.threads)
                .map_err(|e| Error::Backend(e.to_string())),
            Executor::Interpreter => {
                interp::run(&program.kernels[kernel], &mut slices, batch).map_err(|e| Error::Backend(e.to_string()))
            }
            Executor::CudaHost(m) => m.launch(kernel, &mut slices, batch).map_err(|e| Error::Backend(e.to_string())),
            Executor::Cuda(_) => Err(Error::Internal("a CUDA launch reached the host path".into())),
        };
        if let (Some(p), Some(t)) = (&mut self.profile, started) {
            p[kernel].add(t.elapsed().as_secs_f64(), &program.kernels[kernel], batch);
        }
        result
    }

    /// A result of the run just made on `batch` examples.
    fn read(&self, role: &Role, batch: usize) -> Result<Tensor> {
        let id = self.program.find(role).ok_or_else(|| Error::Internal(format!("no buffer for {role:?}")))?;
        self.read_buffer(id, batch)
    }

    fn read_buffer(&self, id: BufId, batch: usize) -> Result<Tensor> {
        let decl = self.program.buffer(id);
        let mut shape = decl.shape.clone();
        if decl.batched {
            shape.insert(0, batch);
        }
        if batch == 0 {
            // An empty batch: per-example results are empty, sums over no examples are zero.
            return Ok(Tensor::zeros(shape));
        }
        let len = decl.len(batch as u64) as usize;
        let data = match &self.executor {
            Executor::Cuda(c) => {
                c.dev.download(&c.buffers[id.0 as usize], len).map_err(|e| Error::Device(e.to_string()))?
            }
            _ => {
                let r = self.range(id, batch as u64).ok_or_else(|| {
                    Error::Internal(format!("buffer {} is not a result of the entry just run", decl.name))
                })?;
                self.arena[r].to_vec()
            }
        };
        Ok(Tensor::new(shape, data))
    }

    fn per_param(&self, batch: usize, role: impl Fn(String) -> Role) -> Result<TensorMap> {
        self.graph.params.iter().map(|p| Ok((p.name.clone(), self.read(&role(p.name.clone()), batch)?))).collect()
    }

    /// Runs `kind` over `batch` in micro-batches that fit the budget, calling `each` after
    /// every run with the session (to read results), the run's first example and its size.
    /// An empty batch is one run of zero examples (the inputs are still checked).
    fn each_run(
        &mut self,
        kind: EntryKind,
        params: &Params,
        batch: &Batch,
        clip: Option<f32>,
        mut each: impl FnMut(&Session, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let n = batch.size()?;
        if n > self.max_batch {
            return Err(Error::BatchTooLarge { batch: n, max: self.max_batch });
        }
        self.prepare(kind)?;
        let micro = self.layout(kind)?.batch as usize;
        let mut start = 0;
        loop {
            let end = (start + micro).min(n);
            let part;
            let run = if start == 0 && end == n {
                batch
            } else {
                part = batch.slice(start, end);
                &part
            };
            let b = self.bind(params, run)?;
            if let Some(c) = clip {
                self.set_clip_norm(c);
            }
            self.run(kind, b)?;
            each(self, start, b)?;
            start = end;
            if start >= n {
                return Ok(());
            }
        }
    }

    /// The per-example losses `[B]`.
    pub fn loss(&mut self, params: &Params, batch: &Batch) -> Result<Vec<f32>> {
        let mut loss = Vec::new();
        self.each_run(EntryKind::Loss, params, batch, None, |s, _, b| {
            loss.extend(s.read(&Role::Loss, b)?.data);
            Ok(())
        })?;
        Ok(loss)
    }

    /// The network's output (logits or prediction) `[B, ...]`.
    pub fn forward(&mut self, params: &Params, batch: &Batch) -> Result<Tensor> {
        let out = *self.output.first().ok_or_else(|| Error::Internal("the program has no output buffer".into()))?;
        let mut shape = vec![0];
        shape.extend(&self.program.buffer(out).shape);
        let mut data = Vec::new();
        self.each_run(EntryKind::Loss, params, batch, None, |s, _, b| {
            data.extend(s.read_buffer(out, b)?.data);
            Ok(())
        })?;
        shape[0] = batch.size()?;
        Ok(Tensor::new(shape, data))
    }

    /// The ordinary (non-private) gradient of Σ_n loss_n.
    pub fn batch_grad(&mut self, params: &Params, batch: &Batch) -> Result<TensorMap> {
        Ok(self.batch_grad_and_loss(params, batch)?.0)
    }

    /// [`Session::batch_grad`] with the per-example losses `[B]` of the same forward pass.
    pub fn batch_grad_and_loss(&mut self, params: &Params, batch: &Batch) -> Result<(TensorMap, Vec<f32>)> {
        let mut sum: Option<TensorMap> = None;
        let mut loss = Vec::new();
        self.each_run(EntryKind::BatchGrad, params, batch, None, |s, _, b| {
            add_run(&mut sum, s.per_param(b, Role::BatchGrad)?)?;
            loss.extend(s.read(&Role::Loss, b)?.data);
            Ok(())
        })?;
        Ok((sum.unwrap_or_default(), loss))
    }

    /// The gradient of each example's own loss, `NAME -> [B, ...]`. The whole result is
    /// in memory; [`Session::per_example_grads_each`] hands it over run by run instead.
    pub fn per_example_grads(&mut self, params: &Params, batch: &Batch) -> Result<TensorMap> {
        let n = batch.size()?;
        let mut out = TensorMap::new();
        for p in &self.graph.params {
            let mut shape = vec![n];
            shape.extend(&p.shape);
            let len = crate::graph::numel(&shape) as usize;
            let mut data = Vec::new();
            data.try_reserve_exact(len).map_err(|_| Error::OutOfMemory {
                what: format!("the per-example gradients of `{}`", p.name),
                bytes: len as u64 * 4,
                budget: None,
                advice: "use `pdgc grads`, which streams them to its output file, or a smaller batch".into(),
            })?;
            out.insert(p.name.clone(), Tensor { shape, data });
        }
        self.per_example_grads_each(params, batch, |_, part| {
            for (name, t) in part {
                out.get_mut(&name).expect("one per parameter").data.extend(t.data);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The per-example gradients run by run: `each(first example, NAME -> [b, ...])` for
    /// consecutive micro-batches covering `batch`, so a caller can write them out without
    /// holding the whole batch's gradients in memory.
    pub fn per_example_grads_each(
        &mut self,
        params: &Params,
        batch: &Batch,
        mut each: impl FnMut(usize, TensorMap) -> Result<()>,
    ) -> Result<()> {
        self.each_run(EntryKind::PerExampleGrads, params, batch, None, |s, start, b| {
            each(start, s.per_param(b, Role::PerExampleGrad)?)
        })
    }

    /// `‖g_n‖` over all parameters, `[B]`.
    pub fn per_example_norms(&mut self, params: &Params, batch: &Batch) -> Result<Vec<f32>> {
        Ok(self.per_example_norms_and_loss(params, batch)?.0)
    }

    /// `‖g_n‖` over all parameters and the per-example losses, `[B]` each, from one step.
    pub fn per_example_norms_and_loss(&mut self, params: &Params, batch: &Batch) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut norms, mut loss) = (Vec::new(), Vec::new());
        self.each_run(EntryKind::PerExampleNorms, params, batch, Some(1.0), |s, _, b| {
            norms.extend(s.read(&Role::Norms, b)?.data);
            loss.extend(s.read(&Role::Loss, b)?.data);
            Ok(())
        })?;
        Ok((norms, loss))
    }

    /// `Σ_n min(1, C/(‖g_n‖ + 1e-6)) g_n`, with the norms and losses it saw.
    pub fn clipped_grad_sum(&mut self, params: &Params, batch: &Batch, clip: f32) -> Result<ClippedSum> {
        if !(clip > 0.0 && clip.is_finite()) {
            return Err(Error::BadClipNorm(clip));
        }
        let mut sum: Option<TensorMap> = None;
        let (mut norms, mut loss) = (Vec::new(), Vec::new());
        self.each_run(EntryKind::ClippedSum, params, batch, Some(clip), |s, _, b| {
            add_run(&mut sum, s.per_param(b, Role::ClippedSum)?)?;
            norms.extend(s.read(&Role::Norms, b)?.data);
            loss.extend(s.read(&Role::Loss, b)?.data);
            Ok(())
        })?;
        Ok(ClippedSum { sum: sum.unwrap_or_default(), norms, loss })
    }
}

/// The part of a buffer a launch on `batch` examples from `start` binds, as (offset, length)
/// in elements: the examples' rows of a batched buffer, the first `batch` examples of a
/// chunk workspace, a whole unbatched buffer.
fn narrow(decl: &crate::lower::BufferDecl, start: Option<usize>, batch: u64) -> (usize, usize) {
    let len = decl.len(batch) as usize;
    match (start, decl.batched, decl.chunk) {
        (Some(n), true, None) => (n * decl.per_example_len() as usize, len),
        _ => (0, len),
    }
}

/// Adds a micro-batch's sums into the running ones (the first run's sums are taken as
/// they are, so a batch that fits in one run gives exactly the one-run result).
fn add_run(acc: &mut Option<TensorMap>, part: TensorMap) -> Result<()> {
    match acc {
        None => *acc = Some(part),
        Some(acc) => crate::tensor::add_into(acc, &part)?,
    }
    Ok(())
}

/// Disjoint mutable slices of `arena`, one per range, in the order given. The buffer plan
/// never places two buffers of one launch where they overlap; if it did, this is an
/// internal error rather than aliasing.
fn carve<'a>(arena: &'a mut [f32], ranges: &[std::ops::Range<usize>]) -> Result<Vec<&'a mut [f32]>> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| (ranges[i].start, ranges[i].end));
    let mut out: Vec<Option<&'a mut [f32]>> = (0..ranges.len()).map(|_| None).collect();
    let mut rest = arena;
    let mut base = 0;
    for i in order {
        let r = &ranges[i];
        if r.start < base || r.end > base + rest.len() {
            return Err(Error::Internal(format!("arena ranges overlap or overrun: {ranges:?}")));
        }
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - base);
        let (mine, tail) = tail.split_at_mut(r.len());
        out[i] = Some(mine);
        rest = tail;
        base = r.end;
    }
    Ok(out.into_iter().map(|s| s.expect("every range was carved")).collect())
}

/// One kernel's launches while profiling.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KernelTime {
    pub secs: f64,
    pub launches: u64,
    /// The FLOPs of those launches ([`pdgc_codegen::analysis::work`]: contractions and
    /// loop-nest arithmetic), for achieved FLOP/s.
    pub flops: u64,
    /// Whether the kernel holds a contraction (a GEMM-shaped product).
    pub contraction: bool,
}

impl KernelTime {
    fn add(&mut self, secs: f64, kernel: &pdgc_codegen::ir::Kernel, batch: u64) {
        self.secs += secs;
        self.launches += 1;
        self.flops = self.flops.saturating_add(pdgc_codegen::analysis::work::work(kernel, batch).flops());
        self.contraction = kernel.has_contractions();
    }
}
