//! The CPU backend's contraction kernel: a [`crate::ir::Contract`] whose operands are
//! strided matrices is handed to the `gemm` crate, which packs the operands and runs
//! register-tiled micro-kernels at the host's widest vectors (AVX-512, AVX2+FMA, SSE or
//! NEON, chosen at run time). Compiled kernels call [`pdgc_sgemm`] as a JIT symbol.
//!
//! Threads: a kernel whose grid is split over threads (`CompiledKernel::run_parallel`)
//! calls the GEMM single-threaded in each worker (a worker's allowance is 1), so the two
//! levels never nest; a kernel that runs on one thread lets the GEMM use the session's
//! threads ([`with_threads`]), on the backend's persistent pool of that many workers
//! (`pool.rs`), which the `gemm` crate's rayon tasks then run on. The `gemm` crate splits
//! the output into blocks, never the sum over `k`, so the result does not depend on the
//! thread count.

use std::cell::Cell;

thread_local! {
    /// The threads a GEMM called on this thread may use.
    static THREADS: Cell<usize> = const { Cell::new(1) };
}

/// Runs `f` with GEMMs on this thread allowed `threads` threads.
pub(crate) fn with_threads<R>(threads: usize, f: impl FnOnce() -> R) -> R {
    let before = THREADS.with(|t| t.replace(threads.max(1)));
    let out = f();
    THREADS.with(|t| t.set(before));
    out
}

/// `C[i, j] (+)= Σ_l A[i, l] · B[l, j]` for `i < m`, `j < n`, `l < k`; strides in elements.
///
/// # Safety
///
/// Called only by compiled kernels, with operands the verifier proved in bounds: every
/// element the strides reach lies in its buffer, and `c` does not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe extern "C" fn pdgc_sgemm(
    m: i64,
    n: i64,
    k: i64,
    c: *mut f32,
    c_rs: i64,
    c_cs: i64,
    a: *const f32,
    a_rs: i64,
    a_cs: i64,
    b: *const f32,
    b_rs: i64,
    b_cs: i64,
    accumulate: i64,
) {
    if m <= 0 || n <= 0 {
        return;
    }
    if k <= 0 {
        if accumulate == 0 {
            for i in 0..m as isize {
                for j in 0..n as isize {
                    // SAFETY: (i, j) is within the m×n block the caller's contract covers.
                    unsafe { *c.offset(i * c_rs as isize + j * c_cs as isize) = 0.0 };
                }
            }
        }
        return;
    }
    let threads = THREADS.with(Cell::get);
    let pool = if threads > 1 { super::pool::get(threads) } else { None };
    let parallelism = if pool.is_some() { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // The operands travel to the pool as addresses: `install` returns only when the GEMM
    // is done, so they stay valid and unaliased (the caller's contract) throughout.
    let (c, a, b) = (c as usize, a as usize, b as usize);
    // SAFETY: see the function's contract; `gemm` reads `m×k` of `a`, `k×n` of `b` and
    // writes `m×n` of `c` through exactly these strides.
    let run = move || unsafe {
        gemm::gemm(
            m as usize,
            n as usize,
            k as usize,
            c as *mut f32,
            c_cs as isize,
            c_rs as isize,
            accumulate != 0,
            a as *const f32,
            a_cs as isize,
            a_rs as isize,
            b as *const f32,
            b_cs as isize,
            b_rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        )
    };
    match pool {
        Some(pool) => pool.install(run),
        None => run(),
    }
}
