//! The GPU engine (cudarc: cuBLAS + cuSOLVER, loaded at run time), in f64.
//!
//! Same mathematics and contract as the CPU engine (see `cpu.rs`): `G = M·Mᵀ` by one GEMM; its
//! leading eigenvectors by Chebyshev-filtered subspace iteration (GEMMs, Cholesky-QR
//! orthonormalisation, a few Rayleigh–Ritz checks placed by the observed convergence rate; see
//! `subspace_iteration`) or by the dense `syevd` when the block is not much smaller than the
//! side or the iteration breaks down; `R = Mᵀ·Q`, the residual `M − Q·Rᵀ` and its norm on the
//! device; the balanced split on the device, so the host receives only the factors. Everything
//! runs in f64: Hopper's FP64 tensor cores make it nearly as fast as f32, and the Gram matrix
//! squares the condition number.
//!
//! One context, stream and pair of library handles serve every layer (created on first use).
//! Transfers go through pinned buffers (`upload_on`, `Gpu::download`); for a list of layers
//! a second stream uploads the next layer while one is solved (`Gpu::low_rank_many`).
//! cudarc panics when a library is missing, so availability is probed first with its own
//! `is_culib_present`, and initialisation failures become errors, never panics.

use std::cell::{OnceCell, RefCell};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::cublas::sys as blas_sys;
use cudarc::cublas::CudaBlas;
use cudarc::cusolver::{sys as solver_sys, DnHandle};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DriverError, PinnedHostSlice};

mod blas;
mod calibrated;
mod low_rank;
mod subspace;
mod transfer;

pub(crate) use calibrated::{calibrated, CalibratedOnGpu};
use transfer::Staging;

use super::{LowRank, WeightMatrix};

/// Why the GPU could not do a layer.
#[derive(Debug, Clone)]
pub(crate) enum GpuError {
    /// Allocation failed: the caller may retry on the CPU.
    OutOfMemory(String),
    /// Anything else from CUDA, cuBLAS or cuSOLVER.
    Failed(String),
}

impl From<DriverError> for GpuError {
    fn from(e: DriverError) -> Self {
        use cudarc::driver::sys::CUresult;
        if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            GpuError::OutOfMemory(format!("{e:?}"))
        } else {
            GpuError::Failed(format!("{e:?}"))
        }
    }
}

fn failed(what: &str, e: impl std::fmt::Debug) -> GpuError {
    GpuError::Failed(format!("{what}: {e:?}"))
}

/// Phase timing on stderr when `FACTORIZE_GPU_TRACE` is set. Each mark waits for the stream,
/// so a figure is the device time of its phase (and the overlap of phases is lost).
pub(super) struct Trace(Option<Instant>);

impl Trace {
    fn start() -> Self {
        static ON: OnceLock<bool> = OnceLock::new();
        let on = *ON.get_or_init(|| std::env::var_os("FACTORIZE_GPU_TRACE").is_some());
        Trace(on.then(Instant::now))
    }

    fn mark(&mut self, stream: &CudaStream, phase: impl std::fmt::Display) {
        if let Some(t) = &mut self.0 {
            let _ = stream.synchronize();
            eprintln!(
                "factorize gpu: {phase}: {:.2} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
            *t = Instant::now();
        }
    }
}

struct Gpu {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    solver: DnHandle,
    /// The start block of the last subspace iteration, `(s, b, signs)`: layers of one size share
    /// it, which saves generating and uploading it per layer.
    start: RefCell<Option<(usize, usize, CudaSlice<f64>)>>,
    staging: RefCell<Staging>,
    copy: OnceCell<Arc<CudaStream>>,
    /// The pinned buffer results come back through (see `download`).
    download: RefCell<Option<PinnedHostSlice<f64>>>,
}

static GPU: OnceLock<Result<Mutex<Gpu>, String>> = OnceLock::new();

fn init() -> Result<Mutex<Gpu>, String> {
    // cudarc's loaders panic on a missing library: look before touching them.
    // SAFETY: each probe only tries to load its library and reports whether it could; no CUDA
    // function is called.
    let present = unsafe {
        [
            (
                "the CUDA driver (libcuda)",
                cudarc::driver::sys::is_culib_present(),
            ),
            ("cuBLAS (libcublas)", blas_sys::is_culib_present()),
            ("cuSOLVER (libcusolver)", solver_sys::is_culib_present()),
        ]
    };
    if let Some((name, _)) = present.iter().find(|(_, ok)| !ok) {
        return Err(format!(
            "{name} was not found; install it or add its folder to LD_LIBRARY_PATH"
        ));
    }
    let count = CudaContext::device_count().map_err(|e| format!("no CUDA device: {e:?}"))?;
    if count < 1 {
        return Err("no CUDA device".into());
    }
    let ctx = CudaContext::new(0).map_err(|e| format!("cannot open GPU 0: {e:?}"))?;
    let stream = ctx.default_stream();
    let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS: {e:?}"))?;
    let solver = DnHandle::new(stream.clone()).map_err(|e| format!("cuSOLVER: {e:?}"))?;
    Ok(Mutex::new(Gpu {
        stream,
        blas,
        solver,
        start: RefCell::new(None),
        staging: RefCell::new(Staging::Unallocated),
        copy: OnceCell::new(),
        download: RefCell::new(None),
    }))
}

/// `Ok` when a GPU is usable, else why not (for reports and errors).
pub(crate) fn available() -> Result<(), String> {
    GPU.get_or_init(init)
        .as_ref()
        .map(|_| ())
        .map_err(Clone::clone)
}

/// The GPU state, locked for one call.
fn gpu() -> Result<std::sync::MutexGuard<'static, Gpu>, GpuError> {
    GPU.get_or_init(init)
        .as_ref()
        .map_err(|e| GpuError::Failed(e.clone()))?
        .lock()
        .map_err(|_| GpuError::Failed("GPU state poisoned".into()))
}

/// The best rank-`rank` factorization of `w` on the GPU.
pub(crate) fn low_rank(w: &WeightMatrix<'_>, rank: usize) -> Result<LowRank, GpuError> {
    gpu()?.low_rank(w, rank)
}

/// [`low_rank`] of each `(weight, rank)`, the next layer uploaded while one is solved; with
/// the GPU time of each layer.
pub(crate) fn low_rank_many(
    layers: &[(WeightMatrix<'_>, usize)],
) -> Vec<(Result<LowRank, GpuError>, Duration)> {
    match gpu() {
        Ok(gpu) => gpu.low_rank_many(layers),
        Err(e) => layers
            .iter()
            .map(|_| (Err(e.clone()), Duration::ZERO))
            .collect(),
    }
}
