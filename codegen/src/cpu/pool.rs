//! The CPU backend's worker threads: one persistent rayon pool per thread count asked for,
//! built on first use and kept for the life of the process, so a kernel launch wakes
//! parked threads instead of spawning new ones. Split kernels
//! (`CompiledKernel::run_parallel`) and multi-threaded contractions (`gemm.rs`) share the
//! pool of their thread count, so the two never run on separate sets of threads.

use std::sync::{Arc, Mutex, OnceLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

/// The pools built so far, by thread count.
static POOLS: OnceLock<Mutex<Vec<(usize, Arc<ThreadPool>)>>> = OnceLock::new();

/// The pool of `threads` workers, or `None` when the operating system gives no threads
/// (callers then run the work on the calling thread).
pub(crate) fn get(threads: usize) -> Option<Arc<ThreadPool>> {
    let pools = POOLS.get_or_init(|| Mutex::new(Vec::new()));
    // A panic while the lock was held cannot leave the list half-updated: it is pushed to
    // only after a pool is built.
    let mut pools = pools.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, pool)) = pools.iter().find(|(n, _)| *n == threads) {
        return Some(Arc::clone(pool));
    }
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("pdgc-cpu-{threads}-{i}"))
        .build()
        .ok()?;
    let pool = Arc::new(pool);
    pools.push((threads, Arc::clone(&pool)));
    Some(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_count_gets_one_persistent_pool() {
        let a = get(3).expect("a pool");
        let b = get(3).expect("a pool");
        assert!(Arc::ptr_eq(&a, &b), "a second launch would get new threads");
        assert_eq!(a.current_num_threads(), 3);
        let c = get(2).expect("a pool");
        assert_eq!(c.current_num_threads(), 2);
        // Work runs on the pool's own threads.
        let name = a.install(|| std::thread::current().name().map(str::to_string));
        assert_eq!(name.as_deref().map(|n| n.starts_with("pdgc-cpu-3-")), Some(true), "{name:?}");
    }
}
