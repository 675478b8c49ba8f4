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
//!
//! Layout: the `gemm` crate runs a row-major `C` as `Cᵀ = Bᵀ·Aᵀ` and packs its left operand
//! into panels of rows. Where both operands are contiguous along `k` (a weight gradient
//! `dW = dY·colsᵀ` summed over an example's positions) that packing is a scalar transpose of
//! the large operand, and the product ran at a third to a half of the crate's rate on this
//! project's conv shapes. A long sum in that layout (see [`dot_shaped`]) is therefore run
//! into a column-major scratch matrix, which the crate computes without packing the large
//! operand, and then added (or stored) into `C` transposed: `m·n` moves against `m·n·k`
//! multiply-adds (a 3x faster weight gradient for cifar_cnn's second conv).

use std::cell::{Cell, RefCell};

use crate::buffer::AlignedBuf;

thread_local! {
    /// The threads a GEMM called on this thread may use.
    static THREADS: Cell<usize> = const { Cell::new(1) };
    /// The column-major scratch matrix of a [`dot_shaped`] product, reused across calls
    /// (on a cache line, as the arguments are).
    static SCRATCH: RefCell<AlignedBuf> = const { RefCell::new(AlignedBuf::new()) };
}

/// The shortest sum over `k` run through the column-major scratch: below it, the transpose
/// of the `m × n` result costs more than the packing it saves.
const DOT_MIN_K: i64 = 256;

/// The most rows `m` run through the scratch. Into a column-major result the crate reads
/// the large operand in place only while `m` is at most two of its register tiles (64 rows
/// with AVX-512); beyond that it packs that operand anyway and the transpose is extra work.
/// Measured on one core for conv weight gradients `m × n` over `k` positions (µs, as it is
/// / through the scratch): 32×288 over 1024 388 / 128, 50×625 over 1024 1100 / 549,
/// 25×75 over 1024 132 / 76, 64×576 over 256 179 / 162, but 200×900 over 484 only
/// 1457 / 1372 (no gain measurable inside toy_l4_r2_k3's noisy step) and 128×1152 over 64
/// 143 / 304.
const DOT_MAX_ROWS: i64 = 64;

/// The largest scratch matrix, in elements (16 MiB); a larger product runs as it is.
const DOT_MAX_ELEMENTS: i64 = 4 << 20;

/// Whether `C[m×n] (+)= A·B` is run through the column-major scratch: `A` and `B` both
/// contiguous along `k`, `C` row-major, a long sum, few rows and a matrix (not a vector).
fn dot_shaped(m: i64, n: i64, k: i64, c_cs: i64, a_cs: i64, b_rs: i64) -> bool {
    a_cs == 1
        && b_rs == 1
        && c_cs == 1
        && k >= DOT_MIN_K
        && (2..=DOT_MAX_ROWS).contains(&m)
        && n >= 2
        && m * n <= DOT_MAX_ELEMENTS
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
    if dot_shaped(m, n, k, c_cs, a_cs, b_rs) {
        let (mu, nu) = (m as usize, n as usize);
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.grow_or_abort(mu * nu, 0.0);
            // SAFETY: the scratch holds `m·n` elements, column-major (row stride 1, column
            // stride `m`), and is this thread's own; `a` and `b` as the caller's contract.
            unsafe { sgemm([m, n, k], (scratch.as_mut_ptr(), 1, m), (a, a_rs, a_cs), (b, b_rs, b_cs), false) };
            for i in 0..mu {
                // SAFETY: row `i` of `C` covers `n` elements at unit stride (`c_cs == 1`).
                let row = unsafe { std::slice::from_raw_parts_mut(c.offset(i as isize * c_rs as isize), nu) };
                let column = scratch[i..].iter().step_by(mu);
                if accumulate == 0 {
                    row.iter_mut().zip(column).for_each(|(x, s)| *x = *s);
                } else {
                    row.iter_mut().zip(column).for_each(|(x, s)| *x += *s);
                }
            }
        });
        return;
    }
    // SAFETY: as this function's contract.
    unsafe { sgemm([m, n, k], (c, c_rs, c_cs), (a, a_rs, a_cs), (b, b_rs, b_cs), accumulate != 0) }
}

/// [`pdgc_sgemm`] for `k > 0` through the `gemm` crate, on this thread's allowance of
/// threads; each matrix as its address and its row and column strides.
///
/// # Safety
///
/// As [`pdgc_sgemm`].
unsafe fn sgemm(
    [m, n, k]: [i64; 3],
    (c, c_rs, c_cs): (*mut f32, i64, i64),
    (a, a_rs, a_cs): (*const f32, i64, i64),
    (b, b_rs, b_cs): (*const f32, i64, i64),
    accumulate: bool,
) {
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
            accumulate,
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
