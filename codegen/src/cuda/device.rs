//! A CUDA device through cudarc's driver API: one context and stream, device buffers,
//! modules compiled by NVRTC for the device's own architecture, and checked launches.
//!
//! cudarc loads `libcuda` at run time and panics if asked for a symbol it cannot load, so
//! [`CudaDevice::open`] first checks that the library opens, then creates the context
//! (which fails with a driver error, not a panic, when there is no GPU).
//!
//! All work goes to one stream, in order; downloads synchronize it. Launch arguments are
//! raw device addresses (a buffer's base plus an element offset, for the per-example
//! launches that narrow a batched buffer to one example), checked against the kernel's
//! argument lengths before every launch.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use super::nvrtc::{compile_cubin, Arch, Opt};
use super::{CudaError, CudaModule, LaunchInfo};
use crate::ir::{Arg, Mode};

/// NVRTC takes seconds on a large module, and a process often loads the same one several
/// times (one session per strategy in `pdgc bench`), so cubins are kept per (source, arch).
fn cached_cubin(source: &str, arch: Arch) -> Result<Vec<u8>, CudaError> {
    static CACHE: Mutex<BTreeMap<(u32, String), Vec<u8>>> = Mutex::new(BTreeMap::new());
    let key = (arch.0, source.to_string());
    if let Some(c) = CACHE.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(c);
    }
    let cubin = compile_cubin(source, "pdgc_module.cu", arch, Opt::Full)?;
    if let Ok(mut m) = CACHE.lock() {
        m.insert(key, cubin.clone());
    }
    Ok(cubin)
}

/// An open device: context, stream, name and architecture.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    arch: Arch,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("name", &self.name).field("arch", &self.arch).finish()
    }
}

/// A device allocation of f32s.
pub struct DeviceBuffer {
    slice: CudaSlice<f32>,
}

impl DeviceBuffer {
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }
}

/// A module loaded on a device: one function per kernel, with its launch info.
pub struct LoadedModule {
    funcs: Vec<CudaFunction>,
    infos: Vec<LaunchInfo>,
    args: Vec<Vec<Arg>>,
    names: Vec<String>,
}

/// One launch argument: `len` elements of `buffer` from element `offset` on.
pub struct View<'a> {
    pub buffer: &'a DeviceBuffer,
    pub offset: usize,
    pub len: usize,
}

fn driver(what: &str) -> impl Fn(cudarc::driver::DriverError) -> CudaError + '_ {
    move |e| CudaError::Driver(format!("{what}: {e:?}"))
}

impl CudaDevice {
    /// Opens device `ordinal`, or says why it cannot.
    pub fn open(ordinal: usize) -> Result<CudaDevice, CudaError> {
        // SAFETY: only tries to dlopen the candidate names; resolves no symbol.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::DriverMissing(format!(
                "the CUDA driver library was not found (tried {}); is there an NVIDIA GPU and driver on this machine?",
                super::candidates("cuda")
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("creating a context"))?;
        let name = ctx.name().map_err(driver("device name"))?;
        let (major, minor) = ctx.compute_capability().map_err(driver("compute capability"))?;
        let stream = ctx.default_stream();
        Ok(CudaDevice { ctx, stream, name, arch: Arch((major * 10 + minor) as u32) })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Compiles `module` with NVRTC for this device's architecture and loads it.
    pub fn load(&self, module: &CudaModule, kernels: &[crate::ir::Kernel]) -> Result<LoadedModule, CudaError> {
        let cubin = cached_cubin(&module.source, self.arch)?;
        let loaded = self.ctx.load_module(Ptx::from_binary(cubin)).map_err(driver("loading the module"))?;
        let funcs = module
            .kernels
            .iter()
            .map(|k| loaded.load_function(&k.symbol).map_err(driver(&k.symbol)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LoadedModule {
            funcs,
            infos: module.kernels.clone(),
            args: kernels.iter().map(|k| k.args.clone()).collect(),
            names: kernels.iter().map(|k| k.name.clone()).collect(),
        })
    }

    /// A zeroed buffer of `len` f32s.
    pub fn alloc(&self, len: usize) -> Result<DeviceBuffer, CudaError> {
        let slice = self.stream.alloc_zeros::<f32>(len.max(1)).map_err(driver("allocating"))?;
        Ok(DeviceBuffer { slice })
    }

    /// Copies `data` into `buffer` from element 0.
    pub fn upload(&self, buffer: &mut DeviceBuffer, data: &[f32]) -> Result<(), CudaError> {
        if data.len() > buffer.len() {
            return Err(CudaError::Driver(format!(
                "upload of {} elements into a buffer of {}",
                data.len(),
                buffer.len()
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        let mut dst = buffer.slice.slice_mut(..data.len());
        self.stream.memcpy_htod(data, &mut dst).map_err(driver("uploading"))
    }

    /// The first `len` elements of `buffer` (synchronizes the stream).
    pub fn download(&self, buffer: &DeviceBuffer, len: usize) -> Result<Vec<f32>, CudaError> {
        if len > buffer.len() {
            return Err(CudaError::Driver(format!("download of {len} elements from a buffer of {}", buffer.len())));
        }
        let mut out = vec![0.0f32; len];
        if len > 0 {
            let src = buffer.slice.slice(..len);
            self.stream.memcpy_dtoh(&src, &mut out).map_err(driver("downloading"))?;
        }
        self.stream.synchronize().map_err(driver("synchronizing"))?;
        Ok(out)
    }

    /// Waits for all queued work; reports a failed kernel.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(driver("synchronizing"))
    }

    /// Launches kernel `index` of `module` on `views` (one per bound argument) for `batch`.
    pub fn launch(&self, module: &LoadedModule, index: usize, views: &[View<'_>], batch: u64) -> Result<(), CudaError> {
        let (func, info, args) = match (module.funcs.get(index), module.infos.get(index), module.args.get(index)) {
            (Some(f), Some(i), Some(a)) => (f, i, a),
            _ => return Err(CudaError::Driver(format!("no kernel {index} in the module"))),
        };
        let name = &module.names[index];
        super::check_lengths(name, args, &views.iter().map(|v| v.len).collect::<Vec<_>>(), batch)?;
        let bound = args.iter().filter(|a| a.is_bound());
        for (a, v) in bound.zip(views) {
            if v.offset.checked_add(v.len).is_none_or(|end| end > v.buffer.len()) {
                return Err(CudaError::BufferLen {
                    kernel: name.clone(),
                    arg: a.name.clone(),
                    batch,
                    expected: format!("{} from element {}", v.len, v.offset),
                    got: v.buffer.len(),
                });
            }
        }
        let Some((blocks, threads)) = info.dims(batch)? else { return Ok(()) };
        // Private memory, one slice per grid iteration, allocated for this launch (freed in
        // stream order after it).
        let private = super::private_lens(name, args, info.grid(), batch)?
            .into_iter()
            .map(|n| self.alloc(n))
            .collect::<Result<Vec<_>, _>>()?;
        let (mut given, mut own) = (views.iter(), private.iter());
        let all: Vec<(&DeviceBuffer, usize)> = args
            .iter()
            .filter_map(|a| match a.mode {
                Mode::Private => own.next().map(|b| (b, 0)),
                _ => given.next().map(|v| (v.buffer, v.offset)),
            })
            .collect();
        // Keep the read/write records alive until the launch is queued.
        let mut records = Vec::with_capacity(all.len());
        let mut ptrs: Vec<u64> = Vec::with_capacity(all.len());
        for (buffer, offset) in all {
            let (base, record) = buffer.slice.device_ptr(&self.stream);
            ptrs.push(base + (offset * std::mem::size_of::<f32>()) as u64);
            records.push(record);
        }
        let mut builder = self.stream.launch_builder(func);
        for p in &ptrs {
            builder.arg(p);
        }
        builder.arg(&batch);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the function takes one `float*` per argument and then the batch, as
        // `render_kernel` writes it; every pointer addresses a live allocation with at least
        // the length the kernel's verified accesses need at this batch (checked above); the
        // grid covers exactly the kernel's extent (threads past it return at once).
        unsafe { builder.launch(cfg) }.map_err(driver(name))?;
        drop(records);
        Ok(())
    }
}
