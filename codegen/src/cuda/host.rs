//! The generated CUDA C, run on the host: the module is compiled by the system C++
//! compiler (`$CXX`, else `c++`) against a small shim of the CUDA built-ins it uses
//! (`blockIdx`, `threadIdx`, `blockDim`, `__int_as_float`, the qualifiers), and each launch
//! runs every (block, thread) pair of the launch grid in turn, exactly as [`super::LaunchInfo`]
//! sizes it on a GPU.
//!
//! This checks what the renderer writes (indexing, the thread decomposition of parallel
//! nests, guards, helpers) on machines without a GPU, which is every CI machine. It does
//! not check what only hardware shows: races between threads (the IR's independence proofs
//! cover those), CUDA's own math functions (the host's libm stands in), or speed.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{CudaError, CudaModule};
use crate::ir::{Arg, Kernel};

/// The CUDA built-ins the generated code uses, for a C++ host compiler.
const SHIM: &str = r#"
#include <math.h>
#include <string.h>
struct pdgc_dim3 { unsigned int x, y, z; };
static thread_local pdgc_dim3 blockIdx, threadIdx, blockDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(n)
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
"#;

type Launcher = unsafe extern "C" fn(bufs: *const *mut f32, batch: u64, blocks: u32, threads: u32);

/// A rendered module compiled for the host.
pub struct HostModule {
    launchers: Vec<Launcher>,
    module: CudaModule,
    args: Vec<Vec<Arg>>,
    names: Vec<String>,
    _lib: libloading::Library,
}

/// Compiles `module` (rendered from `kernels`) with the host's C++ compiler.
pub fn compile(module: &CudaModule, kernels: &[Kernel]) -> Result<HostModule, CudaError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "pdgc-cuda-host-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| CudaError::Host(format!("creating {}: {e}", dir.display())))?;
    let result = compile_in(&dir, module, kernels);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn compile_in(dir: &std::path::Path, module: &CudaModule, kernels: &[Kernel]) -> Result<HostModule, CudaError> {
    let mut source = String::from(SHIM);
    source.push_str(&module.source);
    for k in &module.kernels {
        let args: Vec<String> = (0..k.args).map(|i| format!("b[{i}]")).collect();
        source.push_str(&format!(
            "\nextern \"C\" void host_{sym}(float* const* b, unsigned long long batch, unsigned blocks, unsigned threads) {{\n  \
             blockDim.x = threads; blockDim.y = 1; blockDim.z = 1;\n  \
             for (unsigned bx = 0; bx < blocks; ++bx)\n    \
             for (unsigned tx = 0; tx < threads; ++tx) {{\n      \
             blockIdx.x = bx; threadIdx.x = tx;\n      {sym}({args}batch);\n    }}\n}}\n",
            sym = k.symbol,
            args = args.iter().map(|a| format!("{a}, ")).collect::<String>(),
        ));
    }
    let cpp = dir.join("module.cpp");
    let lib = dir.join("module.so");
    std::fs::write(&cpp, &source).map_err(|e| CudaError::Host(format!("writing {}: {e}", cpp.display())))?;
    let cxx = std::env::var_os("CXX").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("c++"));
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-w", "-o"])
        .arg(&lib)
        .arg(&cpp)
        .output()
        .map_err(|e| CudaError::Host(format!("running {}: {e} (set CXX to a C++ compiler)", cxx.display())))?;
    if !out.status.success() {
        return Err(CudaError::Compile {
            arch: format!("host ({})", cxx.display()),
            status: out.status.to_string(),
            log: String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
            code: source,
        });
    }
    // SAFETY: the library is the one just built from our own source; loading runs no
    // initializers of note (static zero-initialized structs only).
    let loaded = unsafe { libloading::Library::new(&lib) }.map_err(|e| CudaError::Host(format!("loading: {e}")))?;
    let launchers = module
        .kernels
        .iter()
        .map(|k| {
            let name = format!("host_{}", k.symbol);
            // SAFETY: `host_<symbol>` is defined above with exactly the `Launcher` signature.
            unsafe { loaded.get::<Launcher>(name.as_bytes()) }
                .map(|f| *f)
                .map_err(|e| CudaError::Host(format!("symbol {name}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HostModule {
        launchers,
        module: module.clone(),
        args: kernels.iter().map(|k| k.args.clone()).collect(),
        names: kernels.iter().map(|k| k.name.clone()).collect(),
        _lib: loaded,
    })
}

impl HostModule {
    /// Launches kernel `index` on `bufs` (one per bound argument, each of the argument's
    /// length at `batch`), with the grid a GPU launch would have.
    pub fn launch(&self, index: usize, bufs: &mut [&mut [f32]], batch: u64) -> Result<(), CudaError> {
        let (Some(f), Some(info), Some(args)) =
            (self.launchers.get(index), self.module.kernels.get(index), self.args.get(index))
        else {
            return Err(CudaError::Host(format!("no kernel {index} in the module")));
        };
        let name = &self.names[index];
        super::check_lengths(name, args, &bufs.iter().map(|b| b.len()).collect::<Vec<_>>(), batch)?;
        let Some((blocks, threads)) = info.dims(batch)? else { return Ok(()) };
        // Private memory, one slice per grid iteration, NaN so that reading what an
        // iteration did not write shows (as in the interpreter).
        let mut private: Vec<Vec<f32>> =
            super::private_lens(name, args, info.grid(), batch)?.into_iter().map(|n| vec![f32::NAN; n]).collect();
        let (mut given, mut own) = (bufs.iter_mut(), private.iter_mut());
        let ptrs: Vec<*mut f32> = args
            .iter()
            .filter_map(|a| match a.mode {
                crate::ir::Mode::Private => own.next().map(|v| v.as_mut_ptr()),
                _ => given.next().map(|b| b.as_mut_ptr()),
            })
            .collect();
        // SAFETY: one pointer per argument, each to a buffer of the checked length (private
        // ones of their sliced length), borrowed mutably for the call; the generated code
        // stays within those lengths (verified IR) and runs on this thread only.
        unsafe { f(ptrs.as_ptr(), batch, blocks, threads) };
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.launchers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.launchers.is_empty()
    }
}
