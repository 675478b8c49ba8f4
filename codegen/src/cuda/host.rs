//! The generated CUDA C, run on the host: the module is compiled by the system C++
//! compiler (`$CXX`, else `c++`) against a small shim of the CUDA built-ins it uses
//! (`blockIdx`, `threadIdx`, `blockDim`, `gridDim`, `__syncthreads`, `__shared__`,
//! `__int_as_float`, the qualifiers), and each launch runs every (block, thread) pair of the
//! launch grid, exactly as [`super::LaunchInfo`] sizes it on a GPU.
//!
//! One-thread-per-iteration and serial kernels run their threads one after the other.
//! Block-cooperative kernels ([`super::block`]) need the threads of a block to step together
//! through `__syncthreads()`: each thread of a block is a coroutine (`ucontext`, its own
//! stack) on the calling thread; a barrier switches back to the scheduler, which resumes
//! every thread of the block in turn until all wait at the barrier, then releases them, so
//! a block runs phase by phase as on a GPU. A barrier that some threads of a block pass
//! while others have left the kernel is a divergent barrier (undefined on a GPU): the launch
//! fails with [`CudaError::Host`]. `__shared__` arrays are one per calling thread, which is
//! one block at a time.
//!
//! This checks what the renderer writes (indexing, the thread decomposition of parallel
//! nests, the tiles of contractions, guards, barriers, helpers) on machines without a GPU,
//! which is every CI machine. It does not check what only hardware shows: races between
//! threads (the IR's independence proofs cover those; a missing barrier between a store and
//! a load of another thread is not detected here when the storing thread runs first), CUDA's
//! own math functions (the host's libm stands in), or speed.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{CudaError, CudaModule};
use crate::ir::{Arg, Kernel};

/// The CUDA built-ins the generated code uses, for a C++ host compiler, and the scheduler
/// that runs a block's threads as coroutines.
const SHIM: &str = r#"
#include <math.h>
#include <string.h>
#include <stdlib.h>
#include <ucontext.h>
struct pdgc_dim3 { unsigned int x, y, z; };
static thread_local pdgc_dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(n)
#define __shared__ static thread_local
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }

// A block's threads as coroutines. state: 0 runnable, 1 waiting at a barrier, 2 finished.
struct pdgc_sched {
  ucontext_t main;
  ucontext_t* ctx;
  int* state;
  unsigned cur;
  void (*body)(void*);
  void* arg;
};
static thread_local pdgc_sched* pdgc_s;
static void __syncthreads() {
  pdgc_sched* s = pdgc_s;
  s->state[s->cur] = 1;
  swapcontext(&s->ctx[s->cur], &s->main);
}
static void pdgc_entry() {
  pdgc_s->body(pdgc_s->arg);
  pdgc_s->state[pdgc_s->cur] = 2;
}
static const size_t PDGC_STACK = 64 * 1024;
// Runs `blocks` blocks of `threads` threads of `body`, one block at a time. 0: done;
// 1: a divergent barrier; 2: out of memory.
static int pdgc_run_blocks(unsigned blocks, unsigned threads, void (*body)(void*), void* arg) {
  pdgc_sched s;
  s.ctx = (ucontext_t*)malloc(sizeof(ucontext_t) * threads);
  s.state = (int*)malloc(sizeof(int) * threads);
  char* stacks = (char*)malloc(PDGC_STACK * threads);  // untouched pages cost nothing
  int result = 0;
  if (!s.ctx || !s.state || !stacks) result = 2;
  s.body = body;
  s.arg = arg;
  pdgc_sched* outer = pdgc_s;
  pdgc_s = &s;
  gridDim.x = blocks; gridDim.y = 1; gridDim.z = 1;
  blockDim.x = threads; blockDim.y = 1; blockDim.z = 1;
  for (unsigned bx = 0; bx < blocks && result == 0; ++bx) {
    blockIdx.x = bx; blockIdx.y = 0; blockIdx.z = 0;
    for (unsigned t = 0; t < threads; ++t) {
      getcontext(&s.ctx[t]);
      s.ctx[t].uc_stack.ss_sp = stacks + (size_t)t * PDGC_STACK;
      s.ctx[t].uc_stack.ss_size = PDGC_STACK;
      s.ctx[t].uc_link = &s.main;
      makecontext(&s.ctx[t], pdgc_entry, 0);
      s.state[t] = 0;
    }
    for (;;) {
      unsigned done = 0;
      for (unsigned t = 0; t < threads; ++t) {
        if (s.state[t] == 2) { ++done; continue; }
        s.state[t] = 0;
        s.cur = t;
        threadIdx.x = t; threadIdx.y = 0; threadIdx.z = 0;
        swapcontext(&s.main, &s.ctx[t]);
        if (s.state[t] == 2) ++done;
      }
      if (done == threads) break;
      if (done != 0) { result = 1; break; }
    }
  }
  pdgc_s = outer;
  free(stacks);
  free(s.state);
  free(s.ctx);
  return result;
}
"#;

/// `host_<symbol>`: runs a launch; 0 when it completed, else the scheduler's code.
type Launcher = unsafe extern "C" fn(bufs: *const *mut f32, batch: u64, blocks: u32, threads: u32) -> i32;

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
        let args: String = (0..k.args).map(|i| format!("b[{i}], ")).collect();
        let sym = &k.symbol;
        if k.mode == super::LaunchMode::Block {
            source.push_str(&format!(
                "\nstruct pdgc_args_{sym} {{ float* const* b; unsigned long long batch; }};\n\
                 static void pdgc_body_{sym}(void* p) {{\n  \
                 const pdgc_args_{sym}* a = (const pdgc_args_{sym}*)p;\n  \
                 float* const* b = a->b;\n  {sym}({args}a->batch);\n}}\n\
                 extern \"C\" int host_{sym}(float* const* b, unsigned long long batch, unsigned blocks, unsigned threads) {{\n  \
                 pdgc_args_{sym} a = {{ b, batch }};\n  \
                 return pdgc_run_blocks(blocks, threads, pdgc_body_{sym}, &a);\n}}\n",
            ));
        } else {
            source.push_str(&format!(
                "\nextern \"C\" int host_{sym}(float* const* b, unsigned long long batch, unsigned blocks, unsigned threads) {{\n  \
                 gridDim.x = blocks; gridDim.y = 1; gridDim.z = 1;\n  \
                 blockDim.x = threads; blockDim.y = 1; blockDim.z = 1;\n  \
                 for (unsigned bx = 0; bx < blocks; ++bx)\n    \
                 for (unsigned tx = 0; tx < threads; ++tx) {{\n      \
                 blockIdx.x = bx; threadIdx.x = tx;\n      {sym}({args}batch);\n    }}\n  return 0;\n}}\n",
            ));
        }
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
        let code = unsafe { f(ptrs.as_ptr(), batch, blocks, threads) };
        match code {
            0 => Ok(()),
            1 => Err(CudaError::Host(format!(
                "kernel `{name}`: a barrier that some threads of a block reached after others had left the kernel"
            ))),
            _ => Err(CudaError::Host(format!("kernel `{name}`: no memory for the block's {threads} thread stacks"))),
        }
    }

    pub fn len(&self) -> usize {
        self.launchers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.launchers.is_empty()
    }
}
