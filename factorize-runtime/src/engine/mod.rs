//! Factorization engines: the truncated decomposition of a dense weight matrix.
//!
//! The contract of every engine: given `W` (`out × in`, row-major, the dfdx/PyTorch layout) and a
//! rank `L <= min(out, in)`, return `second` (`out × L`) and `first` (`L × in`) with
//! `second · first` the best rank-`L` approximation of `W` in the Frobenius norm, split evenly:
//! `second = U_L·√S_L`, `first = √S_L·V_Lᵀ`. Its relative error
//! `‖W − second·first‖_F / ‖W‖_F` equals the Eckart–Young optimum `sqrt(Σ_{i>L} σ_i²) / ‖W‖_F`
//! to 1e-4 relative (tested against a full SVD in f64).
//!
//! ```
//! use factorize_runtime::engine::{low_rank, WeightMatrix};
//! use factorize_runtime::Precision;
//! // A rank-1 matrix is recovered exactly at rank 1.
//! let w: Vec<f64> = (0..6).map(|i| ((i / 3 + 1) * (i % 3 + 1)) as f64).collect();
//! let m = WeightMatrix::new("demo", &w, 2, 3).unwrap();
//! let f = low_rank(&m, 1, Precision::F64).unwrap();
//! assert!(f.relative_error < 1e-12);
//! assert_eq!((f.first.len(), f.second.len()), (3, 2));
//! ```

pub mod calibrated;
mod cpu;
#[cfg(feature = "cuda-engine")]
mod cuda;
mod filter;
mod gaussian;
mod params;
mod tridiagonal;

pub(crate) use gaussian::Gaussian;

pub use cpu::low_rank;
pub(crate) use cpu::Real;

/// The dense path's tridiagonal eigensolver, for the `eigen` benchmark only (not an API).
#[doc(hidden)]
pub use tridiagonal::leading_eigenvectors as __tridiagonal_leading_eigenvectors;

use std::time::{Duration, Instant};

use crate::config::{Backend, FactorizeConfig};
use crate::error::FactorizeError;

/// A dense weight matrix `[out, in]` (row-major) on the host, checked to be finite.
#[derive(Debug, Clone, Copy)]
pub struct WeightMatrix<'a> {
    name: &'a str,
    data: &'a [f64],
    out_dim: usize,
    in_dim: usize,
}

impl<'a> WeightMatrix<'a> {
    /// Wraps `data` (`out_dim · in_dim` values, row-major) as the weight of layer `name`.
    ///
    /// Errors: a length that does not match the dims; a NaN or infinite entry (the first one is
    /// named).
    pub fn new(
        name: &'a str,
        data: &'a [f64],
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Self, FactorizeError> {
        check_finite(name, "weight", data)?;
        if out_dim.checked_mul(in_dim) != Some(data.len()) {
            return Err(FactorizeError::Shape {
                layer: name.to_string(),
                tensor: "weight",
                expected: out_dim.saturating_mul(in_dim),
                actual: data.len(),
                shape: format!("[{out_dim}, {in_dim}]"),
            });
        }
        Ok(Self {
            name,
            data,
            out_dim,
            in_dim,
        })
    }

    /// The layer's name.
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// The values, row-major `[out, in]`.
    pub fn data(&self) -> &'a [f64] {
        self.data
    }

    /// Number of rows (outputs).
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Number of columns (inputs).
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// `‖W‖_F`.
    pub fn frobenius_norm(&self) -> f64 {
        self.squared_norm().sqrt()
    }

    /// `‖W‖_F²`.
    pub(crate) fn squared_norm(&self) -> f64 {
        self.data.iter().map(|x| x * x).sum()
    }

    pub(crate) fn check_rank(&self, rank: usize) -> Result<(), FactorizeError> {
        let max = self.out_dim.min(self.in_dim);
        if rank == 0 || rank > max {
            return Err(FactorizeError::Rank {
                layer: self.name.to_string(),
                rank,
                max,
            });
        }
        Ok(())
    }
}

/// Errors with the first non-finite value of `data`, naming the layer and the tensor.
pub fn check_finite(layer: &str, tensor: &'static str, data: &[f64]) -> Result<(), FactorizeError> {
    use rayon::prelude::*;
    // A value is NaN or ±Inf exactly when its exponent bits are all ones. Counting those in a
    // chunk is an integer sum the compiler vectorises (a float sum is a dependent chain it may
    // not reorder, and a `position` over every value exits early and does not vectorise);
    // only a chunk with a count is searched. Large tensors are scanned on all threads.
    const EXPONENT: u64 = 0x7ff0_0000_0000_0000;
    const CHUNK: usize = 4096;
    const PARALLEL: usize = 1 << 20;
    let clean = |chunk: &[f64]| {
        chunk
            .iter()
            .map(|x| usize::from(x.to_bits() & EXPONENT == EXPONENT))
            .sum::<usize>()
            == 0
    };
    let first_chunk = if data.len() >= PARALLEL {
        data.par_chunks(CHUNK).position_first(|chunk| !clean(chunk))
    } else {
        data.chunks(CHUNK).position(|chunk| !clean(chunk))
    };
    let first_bad = first_chunk.and_then(|c| {
        data[c * CHUNK..]
            .iter()
            .position(|x| !x.is_finite())
            .map(|i| c * CHUNK + i)
    });
    match first_bad {
        None => Ok(()),
        Some(index) => Err(FactorizeError::NonFinite {
            layer: layer.to_string(),
            tensor,
            index,
            value: data[index],
        }),
    }
}

/// A rank-`L` factorization `W ≈ second · first`.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    /// Rows of `W`.
    pub out_dim: usize,
    /// Columns of `W`.
    pub in_dim: usize,
    /// The rank `L`.
    pub rank: usize,
    /// `√S_L·V_Lᵀ`, `[L, in]` row-major: the weight of the first (bias-free) map.
    pub first: Vec<f64>,
    /// `U_L·√S_L`, `[out, L]` row-major: the weight of the second map.
    pub second: Vec<f64>,
    /// The top `L` singular values of `W`, nonincreasing.
    pub singular_values: Vec<f64>,
    /// `‖W − second·first‖_F / ‖W‖_F` (0 for a zero matrix), computed from the factors.
    pub relative_error: f64,
    /// Subspace iterations used; 0 when a dense eigensolver was used.
    pub iterations: usize,
}

impl LowRank {
    /// `second · first`, row-major `[out, in]`: the dense weight the pair computes.
    pub fn product(&self) -> Vec<f64> {
        let a = faer::MatRef::from_row_major_slice(&self.first, self.rank, self.in_dim);
        let b = faer::MatRef::from_row_major_slice(&self.second, self.out_dim, self.rank);
        let p = b * a;
        (0..self.out_dim)
            .flat_map(|o| (0..self.in_dim).map(move |i| (o, i)))
            .map(|(o, i)| p[(o, i)])
            .collect()
    }
}

/// The outcome of [`solve`] (a [`LowRank`]) or of [`calibrated::solve`] (a
/// [`calibrated::CalibratedFit`]): the result, where it was computed, and how long it took.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Solved<T = LowRank> {
    /// The factorization or fit.
    pub value: T,
    /// The backend that computed it (never `Auto`).
    pub backend: Backend,
    /// Wall time of the computation, a GPU attempt included.
    pub time: Duration,
    /// Anything the caller should know, e.g. a fallback to the CPU.
    pub note: Option<String>,
}

/// Whether the GPU engine can be used here: `Ok`, or the reason it cannot (not built with the
/// `cuda` feature, no driver or library, no device). Never panics.
pub fn gpu_available() -> Result<(), String> {
    #[cfg(feature = "cuda-engine")]
    {
        cuda::available()
    }
    #[cfg(not(feature = "cuda-engine"))]
    {
        Err("factorize-runtime was built without the `cuda` feature".to_string())
    }
}

/// The best rank-`rank` factorization of `w` on the backend `cfg` asks for, by the engines'
/// one dispatch policy:
/// - `Backend::Cpu`: the CPU engine.
/// - `Backend::Cuda`: the GPU engine, or [`FactorizeError::BackendUnavailable`] naming the
///   layer and the reason (no `cuda` feature, no driver, no device); GPU failures, out of
///   memory included, are errors too.
/// - `Backend::Auto`: the GPU when [`gpu_available`], else the CPU; a layer that runs the GPU
///   out of memory is redone on the CPU, and [`Solved::note`] says so.
pub fn solve(
    w: &WeightMatrix<'_>,
    rank: usize,
    cfg: &FactorizeConfig,
) -> Result<Solved, FactorizeError> {
    w.check_rank(rank)?;
    let start = Instant::now();
    let cpu = || low_rank(w, rank, cfg.precision);
    #[cfg(feature = "cuda-engine")]
    if route(w.name(), cfg.backend)? == Route::Gpu {
        let outcome = cuda::low_rank(w, rank);
        return settle(w.name(), cfg.backend, outcome, start.elapsed(), cpu);
    }
    #[cfg(not(feature = "cuda-engine"))]
    route(w.name(), cfg.backend)?;
    on_cpu(start, None, cpu)
}

/// [`solve`] for several layers `(weight, rank)`, in order. On the GPU each layer's weights
/// are uploaded (on a second stream) while the previous layer is solved, so only the first
/// upload is waited for. Ranks are all checked before any work; the first failing layer's
/// error is returned.
///
/// ```
/// use factorize_runtime::engine::{solve_many, WeightMatrix};
/// use factorize_runtime::FactorizeConfig;
/// let (a, b) = (vec![1.0; 12], vec![2.0; 6]);
/// let layers = [
///     (WeightMatrix::new("a", &a, 3, 4).unwrap(), 1),
///     (WeightMatrix::new("b", &b, 2, 3).unwrap(), 1),
/// ];
/// let solved = solve_many(&layers, &FactorizeConfig::default()).unwrap();
/// assert!(solved.iter().all(|s| s.value.relative_error < 1e-12));
/// ```
pub fn solve_many(
    layers: &[(WeightMatrix<'_>, usize)],
    cfg: &FactorizeConfig,
) -> Result<Vec<Solved>, FactorizeError> {
    for (w, rank) in layers {
        w.check_rank(*rank)?;
    }
    let Some((first, _)) = layers.first() else {
        return Ok(Vec::new());
    };
    #[cfg(feature = "cuda-engine")]
    if route(first.name(), cfg.backend)? == Route::Gpu {
        return cuda::low_rank_many(layers)
            .into_iter()
            .zip(layers)
            .map(|((outcome, time), (w, rank))| {
                let cpu = || low_rank(w, *rank, cfg.precision);
                settle(w.name(), cfg.backend, outcome, time, cpu)
            })
            .collect();
    }
    #[cfg(not(feature = "cuda-engine"))]
    route(first.name(), cfg.backend)?;
    layers
        .iter()
        .map(|(w, rank)| on_cpu(Instant::now(), None, || low_rank(w, *rank, cfg.precision)))
        .collect()
}

/// Where an engine sends a layer's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// The CPU engine.
    Cpu,
    /// The GPU engine.
    Gpu,
}

/// Where the dispatch policy (stated on [`solve`]) sends `layer`'s work; `settle` applies the
/// rest of it to the GPU's outcome. Every engine entry point uses these two.
pub(crate) fn route(layer: &str, backend: Backend) -> Result<Route, FactorizeError> {
    if backend == Backend::Cpu {
        return Ok(Route::Cpu);
    }
    match gpu_available() {
        Ok(()) => Ok(Route::Gpu),
        Err(reason) if backend == Backend::Cuda => Err(FactorizeError::BackendUnavailable {
            layer: layer.to_string(),
            backend,
            reason,
        }),
        Err(_) => Ok(Route::Cpu),
    }
}

/// The result of `cpu`, computed now, as a [`Solved`] timed from `start`.
pub(crate) fn on_cpu<T>(
    start: Instant,
    note: Option<String>,
    cpu: impl FnOnce() -> Result<T, FactorizeError>,
) -> Result<Solved<T>, FactorizeError> {
    Ok(Solved {
        value: cpu()?,
        backend: Backend::Cpu,
        time: start.elapsed(),
        note,
    })
}

/// The GPU's `outcome` for `layer` (after `gpu_time`) as [`route`]'s policy says: under
/// `Backend::Auto` a layer that ran the GPU out of memory is redone by `cpu`, with a note.
#[cfg(feature = "cuda-engine")]
pub(crate) fn settle<T>(
    layer: &str,
    backend: Backend,
    outcome: Result<T, cuda::GpuError>,
    gpu_time: Duration,
    cpu: impl FnOnce() -> Result<T, FactorizeError>,
) -> Result<Solved<T>, FactorizeError> {
    match outcome {
        Ok(value) => Ok(Solved {
            value,
            backend: Backend::Cuda,
            time: gpu_time,
            note: None,
        }),
        Err(cuda::GpuError::OutOfMemory(reason)) if backend == Backend::Auto => {
            let note = format!("GPU out of memory ({reason}); done on the CPU");
            let mut solved = on_cpu(Instant::now(), Some(note), cpu)?;
            solved.time += gpu_time;
            Ok(solved)
        }
        Err(cuda::GpuError::OutOfMemory(reason)) => Err(FactorizeError::Device {
            layer: layer.to_string(),
            reason: format!("out of memory: {reason}"),
        }),
        Err(cuda::GpuError::Failed(reason)) => Err(FactorizeError::Device {
            layer: layer.to_string(),
            reason,
        }),
    }
}

/// `‖W − second·first‖_F / ‖W‖_F` for factors of any origin (0 for a zero `W`).
///
/// `second` is `[out, rank]` and `first` `[rank, in]`, row-major, as in [`LowRank`].
pub fn relative_error(w: &WeightMatrix<'_>, second: &[f64], first: &[f64], rank: usize) -> f64 {
    let (o, i) = (w.out_dim(), w.in_dim());
    let a = faer::MatRef::from_column_major_slice(first, i, rank); // firstᵀ
    let b = faer::MatRef::from_column_major_slice(second, rank, o); // secondᵀ
    let wt = faer::MatRef::from_column_major_slice(w.data(), i, o); // Wᵀ
    let residual = wt - a * b;
    let norm = w.frobenius_norm();
    if norm == 0.0 {
        return 0.0;
    }
    residual.norm_l2() / norm
}
