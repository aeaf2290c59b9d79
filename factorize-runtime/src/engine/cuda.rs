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

use std::cell::{OnceCell, Ref, RefCell};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::cublas::sys as blas_sys;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::cusolver::{sys as solver_sys, DnHandle};
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, PinnedHostSlice,
};
use rayon::prelude::*;

use super::filter::Chebyshev;
use super::gaussian::Gaussian;
use super::params::SUBSPACE;
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

/// Products with `G` between the first Rayleigh–Ritz checks of the GPU iteration.
const CHECK_SPACING: usize = 3;

/// Whether the top-`rank` Ritz energy has settled, given its gains between checks: the last
/// gain is below `threshold`, or (when the gains shrink at least twofold) the energy still
/// missing, extrapolated geometrically from the last two, is.
fn settled(gains: &[f64], threshold: f64) -> bool {
    match gains {
        [] => false,
        [.., last] if *last <= threshold => true,
        [.., before, last] => {
            let ratio = last / before;
            (0.0..=0.5).contains(&ratio) && last * ratio / (1.0 - ratio) <= threshold
        }
        [_] => false,
    }
}

/// Products until the energy should have settled, from the geometric rate of the last two gains;
/// `None` before two gains are known.
fn products_to_settle(gains: &[f64], threshold: f64) -> Option<usize> {
    let [.., before, last] = gains else {
        return None;
    };
    let ratio = last / before;
    if !(ratio > 0.0 && ratio < 1.0) {
        return Some(CHECK_SPACING);
    }
    let missing = last * ratio / (1.0 - ratio);
    let intervals = (threshold / missing).ln() / ratio.ln();
    Some(((intervals * CHECK_SPACING as f64).ceil() as usize).clamp(1, 2 * CHECK_SPACING))
}

/// How far the Chebyshev filter may scale the leading direction past the cutoff: Cholesky-QR2
/// orthonormalises blocks with a condition number up to about 1e8 in f64; this keeps two
/// orders of magnitude from that edge.
const FILTER_LIMIT: f64 = 1e6;

/// Values per pinned staging buffer (32 MiB).
const STAGING_CHUNK: usize = 1 << 22;

/// Host-to-device copies of large blocks go through two pinned buffers: the host fills one (on
/// all cores) while the other is copied, at about twice the rate of the driver's own staging of
/// pageable memory.
enum Staging {
    /// Not needed yet.
    Unallocated,
    Ready([PinnedHostSlice<f64>; 2]),
    /// Pinning failed (e.g. a locked-memory limit): plain copies.
    Unavailable,
}

/// Phase timing on stderr when `FACTORIZE_GPU_TRACE` is set. Each mark waits for the stream,
/// so a figure is the device time of its phase (and the overlap of phases is lost).
struct Trace(Option<Instant>);

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

/// `src` on the device, copied on `stream`: blocks of at least two staging buffers go through
/// them (allocated on first use; plain copies when pinning fails).
fn upload_on(
    stream: &Arc<CudaStream>,
    staging: &mut Staging,
    src: &[f64],
) -> Result<CudaSlice<f64>, GpuError> {
    let mut dst = stream.alloc_zeros::<f64>(src.len())?;
    if src.len() < 2 * STAGING_CHUNK {
        stream.memcpy_htod(src, &mut dst)?;
        return Ok(dst);
    }
    if let Staging::Unallocated = staging {
        *staging = pinned_pair(stream.context()).unwrap_or(Staging::Unavailable);
    }
    let Staging::Ready(buffers) = staging else {
        stream.memcpy_htod(src, &mut dst)?;
        return Ok(dst);
    };
    let chunks = src.chunks_exact(STAGING_CHUNK);
    let tail = chunks.remainder();
    for (k, chunk) in chunks.enumerate() {
        let buffer = &mut buffers[k % 2];
        // Waits until the buffer's previous copy has left it.
        let host = buffer.as_mut_slice()?;
        host.par_chunks_mut(1 << 15)
            .zip(chunk.par_chunks(1 << 15))
            .for_each(|(to, from)| to.copy_from_slice(from));
        let start = k * STAGING_CHUNK;
        stream.memcpy_htod(&*buffer, &mut dst.slice_mut(start..start + STAGING_CHUNK))?;
    }
    if !tail.is_empty() {
        let start = src.len() - tail.len();
        stream.memcpy_htod(tail, &mut dst.slice_mut(start..))?;
    }
    Ok(dst)
}

fn pinned_pair(ctx: &Arc<CudaContext>) -> Result<Staging, DriverError> {
    // Write-combined: the host only writes these, and the copies to the device read them fast.
    let flags = cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED;
    Ok(Staging::Ready([
        zeroed_pinned(ctx, flags)?,
        zeroed_pinned(ctx, flags)?,
    ]))
}

/// A pinned buffer of `STAGING_CHUNK` zeros, allocated with cudarc's `flags`.
fn zeroed_pinned(ctx: &Arc<CudaContext>, flags: u32) -> Result<PinnedHostSlice<f64>, DriverError> {
    // SAFETY: the memory is zeroed through its pointer before any slice of it is formed.
    let mut buffer = unsafe { ctx.alloc_pinned_with_flags::<f64>(STAGING_CHUNK, flags) }?;
    let ptr = buffer.as_mut_ptr()?;
    unsafe { std::ptr::write_bytes(ptr, 0, STAGING_CHUNK) };
    Ok(buffer)
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

// The handles are used under the mutex only.
unsafe impl Send for Gpu {}

static GPU: OnceLock<Result<Mutex<Gpu>, String>> = OnceLock::new();

fn init() -> Result<Mutex<Gpu>, String> {
    // cudarc's loaders panic on a missing library: look before touching them.
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

type Op = blas_sys::cublasOperation_t;
const N: Op = Op::CUBLAS_OP_N;
const T: Op = Op::CUBLAS_OP_T;

fn int(n: usize) -> Result<i32, GpuError> {
    i32::try_from(n).map_err(|_| GpuError::Failed(format!("dimension {n} exceeds the BLAS range")))
}

impl Gpu {
    /// `C = alpha·op(A)·op(B) + beta·C`, column-major, `C` is `m × n`.
    #[allow(clippy::too_many_arguments)]
    fn gemm<A: DevicePtr<f64>, B: DevicePtr<f64>, C: DevicePtrMut<f64>>(
        &self,
        (ta, tb): (Op, Op),
        (m, n, k): (usize, usize, usize),
        alpha: f64,
        (a, lda): (&A, usize),
        (b, ldb): (&B, usize),
        beta: f64,
        (c, ldc): (&mut C, usize),
    ) -> Result<(), GpuError> {
        let cfg = GemmConfig {
            transa: ta,
            transb: tb,
            m: int(m)?,
            n: int(n)?,
            k: int(k)?,
            alpha,
            lda: int(lda)?,
            ldb: int(ldb)?,
            beta,
            ldc: int(ldc)?,
        };
        unsafe { self.blas.gemm(cfg, a, b, c) }.map_err(|e| failed("cuBLAS gemm", e))
    }

    /// `src` on the host: copied into a pinned buffer, then out of it on all cores into fresh
    /// memory. Fresh pages fault in at their first write, one by one in the writing thread:
    /// the driver's own copy into a new `Vec` took 20–30 ms for a 4096×512 pair of factors on a
    /// (virtualised) H100 host, against 3 ms into reused memory.
    fn download(&self, src: &CudaSlice<f64>) -> Result<Vec<f64>, GpuError> {
        let mut slot = self.download.borrow_mut();
        if slot.is_none() {
            // Not write-combined (cudarc's default for pinned memory): the host reads it.
            *slot = zeroed_pinned(self.stream.context(), 0).ok();
        }
        let Some(pinned) = slot.as_mut() else {
            return Ok(self.stream.clone_dtoh(src)?);
        };
        let buffer = pinned.as_mut_slice()?;
        let mut out = Vec::with_capacity(src.len());
        for start in (0..src.len()).step_by(STAGING_CHUNK) {
            let len = STAGING_CHUNK.min(src.len() - start);
            let view = src.slice(start..start + len);
            {
                let (ptr, _guard) = view.device_ptr(&self.stream);
                // SAFETY: `buffer[..len]` is pinned host memory of exactly the view's length,
                // and the stream is synchronised before it is read or written again.
                unsafe {
                    cudarc::driver::result::memcpy_dtoh_async(
                        &mut buffer[..len],
                        ptr,
                        self.stream.cu_stream(),
                    )
                }?;
            }
            self.stream.synchronize()?;
            out.par_extend(buffer[..len].par_iter().copied());
        }
        Ok(out)
    }

    /// `src` on the device (see [`upload_on`]).
    fn upload(&self, src: &[f64]) -> Result<CudaSlice<f64>, GpuError> {
        upload_on(&self.stream, &mut self.staging.borrow_mut(), src)
    }

    /// The stream that uploads the next layer while this one is solved (created on first use).
    fn copy_stream(&self) -> Result<Arc<CudaStream>, GpuError> {
        if let Some(copy) = self.copy.get() {
            return Ok(copy.clone());
        }
        let copy = self.stream.context().new_stream()?;
        Ok(self.copy.get_or_init(|| copy).clone())
    }

    /// [`Self::low_rank`] for each `(weight, rank)`, with the time of each: layer `k + 1` is
    /// uploaded by another thread on the copy stream while layer `k` is solved. cudarc orders
    /// the two streams: its events make the compute stream wait for an upload it reads.
    fn low_rank_many(
        &self,
        layers: &[(WeightMatrix<'_>, usize)],
    ) -> Vec<(Result<LowRank, GpuError>, Duration)> {
        if layers.is_empty() {
            return Vec::new();
        }
        let copy = match self.copy_stream() {
            Ok(copy) => copy,
            Err(_) => {
                return layers
                    .iter()
                    .map(|(w, rank)| {
                        let start = Instant::now();
                        (self.low_rank(w, *rank), start.elapsed())
                    })
                    .collect()
            }
        };
        let mut staging = Some(self.staging.replace(Staging::Unallocated));
        let mut out = Vec::with_capacity(layers.len());
        std::thread::scope(|scope| {
            let copy = &copy;
            let spawn = |k: usize, mut staging: Staging| {
                let data = layers[k].0.data();
                scope.spawn(move || (upload_on(copy, &mut staging, data), staging))
            };
            let mut pending = staging.take().map(|st| spawn(0, st));
            for (k, (w, rank)) in layers.iter().enumerate() {
                let start = Instant::now();
                let uploaded = match pending.take().map(|p| p.join()) {
                    Some(Ok((uploaded, back))) => {
                        staging = Some(back);
                        uploaded
                    }
                    _ => Err(GpuError::Failed("the upload thread panicked".into())),
                };
                if k + 1 < layers.len() {
                    pending = staging.take().map(|st| spawn(k + 1, st));
                }
                let solved = uploaded.and_then(|a| self.low_rank_uploaded(a, w, *rank));
                out.push((solved, start.elapsed()));
            }
        });
        *self.staging.borrow_mut() = staging.unwrap_or(Staging::Unallocated);
        out
    }

    fn norm(&self, x: &CudaSlice<f64>) -> Result<f64, GpuError> {
        let mut out = 0.0f64;
        let (px, _gx) = x.device_ptr(&self.stream);
        let status = unsafe {
            blas_sys::cublasDnrm2_v2(
                *self.blas.handle(),
                int(x.len())?,
                px as *const f64,
                1,
                &mut out,
            )
        };
        check_blas(status, "cuBLAS nrm2")?;
        Ok(out)
    }

    /// Orthonormalises the columns of `z` (`s × b`) in place: Cholesky-QR, twice.
    /// `false` when `zᵀz` is not numerically positive definite.
    fn cholesky_qr2(&self, z: &mut CudaSlice<f64>, s: usize, b: usize) -> Result<bool, GpuError> {
        self.cholesky_qr(z, s, b, 2)
    }

    /// Cholesky-QR, `passes` times. One pass leaves columns orthonormal to about `κ(z)²·ε`,
    /// enough to carry a basis of the same span to the next product; the second makes them
    /// orthonormal to working precision.
    fn cholesky_qr(
        &self,
        z: &mut CudaSlice<f64>,
        s: usize,
        b: usize,
        passes: usize,
    ) -> Result<bool, GpuError> {
        let mut c = self.stream.alloc_zeros::<f64>(b * b)?;
        let mut info = self.stream.alloc_zeros::<i32>(passes)?;
        let fill = solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER;
        let mut lwork = 0i32;
        {
            let (pc, _g) = c.device_ptr_mut(&self.stream);
            let status = unsafe {
                solver_sys::cusolverDnDpotrf_bufferSize(
                    self.solver.cu(),
                    fill,
                    int(b)?,
                    pc as *mut f64,
                    int(b)?,
                    &mut lwork,
                )
            };
            check_solver(status, "cuSOLVER potrf workspace")?;
        }
        let mut work = self.stream.alloc_zeros::<f64>(lwork.max(1) as usize)?;
        for pass in 0..passes {
            self.gemm((T, N), (b, b, s), 1.0, (&*z, s), (&*z, s), 0.0, (&mut c, b))?;
            {
                let (pc, _g1) = c.device_ptr_mut(&self.stream);
                let (pw, _g2) = work.device_ptr_mut(&self.stream);
                let mut slot = info.slice_mut(pass..pass + 1);
                let (pi, _g3) = slot.device_ptr_mut(&self.stream);
                let status = unsafe {
                    solver_sys::cusolverDnDpotrf(
                        self.solver.cu(),
                        fill,
                        int(b)?,
                        pc as *mut f64,
                        int(b)?,
                        pw as *mut f64,
                        lwork,
                        pi as *mut i32,
                    )
                };
                check_solver(status, "cuSOLVER potrf")?;
            }
            // Z ← Z·R⁻¹ with R the upper Cholesky factor. A failed factorization is caught
            // below, after both passes, to keep the stream free of round trips.
            let one = 1.0f64;
            let (pc, _g1) = c.device_ptr(&self.stream);
            let (pz, _g2) = z.device_ptr_mut(&self.stream);
            let status = unsafe {
                blas_sys::cublasDtrsm_v2(
                    *self.blas.handle(),
                    blas_sys::cublasSideMode_t::CUBLAS_SIDE_RIGHT,
                    blas_sys::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
                    N,
                    blas_sys::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
                    int(s)?,
                    int(b)?,
                    &one,
                    pc as *const f64,
                    int(b)?,
                    pz as *mut f64,
                    int(s)?,
                )
            };
            check_blas(status, "cuBLAS trsm")?;
        }
        Ok(self.stream.clone_dtoh(&info)?.iter().all(|&f| f == 0))
    }

    /// Eigenvalues (ascending) and eigenvectors (columns, in place of `a`) of the symmetric `n × n` `a`.
    /// With `vectors == false` only the eigenvalues are computed (and `a` is destroyed).
    fn syevd(&self, a: &mut CudaSlice<f64>, n: usize, vectors: bool) -> Result<Vec<f64>, GpuError> {
        let mode = if vectors {
            solver_sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR
        } else {
            solver_sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_NOVECTOR
        };
        let fill = solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
        let mut values = self.stream.alloc_zeros::<f64>(n)?;
        let mut info = self.stream.alloc_zeros::<i32>(1)?;
        let mut lwork = 0i32;
        {
            let (pa, _g1) = a.device_ptr(&self.stream);
            let (pv, _g2) = values.device_ptr(&self.stream);
            let status = unsafe {
                solver_sys::cusolverDnDsyevd_bufferSize(
                    self.solver.cu(),
                    mode,
                    fill,
                    int(n)?,
                    pa as *const f64,
                    int(n)?,
                    pv as *const f64,
                    &mut lwork,
                )
            };
            check_solver(status, "cuSOLVER syevd workspace")?;
        }
        let mut work = self.stream.alloc_zeros::<f64>(lwork.max(1) as usize)?;
        {
            let (pa, _g1) = a.device_ptr_mut(&self.stream);
            let (pv, _g2) = values.device_ptr_mut(&self.stream);
            let (pw, _g3) = work.device_ptr_mut(&self.stream);
            let (pi, _g4) = info.device_ptr_mut(&self.stream);
            let status = unsafe {
                solver_sys::cusolverDnDsyevd(
                    self.solver.cu(),
                    mode,
                    fill,
                    int(n)?,
                    pa as *mut f64,
                    int(n)?,
                    pv as *mut f64,
                    pw as *mut f64,
                    lwork,
                    pi as *mut i32,
                )
            };
            check_solver(status, "cuSOLVER syevd")?;
        }
        let flag = self.stream.clone_dtoh(&info)?;
        if flag[0] != 0 {
            return Err(GpuError::Failed(format!(
                "cuSOLVER syevd info = {}",
                flag[0]
            )));
        }
        Ok(self.stream.clone_dtoh(&values)?)
    }

    /// The fixed random-sign start block `s × b` (see `SubspaceParams::seed`), uploaded once per size.
    fn start_block(&self, s: usize, b: usize) -> Result<Ref<'_, CudaSlice<f64>>, GpuError> {
        let cached = matches!(&*self.start.borrow(), Some((cs, cb, _)) if (*cs, *cb) == (s, b));
        if !cached {
            let block = self
                .stream
                .clone_htod(&Gaussian::new(SUBSPACE.seed).signs(s * b))?;
            *self.start.borrow_mut() = Some((s, b, block));
        }
        Ref::filter_map(self.start.borrow(), |c| {
            c.as_ref().map(|(_, _, block)| block)
        })
        .map_err(|_| GpuError::Failed("start block missing".into()))
    }

    /// The `rank` leading eigenvectors of `g` (`s × s`), leading first, as an `s × rank` block.
    fn top_eigenvectors(
        &self,
        g: &CudaSlice<f64>,
        s: usize,
        rank: usize,
        tolerance: f64,
    ) -> Result<(CudaSlice<f64>, usize), GpuError> {
        let b = SUBSPACE.block_size(rank, s);
        if SUBSPACE.gpu_iterates(b, s) {
            if let Some(found) = self.subspace_iteration(g, s, rank, b, tolerance)? {
                return Ok(found);
            }
        }
        let mut a = self.stream.clone_dtod(g)?;
        self.syevd(&mut a, s, true)?;
        Ok((self.leading_columns(&a, s, s, rank)?, 0))
    }

    /// The last `rank` of the `cols` columns of `a` (`rows × cols`), in reverse order.
    fn leading_columns(
        &self,
        a: &CudaSlice<f64>,
        rows: usize,
        cols: usize,
        rank: usize,
    ) -> Result<CudaSlice<f64>, GpuError> {
        // One GEMM with the exchange matrix instead of `rank` small copies (launch-bound).
        let mut exchange = vec![0.0f64; rank * rank];
        for j in 0..rank {
            exchange[j * rank + (rank - 1 - j)] = 1.0;
        }
        let exchange = self.stream.clone_htod(&exchange)?;
        let last = a.slice((cols - rank) * rows..cols * rows);
        let mut out = self.stream.alloc_zeros::<f64>(rows * rank)?;
        self.gemm(
            (N, N),
            (rows, rank, rank),
            1.0,
            (&last, rows),
            (&exchange, rank),
            0.0,
            (&mut out, rows),
        )?;
        Ok(out)
    }

    /// The trace of a Gram matrix `g` (`s × s`): its diagonal is nonnegative, so the absolute
    /// sum of the diagonal.
    fn gram_trace(&self, g: &CudaSlice<f64>, s: usize) -> Result<f64, GpuError> {
        let mut out = 0.0f64;
        let (pg, _g) = g.device_ptr(&self.stream);
        let status = unsafe {
            blas_sys::cublasDasum_v2(
                *self.blas.handle(),
                int(s)?,
                pg as *const f64,
                int(s + 1)?,
                &mut out,
            )
        };
        check_blas(status, "cuBLAS asum")?;
        Ok(out)
    }

    /// `Σ x_i·y_i` over two equally long blocks.
    fn dot(&self, x: &CudaSlice<f64>, y: &CudaSlice<f64>) -> Result<f64, GpuError> {
        let mut out = 0.0f64;
        let (px, _gx) = x.device_ptr(&self.stream);
        let (py, _gy) = y.device_ptr(&self.stream);
        let status = unsafe {
            blas_sys::cublasDdot_v2(
                *self.blas.handle(),
                int(x.len())?,
                px as *const f64,
                1,
                py as *const f64,
                1,
                &mut out,
            )
        };
        check_blas(status, "cuBLAS dot")?;
        Ok(out)
    }

    /// Adds `value` to the diagonal of the `n × n` `a`.
    fn add_to_diagonal(
        &self,
        a: &mut CudaSlice<f64>,
        n: usize,
        value: f64,
    ) -> Result<(), GpuError> {
        let ones = self.stream.clone_htod(&vec![1.0f64; n])?;
        let (po, _g1) = ones.device_ptr(&self.stream);
        let (pa, _g2) = a.device_ptr_mut(&self.stream);
        let status = unsafe {
            blas_sys::cublasDaxpy_v2(
                *self.blas.handle(),
                int(n)?,
                &value,
                po as *const f64,
                1,
                pa as *mut f64,
                int(n + 1)?,
            )
        };
        check_blas(status, "cuBLAS axpy")
    }

    /// Chebyshev-filtered subspace iteration (see `filter`); `None` when it did not settle
    /// within `SubspaceParams::max_iterations` products with `g` or the block lost its rank.
    ///
    /// A Rayleigh–Ritz step costs a `b × b` `syevd` (about three filtered steps on an H100), so
    /// it is not done every step: first after three products (its Ritz values place the filter),
    /// then every `CHECK_SPACING` products, and once two gains of the top-`rank` Ritz energy
    /// are known, after as many products as their ratio predicts are needed. It stops when the
    /// last gain, or the energy still missing by geometric extrapolation of the last two gains,
    /// is below `tolerance` of the residual energy (see `settled`).
    fn subspace_iteration(
        &self,
        g: &CudaSlice<f64>,
        s: usize,
        rank: usize,
        b: usize,
        tolerance: f64,
    ) -> Result<Option<(CudaSlice<f64>, usize)>, GpuError> {
        let mut timing = Trace::start();
        let trace = self.gram_trace(g, s)?;
        let floor = trace * f64::EPSILON * s as f64;
        let mut q = self.stream.alloc_zeros::<f64>(s * b)?;
        {
            let omega = self.start_block(s, b)?;
            self.gemm(
                (N, N),
                (s, b, s),
                1.0,
                (g, s),
                (&*omega, s),
                0.0,
                (&mut q, s),
            )?;
        }
        let mut z = self.stream.alloc_zeros::<f64>(s * b)?;
        let mut spare = self.stream.alloc_zeros::<f64>(s * b)?;
        let mut h = self.stream.alloc_zeros::<f64>(b * b)?;
        let mut products = 1;
        let mut filter = None;
        let mut gains: Vec<f64> = Vec::new();
        let mut previous: Option<f64> = None;
        let mut next_check = 3;
        loop {
            // Here q is the block to orthonormalise: to working precision before a
            // Rayleigh–Ritz check (which needs QᵀQ = I), else only as far as the next product
            // needs a well-conditioned basis (a pass of Cholesky-QR saved, ~1 ms at 4096 × 768).
            let passes = if products + 1 >= next_check { 2 } else { 1 };
            if !self.cholesky_qr(&mut q, s, b, passes)? {
                return Ok(None);
            }
            self.gemm((N, N), (s, b, s), 1.0, (g, s), (&q, s), 0.0, (&mut z, s))?;
            products += 1;
            if products >= next_check {
                timing.mark(&self.stream, format_args!("{products} products"));
                // With the vectors: on an H100/H200 a 768² `syevd` takes 7.4 ms without them and
                // 8 ms with, less than a second call on the check that settles.
                self.gemm((T, N), (b, b, s), 1.0, (&q, s), (&z, s), 0.0, (&mut h, b))?;
                let theta = self.syevd(&mut h, b, true)?;
                timing.mark(&self.stream, "rayleigh-ritz");
                let energy: f64 = theta[b - rank..].iter().sum();
                let tail = (trace - energy).max(floor);
                if let Some(p) = previous {
                    gains.push(energy - p);
                }
                if settled(&gains, tolerance * tail) {
                    let y = self.leading_columns(&h, b, b, rank)?;
                    let mut ritz = self.stream.alloc_zeros::<f64>(s * rank)?;
                    self.gemm(
                        (N, N),
                        (s, rank, b),
                        1.0,
                        (&q, s),
                        (&y, b),
                        0.0,
                        (&mut ritz, s),
                    )?;
                    return Ok(Some((ritz, products)));
                }
                previous = Some(energy);
                filter = Chebyshev::from_ritz(theta[0], theta[b - 1], FILTER_LIMIT);
                let wait = products_to_settle(&gains, tolerance * tail)
                    .unwrap_or(CHECK_SPACING)
                    .max(filter.map_or(1, |f| f.degree));
                next_check = products + wait;
            }
            if products >= SUBSPACE.max_iterations {
                return Ok(None);
            }
            // q ← p(G)·q, given z = G·q.
            match filter {
                None => std::mem::swap(&mut q, &mut z),
                Some(f) => {
                    let degree = f
                        .degree
                        .min(next_check.saturating_sub(products))
                        .min(SUBSPACE.max_iterations - products)
                        .max(1);
                    products += degree - 1;
                    [q, z, spare] = self.chebyshev_block(g, (s, b), f, degree, [q, z, spare])?;
                }
            }
        }
    }

    /// `T_d((G − m·I)/e)·q` given `[q, z = G·q, spare]`, by the recurrence of `filter`: the
    /// result first, then the two other buffers (overwritten).
    fn chebyshev_block(
        &self,
        g: &CudaSlice<f64>,
        (s, b): (usize, usize),
        filter: Chebyshev,
        degree: usize,
        [q, z, mut spare]: [CudaSlice<f64>; 3],
    ) -> Result<[CudaSlice<f64>; 3], GpuError> {
        let (m, e) = (filter.center, filter.half_width);
        // Y₀ = q, Y₁ = (z − m·q)/e.
        self.axpby((1.0 / e, &z), (-m / e, &q), &mut spare, (s, b))?;
        let (mut previous, mut current, mut next) = (q, spare, z);
        for _ in 1..degree {
            // Y_{k+1} = 2/e·G·Y_k − 2m/e·Y_k − Y_{k−1}
            self.axpby(
                (-2.0 * m / e, &current),
                (-1.0, &previous),
                &mut next,
                (s, b),
            )?;
            self.gemm(
                (N, N),
                (s, b, s),
                2.0 / e,
                (g, s),
                (&current, s),
                1.0,
                (&mut next, s),
            )?;
            (previous, current, next) = (current, next, previous);
        }
        Ok([current, previous, next])
    }

    /// `out = α·x + β·y` for column-major `rows × cols` blocks.
    fn axpby(
        &self,
        (alpha, x): (f64, &CudaSlice<f64>),
        (beta, y): (f64, &CudaSlice<f64>),
        out: &mut CudaSlice<f64>,
        (rows, cols): (usize, usize),
    ) -> Result<(), GpuError> {
        let (px, _g1) = x.device_ptr(&self.stream);
        let (py, _g2) = y.device_ptr(&self.stream);
        let (po, _g3) = out.device_ptr_mut(&self.stream);
        // geam: the one cuBLAS call that sums two blocks into a third.
        let status = unsafe {
            blas_sys::cublasDgeam(
                *self.blas.handle(),
                N,
                N,
                int(rows)?,
                int(cols)?,
                &alpha,
                px as *const f64,
                int(rows)?,
                &beta,
                py as *const f64,
                int(rows)?,
                po as *mut f64,
                int(rows)?,
            )
        };
        check_blas(status, "cuBLAS geam")
    }

    fn low_rank(&self, w: &WeightMatrix<'_>, rank: usize) -> Result<LowRank, GpuError> {
        let mut trace = Trace::start();
        let a = self.upload(w.data())?;
        trace.mark(&self.stream, "upload");
        self.low_rank_uploaded(a, w, rank)
    }

    /// [`Self::low_rank`] of `w` given its values `a` on the device (overwritten).
    fn low_rank_uploaded(
        &self,
        mut a: CudaSlice<f64>,
        w: &WeightMatrix<'_>,
        rank: usize,
    ) -> Result<LowRank, GpuError> {
        let (out_dim, in_dim) = (w.out_dim(), w.in_dim());
        let mut trace = Trace::start();
        // Row-major W [out, in] is the column-major A = Wᵀ (in × out), lda = in.
        let wide = out_dim <= in_dim;
        let (s, t) = if wide {
            (out_dim, in_dim)
        } else {
            (in_dim, out_dim)
        };
        let mut g = self.stream.alloc_zeros::<f64>(s * s)?;
        if wide {
            // M = W = Aᵀ: G = Aᵀ·A.
            self.gemm(
                (T, N),
                (s, s, in_dim),
                1.0,
                (&a, in_dim),
                (&a, in_dim),
                0.0,
                (&mut g, s),
            )?;
        } else {
            // M = Wᵀ = A: G = A·Aᵀ.
            self.gemm(
                (N, T),
                (s, s, out_dim),
                1.0,
                (&a, in_dim),
                (&a, in_dim),
                0.0,
                (&mut g, s),
            )?;
        }
        let norm = self.norm(&a)?;
        trace.mark(&self.stream, "gram");
        let (q, iterations) = self.top_eigenvectors(&g, s, rank, SUBSPACE.tolerance)?;
        trace.mark(&self.stream, "eigenvectors");
        drop(g);
        // R = Mᵀ·Q (t × rank).
        let mut r = self.stream.alloc_zeros::<f64>(t * rank)?;
        if wide {
            self.gemm(
                (N, N),
                (in_dim, rank, out_dim),
                1.0,
                (&a, in_dim),
                (&q, s),
                0.0,
                (&mut r, t),
            )?;
        } else {
            self.gemm(
                (T, N),
                (out_dim, rank, in_dim),
                1.0,
                (&a, in_dim),
                (&q, s),
                0.0,
                (&mut r, t),
            )?;
        }
        // Residual, in A's layout: A − (Q·Rᵀ)ᵀ (wide) or A − Q·Rᵀ (tall).
        if wide {
            self.gemm(
                (N, T),
                (in_dim, out_dim, rank),
                -1.0,
                (&r, t),
                (&q, s),
                1.0,
                (&mut a, in_dim),
            )?;
        } else {
            self.gemm(
                (N, T),
                (in_dim, out_dim, rank),
                -1.0,
                (&q, s),
                (&r, t),
                1.0,
                (&mut a, in_dim),
            )?;
        }
        let residual = self.norm(&a)?;
        trace.mark(&self.stream, "residual");
        let out = self.split(
            &q,
            &r,
            (s, t, rank),
            wide,
            relative_error_of(residual, norm),
            iterations,
        )?;
        trace.mark(&self.stream, "split and download");
        Ok(out)
    }

    /// The balanced factors of `M ≈ Q·Rᵀ` (see `cpu::split_factors`), scaled and laid out
    /// row-major on the device, so that the host only receives them.
    fn split(
        &self,
        q: &CudaSlice<f64>,
        r: &CudaSlice<f64>,
        (s, t, rank): (usize, usize, usize),
        wide: bool,
        relative_error: f64,
        iterations: usize,
    ) -> Result<LowRank, GpuError> {
        // σ_i² is the diagonal of RᵀR.
        let mut rtr = self.stream.alloc_zeros::<f64>(rank * rank)?;
        self.gemm(
            (T, N),
            (rank, rank, t),
            1.0,
            (r, t),
            (r, t),
            0.0,
            (&mut rtr, rank),
        )?;
        let rtr = self.stream.clone_dtoh(&rtr)?;
        let singular_values: Vec<f64> = (0..rank)
            .map(|i| rtr[i * rank + i].max(0.0).sqrt())
            .collect();
        let usable = |x: f64| x > 0.0 && x.is_finite();
        let up: Vec<f64> = singular_values
            .iter()
            .map(|&x| if usable(x) { x.sqrt() } else { 0.0 })
            .collect();
        let down: Vec<f64> = singular_values
            .iter()
            .map(|&x| if usable(x) { 1.0 / x.sqrt() } else { 0.0 })
            .collect();
        let (up, down) = (self.stream.clone_htod(&up)?, self.stream.clone_htod(&down)?);
        // Q·diag(√σ) and R·diag(1/√σ), column-major.
        let q_scaled = self.dgmm(q, s, rank, &up)?;
        let r_scaled = self.dgmm(r, t, rank, &down)?;
        // Row-major [L, in] is column-major (in × L): that block as is. Row-major [out, L] is
        // column-major (L × out): the transpose of the other block.
        let (first_block, second_block, out_dim, in_dim) = if wide {
            (r_scaled, q_scaled, s, t)
        } else {
            (q_scaled, r_scaled, t, s)
        };
        let second_t = self.transpose(&second_block, out_dim, rank)?;
        Ok(LowRank {
            out_dim,
            in_dim,
            rank,
            first: self.download(&first_block)?,
            second: self.download(&second_t)?,
            singular_values,
            relative_error,
            iterations,
        })
    }

    /// `A·diag(x)` for a column-major `m × n` `A`.
    fn dgmm(
        &self,
        a: &CudaSlice<f64>,
        m: usize,
        n: usize,
        x: &CudaSlice<f64>,
    ) -> Result<CudaSlice<f64>, GpuError> {
        let mut c = self.stream.alloc_zeros::<f64>(m * n)?;
        {
            let (pa, _g1) = a.device_ptr(&self.stream);
            let (px, _g2) = x.device_ptr(&self.stream);
            let (pc, _g3) = c.device_ptr_mut(&self.stream);
            let status = unsafe {
                blas_sys::cublasDdgmm(
                    *self.blas.handle(),
                    blas_sys::cublasSideMode_t::CUBLAS_SIDE_RIGHT,
                    int(m)?,
                    int(n)?,
                    pa as *const f64,
                    int(m)?,
                    px as *const f64,
                    1,
                    pc as *mut f64,
                    int(m)?,
                )
            };
            check_blas(status, "cuBLAS dgmm")?;
        }
        Ok(c)
    }

    /// The transpose (`n × m`) of a column-major `m × n` `a`.
    fn transpose(
        &self,
        a: &CudaSlice<f64>,
        m: usize,
        n: usize,
    ) -> Result<CudaSlice<f64>, GpuError> {
        let mut c = self.stream.alloc_zeros::<f64>(m * n)?;
        {
            let (one, zero) = (1.0f64, 0.0f64);
            let (pa, _g1) = a.device_ptr(&self.stream);
            let (pc, _g2) = c.device_ptr_mut(&self.stream);
            let status = unsafe {
                blas_sys::cublasDgeam(
                    *self.blas.handle(),
                    T,
                    N,
                    int(n)?,
                    int(m)?,
                    &one,
                    pa as *const f64,
                    int(m)?,
                    &zero,
                    pc as *const f64,
                    int(n)?,
                    pc as *mut f64,
                    int(n)?,
                )
            };
            check_blas(status, "cuBLAS geam")?;
        }
        Ok(c)
    }
}

fn relative_error_of(residual: f64, norm: f64) -> f64 {
    if norm > 0.0 {
        residual / norm
    } else {
        0.0
    }
}

/// What the GPU returns for a data-aware fit; the host adds the bias and the nmse.
pub(crate) struct CalibratedOnGpu {
    /// The pair, as the weight-space engine returns it.
    pub(crate) factors: LowRank,
    /// `tr(Δ·C₀·Δᵀ)`: the squared output error summed over the rows, bias refitted.
    pub(crate) error_energy: f64,
    /// `tr(W·C₀·Wᵀ)`: the spread of the outputs around their per-output means.
    pub(crate) output_energy: f64,
    /// The absolute ridge added to `C₀`.
    pub(crate) ridge: f64,
    /// `W·μ`, `μ` the mean row.
    pub(crate) w_mu: Vec<f64>,
    /// `BA·μ`.
    pub(crate) ba_mu: Vec<f64>,
}

/// The exact data-aware fit (see `engine::calibrated`) on the GPU, in f64: `x` is `rows × in`
/// row-major.
pub(crate) fn calibrated(
    w: &WeightMatrix<'_>,
    x: &[f64],
    rows: usize,
    ridge: f64,
    rank: usize,
) -> Result<CalibratedOnGpu, GpuError> {
    gpu()?.calibrated(w, x, rows, ridge, rank)
}

impl Gpu {
    fn calibrated(
        &self,
        w: &WeightMatrix<'_>,
        x: &[f64],
        rows: usize,
        ridge: f64,
        rank: usize,
    ) -> Result<CalibratedOnGpu, GpuError> {
        let (out_dim, in_dim) = (w.out_dim(), w.in_dim());
        let mut trace = Trace::start();
        // Row-major W [out, in] is the column-major Wᵀ (in × out); likewise X is Xᵀ (in × rows).
        let wt = self.upload(w.data())?;
        let mut mu = self.stream.alloc_zeros::<f64>(in_dim)?;
        let mut c = self.stream.alloc_zeros::<f64>(in_dim * in_dim)?;
        {
            let xt = self.upload(x)?;
            trace.mark(&self.stream, "upload");
            // μ = Xᵀ·1/N, C₀ = Xᵀ·X − N·μ·μᵀ.
            let ones = self.stream.clone_htod(&vec![1.0f64; rows])?;
            self.gemm(
                (N, N),
                (in_dim, 1, rows),
                1.0 / rows as f64,
                (&xt, in_dim),
                (&ones, rows),
                0.0,
                (&mut mu, in_dim),
            )?;
            self.gemm(
                (N, T),
                (in_dim, in_dim, rows),
                1.0,
                (&xt, in_dim),
                (&xt, in_dim),
                0.0,
                (&mut c, in_dim),
            )?;
        }
        self.gemm(
            (N, T),
            (in_dim, in_dim, 1),
            -(rows as f64),
            (&mu, in_dim),
            (&mu, in_dim),
            1.0,
            (&mut c, in_dim),
        )?;
        trace.mark(&self.stream, "second moment");
        let rho = ridge * self.gram_trace(&c, in_dim)? / in_dim as f64;
        // tr(W·C₀·Wᵀ) = Σ (WᵀW) ∘ C₀.
        let output_energy = {
            let mut k = self.stream.alloc_zeros::<f64>(in_dim * in_dim)?;
            self.gemm(
                (N, T),
                (in_dim, in_dim, out_dim),
                1.0,
                (&wt, in_dim),
                (&wt, in_dim),
                0.0,
                (&mut k, in_dim),
            )?;
            self.dot(&k, &c)?
        };
        let mut cr = self.stream.clone_dtod(&c)?;
        self.add_to_diagonal(&mut cr, in_dim, rho)?;
        let (q, iterations) = if out_dim <= in_dim {
            // Leading eigenvectors of W·C·Wᵀ (out × out).
            let mut t1 = self.stream.alloc_zeros::<f64>(out_dim * in_dim)?;
            self.gemm(
                (T, N),
                (out_dim, in_dim, in_dim),
                1.0,
                (&wt, in_dim),
                (&cr, in_dim),
                0.0,
                (&mut t1, out_dim),
            )?;
            let mut g = self.stream.alloc_zeros::<f64>(out_dim * out_dim)?;
            self.gemm(
                (N, N),
                (out_dim, out_dim, in_dim),
                1.0,
                (&t1, out_dim),
                (&wt, in_dim),
                0.0,
                (&mut g, out_dim),
            )?;
            trace.mark(&self.stream, "output gram");
            self.top_eigenvectors(&g, out_dim, rank, 1e-9)?
        } else {
            // Through the smaller C^{1/2}·Wᵀ·W·C^{1/2} (in × in), mapped back by W·C^{1/2}.
            let mut v = self.stream.clone_dtod(&cr)?;
            let lambda = self.syevd(&mut v, in_dim, true)?;
            let roots: Vec<f64> = lambda.iter().map(|l| l.max(0.0).sqrt()).collect();
            let roots = self.stream.clone_htod(&roots)?;
            let vs = self.dgmm(&v, in_dim, in_dim, &roots)?;
            let mut root = self.stream.alloc_zeros::<f64>(in_dim * in_dim)?;
            self.gemm(
                (N, T),
                (in_dim, in_dim, in_dim),
                1.0,
                (&vs, in_dim),
                (&v, in_dim),
                0.0,
                (&mut root, in_dim),
            )?;
            let mut ws = self.stream.alloc_zeros::<f64>(out_dim * in_dim)?;
            self.gemm(
                (T, N),
                (out_dim, in_dim, in_dim),
                1.0,
                (&wt, in_dim),
                (&root, in_dim),
                0.0,
                (&mut ws, out_dim),
            )?;
            let mut h = self.stream.alloc_zeros::<f64>(in_dim * in_dim)?;
            self.gemm(
                (T, N),
                (in_dim, in_dim, out_dim),
                1.0,
                (&ws, out_dim),
                (&ws, out_dim),
                0.0,
                (&mut h, in_dim),
            )?;
            let (y, iterations) = self.top_eigenvectors(&h, in_dim, rank, 1e-9)?;
            let mut u = self.stream.alloc_zeros::<f64>(out_dim * rank)?;
            self.gemm(
                (N, N),
                (out_dim, rank, in_dim),
                1.0,
                (&ws, out_dim),
                (&y, in_dim),
                0.0,
                (&mut u, out_dim),
            )?;
            if !self.cholesky_qr2(&mut u, out_dim, rank)? {
                return Err(GpuError::Failed(
                    "Cholesky-QR breakdown on the output basis".into(),
                ));
            }
            (u, iterations)
        };
        trace.mark(&self.stream, "output subspace");
        // R = Wᵀ·Q; BA = Q·Qᵀ·W, so the error is tr(W·C₀·Wᵀ) − tr(Rᵀ·C₀·R).
        let mut r = self.stream.alloc_zeros::<f64>(in_dim * rank)?;
        self.gemm(
            (N, N),
            (in_dim, rank, out_dim),
            1.0,
            (&wt, in_dim),
            (&q, out_dim),
            0.0,
            (&mut r, in_dim),
        )?;
        let captured = {
            let mut cr0 = self.stream.alloc_zeros::<f64>(in_dim * rank)?;
            self.gemm(
                (N, N),
                (in_dim, rank, in_dim),
                1.0,
                (&c, in_dim),
                (&r, in_dim),
                0.0,
                (&mut cr0, in_dim),
            )?;
            self.dot(&r, &cr0)?
        };
        let (norm_w, norm_r) = (self.norm(&wt)?, self.norm(&r)?);
        let relative_error = if norm_w > 0.0 {
            (norm_w.powi(2) - norm_r.powi(2)).max(0.0).sqrt() / norm_w
        } else {
            0.0
        };
        // W·μ, and BA·μ = Q·(Rᵀ·μ).
        let mut w_mu = self.stream.alloc_zeros::<f64>(out_dim)?;
        self.gemm(
            (T, N),
            (out_dim, 1, in_dim),
            1.0,
            (&wt, in_dim),
            (&mu, in_dim),
            0.0,
            (&mut w_mu, out_dim),
        )?;
        let mut r_mu = self.stream.alloc_zeros::<f64>(rank)?;
        self.gemm(
            (T, N),
            (rank, 1, in_dim),
            1.0,
            (&r, in_dim),
            (&mu, in_dim),
            0.0,
            (&mut r_mu, rank),
        )?;
        let mut ba_mu = self.stream.alloc_zeros::<f64>(out_dim)?;
        self.gemm(
            (N, N),
            (out_dim, 1, rank),
            1.0,
            (&q, out_dim),
            (&r_mu, rank),
            0.0,
            (&mut ba_mu, out_dim),
        )?;
        trace.mark(&self.stream, "energies");
        let factors = self.split(
            &q,
            &r,
            (out_dim, in_dim, rank),
            true,
            relative_error,
            iterations,
        )?;
        trace.mark(&self.stream, "split and download");
        Ok(CalibratedOnGpu {
            factors,
            error_energy: (output_energy - captured).max(0.0),
            output_energy,
            ridge: rho,
            w_mu: self.stream.clone_dtoh(&w_mu)?,
            ba_mu: self.stream.clone_dtoh(&ba_mu)?,
        })
    }
}

fn check_blas(status: blas_sys::cublasStatus_t, what: &str) -> Result<(), GpuError> {
    match status {
        blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        blas_sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED => {
            Err(GpuError::OutOfMemory(format!("{what}: {status:?}")))
        }
        other => Err(failed(what, other)),
    }
}

fn check_solver(status: solver_sys::cusolverStatus_t, what: &str) -> Result<(), GpuError> {
    match status {
        solver_sys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS => Ok(()),
        solver_sys::cusolverStatus_t::CUSOLVER_STATUS_ALLOC_FAILED => {
            Err(GpuError::OutOfMemory(format!("{what}: {status:?}")))
        }
        other => Err(failed(what, other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settles_on_a_small_gain_or_a_small_extrapolated_rest() {
        assert!(!settled(&[], 1.0));
        assert!(!settled(&[2.0], 1.0));
        assert!(settled(&[0.5], 1.0));
        // Gains 100 then 10: ratio 0.1, about 1.1 still missing.
        assert!(!settled(&[100.0, 10.0], 1.0));
        assert!(settled(&[100.0, 10.0], 1.2));
        // A slow ratio never extrapolates.
        assert!(!settled(&[10.0, 9.0], 8.0));
    }

    #[test]
    fn waits_as_long_as_the_rate_predicts_within_bounds() {
        assert_eq!(products_to_settle(&[1.0], 1e-6), None);
        // Ratio 0.1 per interval, 1.1e-1 missing, 1e-3 wanted: about two intervals.
        assert_eq!(
            products_to_settle(&[10.0, 1.0], 1e-3),
            Some(2 * CHECK_SPACING)
        );
        assert_eq!(products_to_settle(&[10.0, 1.0], 0.1), Some(1));
        // Growing gains: no rate to trust, the default spacing.
        assert_eq!(products_to_settle(&[1.0, 2.0], 1e-3), Some(CHECK_SPACING));
    }
}
