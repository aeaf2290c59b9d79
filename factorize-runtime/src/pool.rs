//! The thread pool in which this crate's parallel faer calls run.
//!
//! faer's parallel kernels (`Par::rayon`, through spindle) leave their worker loops on the
//! threads of the rayon pool they ran in. On rayon's global pool that makes all later rayon
//! work of the process, dfdx's own GEMM and [`crate::fast`]'s kernels included, many times
//! slower for the rest of its life (numbers in the README). So every parallel faer call of this
//! crate runs in this pool, of as many threads as the global one, which keeps the global pool
//! free.

use std::sync::OnceLock;

static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();

/// Runs `f` in the faer pool (or on this thread, if the pool's threads could not be started).
pub(crate) fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("factorize-faer-{i}"))
            .build()
            .ok()
    });
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}
