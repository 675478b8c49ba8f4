//! Sessions: a compiled program bound to a device, with its buffers allocated for the
//! module's maximum batch. A session runs an entry point of the program (loss, batch
//! gradient, per-example grads, norms, clipped sum) on a batch and returns named tensors.
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

use pdgc_codegen::cpu::{CompiledKernel, CpuBackend};
use pdgc_codegen::cuda::device::{CudaDevice, DeviceBuffer, LoadedModule, View};
use pdgc_codegen::cuda::host::HostModule;
use pdgc_codegen::interp;

use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::lower::{BufId, EntryKind, LaunchMode, Program, Role};
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
    /// The generated CUDA C compiled for this machine by its C++ compiler and run one
    /// GPU thread at a time (`pdgc_codegen::cuda::host`): checks the CUDA backend's code
    /// without a GPU. Slow; for testing.
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
        let rendered =
            pdgc_codegen::cuda::render_module(&program.kernels).map_err(|e| Error::Backend(e.to_string()))?;
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

pub struct Session {
    graph: Arc<Graph>,
    program: Arc<Program>,
    executor: Executor,
    buffers: Vec<Vec<f32>>,
    max_batch: usize,
    threads: usize,
    /// Per-kernel cumulative seconds and launches, when profiling is on.
    profile: Option<Vec<(f64, u64)>>,
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
                let rendered =
                    pdgc_codegen::cuda::render_module(&program.kernels).map_err(|e| Error::Backend(e.to_string()))?;
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
        let buffers = program.buffers.iter().map(|b| vec![0.0f32; b.len(max_batch as u64) as usize]).collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Session { graph, program, executor, buffers, max_batch, threads, profile: None, fallback })
    }

    /// What the session runs on, e.g. `cuda (NVIDIA H200, sm_90)` or `cpu (2 threads)`.
    pub fn device_description(&self) -> String {
        match &self.executor {
            Executor::Cpu(_) => format!("cpu ({} threads)", self.threads),
            Executor::Interpreter => "interpreter".to_string(),
            Executor::CudaHost(_) => "cuda-host (CUDA C on the CPU, one thread at a time)".to_string(),
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

    /// Starts (or restarts) timing every kernel launch.
    pub fn enable_profiling(&mut self) {
        self.profile = Some(vec![(0.0, 0); self.program.kernels.len()]);
    }

    /// Kernel name, total seconds and launches since profiling started, slowest first.
    pub fn profile(&self) -> Vec<(String, f64, u64)> {
        let Some(p) = &self.profile else { return Vec::new() };
        let mut rows: Vec<(String, f64, u64)> = p
            .iter()
            .enumerate()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(i, (t, n))| (self.program.kernels[i].name.clone(), *t, *n))
            .collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        rows
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn bind(&mut self, params: &Params, batch: &Batch) -> Result<usize> {
        let b = batch.size()?;
        if b > self.max_batch {
            return Err(Error::BatchTooLarge { batch: b, max: self.max_batch });
        }
        for (i, decl) in self.program.buffers.iter().enumerate() {
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
                        let buf = &mut self.buffers[i];
                        for (dst, &c) in buf.iter_mut().zip(v) {
                            *dst = c as f32;
                        }
                        continue;
                    }
                    Labels::Target(t) => &t.data,
                },
                _ => continue,
            };
            self.buffers[i][..data.len()].copy_from_slice(data);
        }
        Ok(b)
    }

    fn set_clip_norm(&mut self, clip: f32) {
        if let Some(id) = self.program.find(&Role::ClipNorm) {
            self.buffers[id.0 as usize][0] = clip;
        }
    }

    /// Copies the bound inputs (parameters, batch, labels, clip norm) to the device.
    fn upload_inputs(&mut self, batch: usize) -> Result<()> {
        let Executor::Cuda(c) = &mut self.executor else { return Ok(()) };
        for (i, decl) in self.program.buffers.iter().enumerate() {
            if matches!(decl.role, Role::Param(_) | Role::Input(_) | Role::Label | Role::ClipNorm) {
                let len = decl.len(batch as u64) as usize;
                c.dev.upload(&mut c.buffers[i], &self.buffers[i][..len]).map_err(|e| Error::Device(e.to_string()))?;
            }
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
        let entry = program.entry(kind);
        for launch in &entry.launches {
            let mut seen = launch.args.clone();
            seen.sort();
            seen.dedup();
            if seen.len() != launch.args.len() {
                return Err(Error::Internal(format!(
                    "kernel {} binds one buffer twice",
                    program.kernels[launch.kernel].name
                )));
            }
            match launch.mode {
                LaunchMode::Grid => self.launch(&program, launch.kernel, &launch.args, batch as u64, None)?,
                LaunchMode::PerExample => {
                    for n in 0..batch {
                        self.launch(&program, launch.kernel, &launch.args, 1, Some(n))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Launches one kernel. With `example = Some(n)`, batched buffers are narrowed to
    /// example `n` and the kernel sees a batch of one.
    fn launch(
        &mut self,
        program: &Program,
        kernel: usize,
        args: &[BufId],
        batch: u64,
        example: Option<usize>,
    ) -> Result<()> {
        let started = self.profile.is_some().then(std::time::Instant::now);
        if let Executor::Cuda(c) = &self.executor {
            let views: Vec<View<'_>> = args
                .iter()
                .map(|id| {
                    let decl = program.buffer(*id);
                    let buffer = &c.buffers[id.0 as usize];
                    match (example, decl.batched) {
                        (Some(n), true) => {
                            let per = decl.per_example_len() as usize;
                            View { buffer, offset: n * per, len: per }
                        }
                        _ => View { buffer, offset: 0, len: decl.len(batch) as usize },
                    }
                })
                .collect();
            c.dev.launch(&c.module, kernel, &views, batch).map_err(|e| Error::Backend(e.to_string()))?;
            if let (Some(p), Some(t)) = (&mut self.profile, started) {
                c.dev.synchronize().map_err(|e| Error::Device(e.to_string()))?;
                p[kernel].0 += t.elapsed().as_secs_f64();
                p[kernel].1 += 1;
            }
            return Ok(());
        }
        let mut taken: Vec<Vec<f32>> = args.iter().map(|b| std::mem::take(&mut self.buffers[b.0 as usize])).collect();
        let result = {
            let mut slices: Vec<&mut [f32]> = taken
                .iter_mut()
                .zip(args)
                .map(|(buf, id)| {
                    let decl = program.buffer(*id);
                    match (example, decl.batched) {
                        (Some(n), true) => {
                            let per = decl.per_example_len() as usize;
                            &mut buf[n * per..(n + 1) * per]
                        }
                        _ => &mut buf[..decl.len(batch) as usize],
                    }
                })
                .collect();
            match &self.executor {
                Executor::Cpu(kernels) => kernels[kernel]
                    .run_parallel(&mut slices, batch, self.threads)
                    .map_err(|e| Error::Backend(e.to_string())),
                Executor::Interpreter => {
                    interp::run(&program.kernels[kernel], &mut slices, batch).map_err(|e| Error::Backend(e.to_string()))
                }
                Executor::CudaHost(m) => {
                    m.launch(kernel, &mut slices, batch).map_err(|e| Error::Backend(e.to_string()))
                }
                Executor::Cuda(_) => Err(Error::Internal("a CUDA launch reached the host path".into())),
            }
        };
        for (id, buf) in args.iter().zip(taken) {
            self.buffers[id.0 as usize] = buf;
        }
        if let (Some(p), Some(t)) = (&mut self.profile, started) {
            p[kernel].0 += t.elapsed().as_secs_f64();
            p[kernel].1 += 1;
        }
        result
    }

    fn read(&self, role: &Role, batch: usize) -> Result<Tensor> {
        let id = self.program.find(role).ok_or_else(|| Error::Internal(format!("no buffer for {role:?}")))?;
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
            _ => self.buffers[id.0 as usize][..len].to_vec(),
        };
        Ok(Tensor::new(shape, data))
    }

    fn per_param(&self, batch: usize, role: impl Fn(String) -> Role) -> Result<TensorMap> {
        self.graph.params.iter().map(|p| Ok((p.name.clone(), self.read(&role(p.name.clone()), batch)?))).collect()
    }

    /// The per-example losses `[B]`.
    pub fn loss(&mut self, params: &Params, batch: &Batch) -> Result<Vec<f32>> {
        let b = self.bind(params, batch)?;
        self.run(EntryKind::Loss, b)?;
        Ok(self.read(&Role::Loss, b)?.data)
    }

    /// The network's output (logits or prediction) `[B, ...]`.
    pub fn forward(&mut self, params: &Params, batch: &Batch) -> Result<Tensor> {
        let b = self.bind(params, batch)?;
        self.run(EntryKind::Loss, b)?;
        let out = self.graph.loss.input();
        let role = match &self.graph.node(out).op {
            crate::graph::Op::Input { name } => Role::Input(name.clone()),
            _ => Role::Activation(out.0),
        };
        self.read(&role, b)
    }

    /// The ordinary (non-private) gradient of Σ_n loss_n.
    pub fn batch_grad(&mut self, params: &Params, batch: &Batch) -> Result<TensorMap> {
        Ok(self.batch_grad_and_loss(params, batch)?.0)
    }

    /// [`Session::batch_grad`] with the per-example losses `[B]` of the same forward pass.
    pub fn batch_grad_and_loss(&mut self, params: &Params, batch: &Batch) -> Result<(TensorMap, Vec<f32>)> {
        let b = self.bind(params, batch)?;
        self.run(EntryKind::BatchGrad, b)?;
        Ok((self.per_param(b, Role::BatchGrad)?, self.read(&Role::Loss, b)?.data))
    }

    /// The gradient of each example's own loss, `NAME -> [B, ...]`.
    pub fn per_example_grads(&mut self, params: &Params, batch: &Batch) -> Result<TensorMap> {
        let b = self.bind(params, batch)?;
        self.run(EntryKind::PerExampleGrads, b)?;
        self.per_param(b, Role::PerExampleGrad)
    }

    /// `‖g_n‖` over all parameters, `[B]`.
    pub fn per_example_norms(&mut self, params: &Params, batch: &Batch) -> Result<Vec<f32>> {
        let b = self.bind(params, batch)?;
        self.set_clip_norm(1.0);
        self.run(EntryKind::PerExampleNorms, b)?;
        Ok(self.read(&Role::Norms, b)?.data)
    }

    /// `Σ_n min(1, C/(‖g_n‖ + 1e-6)) g_n`, with the norms and losses it saw.
    pub fn clipped_grad_sum(&mut self, params: &Params, batch: &Batch, clip: f32) -> Result<ClippedSum> {
        if !(clip > 0.0 && clip.is_finite()) {
            return Err(Error::BadClipNorm(clip));
        }
        let b = self.bind(params, batch)?;
        self.set_clip_norm(clip);
        self.run(EntryKind::ClippedSum, b)?;
        Ok(ClippedSum {
            sum: self.per_param(b, Role::ClippedSum)?,
            norms: self.read(&Role::Norms, b)?.data,
            loss: self.read(&Role::Loss, b)?.data,
        })
    }
}
