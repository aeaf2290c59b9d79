//! The CPU engine (faer): Gram matrix of the smaller side, then its top eigenpairs.
//!
//! Let `M` be `W` or `Wᵀ`, whichever has fewer rows (`s × t`, `s <= t`). The top-`L` eigenvectors
//! `Q` of the Gram matrix `G = M·Mᵀ` (`s × s`) span the top-`L` left singular subspace of `M`,
//! and `Q·Qᵀ·M` is the best rank-`L` approximation of `M`. We never divide by a Gram eigenvalue:
//! with `R = Mᵀ·Q` and `σ_i = ‖R_i‖` (the singular values, measured on `M` itself, not squared),
//! the factors `Q_i·√σ_i` and `R_i/√σ_i` multiply back to exactly `Q·Qᵀ·M`.
//!
//! Only `L` eigenpairs are needed, so for `L` well below `s` the eigenpairs come from subspace
//! iteration with Rayleigh–Ritz on `G`: each step is a Chebyshev filter of `G` applied to the
//! block (`b` = `L` plus oversampling; see `filter`), a thin QR and a `b × b` eigensolve. The
//! residual energy of the Ritz subspace is `trace(G) − Σθ_i`, and Ritz values only approach the
//! eigenvalues from below, so the iteration stops once a step gains less than `SubspaceParams::tolerance` of the
//! remaining residual energy. When it does not settle within `SubspaceParams::max_iterations` products with `G`,
//! or when `b` is not much smaller than `s` (`8·b > s`) or `s` is at most 512, a dense
//! eigensolver is used instead: tridiagonalisation, then only the `L` wanted eigenpairs of the
//! tridiagonal matrix (see `tridiagonal`), back-transformed. The result is always the optimum,
//! only the time varies.

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::evd::{self, tridiag, ComputeEigenvectors};
use faer::linalg::householder;
use faer::linalg::matmul::{
    self,
    triangular::{self, BlockStructure},
};
use faer::linalg::qr::no_pivoting::factor::recommended_block_size;
use faer::{Accum, Col, Conj, Mat, MatMut, MatRef, Scale, Side};

use super::filter::Chebyshev;

use super::gaussian::Gaussian;
use super::params::SUBSPACE;
use super::tridiagonal;
use super::{LowRank, WeightMatrix};
use crate::config::Precision;
use crate::error::FactorizeError;

/// The floating-point types the engine computes in.
pub(crate) trait Real: faer::traits::RealField + Copy {
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self
    }
}

/// The best rank-`rank` factorization of `w` on the CPU, computed in `precision`.
///
/// Errors: `rank` outside `1..=min(out, in)`; a failed eigensolver (named with the layer).
pub fn low_rank(
    w: &WeightMatrix<'_>,
    rank: usize,
    precision: Precision,
) -> Result<LowRank, FactorizeError> {
    w.check_rank(rank)?;
    crate::pool::run(|| match precision {
        Precision::F32 => solve::<f32>(w, rank),
        Precision::F64 => solve::<f64>(w, rank),
    })
}

fn solve<T: Real>(w: &WeightMatrix<'_>, rank: usize) -> Result<LowRank, FactorizeError> {
    let (out_dim, in_dim) = (w.out_dim(), w.in_dim());
    // M = W when W is wide (or square), else Wᵀ, so that the Gram matrix is the smaller one.
    let wide = out_dim <= in_dim;
    let m = engine_matrix::<T>(w, wide);
    let g = gram(m.as_ref());
    let Leading {
        vectors: q,
        iterations,
        ..
    } = top_eigenvectors(g, rank, w.name(), SUBSPACE.tolerance)?;

    // R = Mᵀ·Q: its column norms are the singular values.
    let r = m.transpose() * &q;
    let split = split_factors(q.as_ref(), r.as_ref(), wide);
    let mut residual = m;
    matmul::matmul(
        residual.as_mut(),
        Accum::Add,
        q.as_ref(),
        r.transpose(),
        T::of(-1.0),
        faer::get_global_parallelism(),
    );
    let residual_norm = residual.norm_l2().f64();
    let norm = w.frobenius_norm();
    let relative_error = if norm > 0.0 {
        residual_norm / norm
    } else {
        0.0
    };
    Ok(split.into_low_rank(out_dim, in_dim, relative_error, iterations))
}

/// `M` in `T`: `W` when `wide`, else `Wᵀ`. Filled on all cores by blocks of columns, each block
/// reading `W` row by row (faster than one strided read or a blocked transpose; see
/// docs/performance.md, tuning notes).
fn engine_matrix<T: Real>(w: &WeightMatrix<'_>, wide: bool) -> Mat<T> {
    use rayon::prelude::*;
    const BLOCK: usize = 64;
    let (out_dim, in_dim, data) = (w.out_dim(), w.in_dim(), w.data());
    let (s, t) = if wide {
        (out_dim, in_dim)
    } else {
        (in_dim, out_dim)
    };
    let mut m = Mat::<T>::zeros(s, t);
    m.par_col_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(block, columns)| {
            let j0 = block * BLOCK;
            let mut columns: Vec<_> = columns.col_iter_mut().collect();
            if wide {
                // Row `i` of the block's columns is a contiguous run of row `i` of `W`.
                for i in 0..s {
                    let row = &data[i * in_dim + j0..];
                    for (column, &v) in columns.iter_mut().zip(row) {
                        column[i] = T::of(v);
                    }
                }
            } else {
                // Column `j` of `Wᵀ` is row `j` of `W`.
                for (c, column) in columns.into_iter().enumerate() {
                    let row = &data[(j0 + c) * in_dim..(j0 + c + 1) * in_dim];
                    column.iter_mut().zip(row).for_each(|(x, &v)| *x = T::of(v));
                }
            }
        });
    m
}

/// The balanced factors of `M ≈ Q·Rᵀ` (`Q` orthonormal `s × L`, `R = Mᵀ·Q`): `Q_i·√σ_i` and
/// `R_i/√σ_i` with `σ_i = ‖R_i‖`, ordered by nonincreasing `σ_i` (directions of one invariant
/// subspace, like the null space of a low-rank `M`, may come in any order from the
/// eigensolver). A direction with `σ_i = 0` gets zero factors.
pub(crate) struct Split {
    /// `[out, L]` and `[L, in]`, row-major.
    second: Vec<f64>,
    first: Vec<f64>,
    singular_values: Vec<f64>,
}

pub(crate) fn split_factors<T: Real>(q: MatRef<'_, T>, r: MatRef<'_, T>, wide: bool) -> Split {
    let (s, t, rank) = (q.nrows(), r.nrows(), q.ncols());
    let norms: Vec<f64> = (0..rank)
        .map(|i| r.col(i).iter().map(|x| x.f64().powi(2)).sum::<f64>().sqrt())
        .collect();
    let mut order: Vec<usize> = (0..rank).collect();
    order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]));
    // `Q·√σ` is `s × L` and `R/√σ` is `t × L`. Wide (`M = W`): `second = Q·√σ` (`[out, L]`) and
    // `first = (R/√σ)ᵀ` (`[L, in]`); tall (`M = Wᵀ`) the other way round. Each is written
    // straight into its row-major place: value `j` of direction `to` goes to `[j·L + to]` in a
    // `[rows, L]` factor and to `[to·cols + j]` in an `[L, cols]` one.
    let mut q_factor = vec![0.0; s * rank];
    let mut r_factor = vec![0.0; t * rank];
    let (q_place, r_place) = if wide {
        ((rank, 1), (1, t))
    } else {
        ((1, s), (rank, 1))
    };
    for (to, &from) in order.iter().enumerate() {
        let sigma = norms[from];
        if !(sigma > 0.0 && sigma.is_finite()) {
            continue;
        }
        let root = sigma.sqrt();
        for (j, x) in q.col(from).iter().enumerate() {
            q_factor[j * q_place.0 + to * q_place.1] = x.f64() * root;
        }
        for (j, x) in r.col(from).iter().enumerate() {
            r_factor[j * r_place.0 + to * r_place.1] = x.f64() / root;
        }
    }
    let (second, first) = if wide {
        (q_factor, r_factor)
    } else {
        (r_factor, q_factor)
    };
    Split {
        second,
        first,
        singular_values: order.iter().map(|&i| norms[i]).collect(),
    }
}

impl Split {
    pub(crate) fn into_low_rank(
        self,
        out_dim: usize,
        in_dim: usize,
        relative_error: f64,
        iterations: usize,
    ) -> LowRank {
        LowRank {
            out_dim,
            in_dim,
            rank: self.singular_values.len(),
            first: self.first,
            second: self.second,
            singular_values: self.singular_values,
            relative_error,
            iterations,
        }
    }
}

/// `G = M·Mᵀ`, computing one triangle (half the work) and mirroring it.
pub(crate) fn gram<T: Real>(m: MatRef<'_, T>) -> Mat<T> {
    symmetric_product(m, m.transpose())
}

/// `A·B` for factors whose product is known to be symmetric (`M·Mᵀ`, `W·C·Wᵀ` as `(W·C)·Wᵀ`),
/// computing one triangle and mirroring it.
pub(crate) fn symmetric_product<T: Real>(a: MatRef<'_, T>, b: MatRef<'_, T>) -> Mat<T> {
    let mut g = Mat::<T>::zeros(a.nrows(), a.nrows());
    lower_product(g.as_mut(), Accum::Replace, a, b);
    mirror_lower(&mut g);
    g
}

/// The lower triangle of `A·B` into that of `g` (replacing it or added to it).
pub(crate) fn lower_product<T: Real>(
    g: MatMut<'_, T>,
    accum: Accum,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
) {
    triangular::matmul(
        g,
        BlockStructure::TriangularLower,
        accum,
        a,
        BlockStructure::Rectangular,
        b,
        BlockStructure::Rectangular,
        T::one(),
        faer::get_global_parallelism(),
    );
}

/// Copies the lower triangle of the square `g` onto its upper one.
pub(crate) fn mirror_lower<T: Real>(g: &mut Mat<T>) {
    let s = g.nrows();
    // Tile by tile: a plain column loop reads a row of the other triangle per column, one
    // cache line per value.
    const TILE: usize = 32;
    for j0 in (0..s).step_by(TILE) {
        for i0 in (0..=j0).step_by(TILE) {
            for j in j0..(j0 + TILE).min(s) {
                for i in i0..(i0 + TILE).min(j) {
                    g[(i, j)] = g[(j, i)];
                }
            }
        }
    }
}

/// The leading eigenvectors of a symmetric matrix, as found.
pub(crate) struct Leading<T: Real> {
    /// Orthonormal columns, leading first.
    pub vectors: Mat<T>,
    /// Subspace iterations used (0 for the dense solver).
    pub iterations: usize,
    /// The sum of their eigenvalues (Ritz values for the iteration): `tr(QᵀGQ)` of `vectors`.
    pub captured: f64,
}

/// The `rank` leading eigenvectors of the symmetric `g`. `tolerance`: the subspace iteration
/// stops once a step gains less than this fraction of the residual energy (see `SubspaceParams::tolerance`).
pub(crate) fn top_eigenvectors<T: Real>(
    g: Mat<T>,
    rank: usize,
    layer: &str,
    tolerance: f64,
) -> Result<Leading<T>, FactorizeError> {
    let s = g.nrows();
    let b = SUBSPACE.block_size(rank, s);
    if SUBSPACE.cpu_iterates(b, s, tolerance) {
        if let Some(found) = subspace_iteration(&g, rank, b, layer, tolerance)? {
            return Ok(found);
        }
    }
    dense_leading_eigenvectors(g, rank, layer)
}

/// Chebyshev-filtered subspace iteration with Rayleigh–Ritz (see `filter`); `None` when it did
/// not settle within `SubspaceParams::max_iterations` multiplications by `g`, whose count is returned.
fn subspace_iteration<T: Real>(
    g: &Mat<T>,
    rank: usize,
    b: usize,
    layer: &str,
    tolerance: f64,
) -> Result<Option<Leading<T>>, FactorizeError> {
    let s = g.nrows();
    let trace: f64 = (0..s).map(|i| g[(i, i)].f64()).sum();
    let eps = T::epsilon_impl().f64();
    // Energy below this is rounding noise of the Gram matrix: an exactly low-rank W converges
    // at once instead of chasing noise.
    let floor = trace * eps * s as f64;
    // The filter may scale the leading direction this much beyond the cutoff: the weakest
    // directions of the block then keep about three digits. (Measured: higher limits cost more
    // products, not fewer, because the energy is then checked less often.)
    let limit = 1e-3 / eps;
    // The same start block as the GPU engine: column-major random signs.
    let signs = Gaussian::new(SUBSPACE.seed).signs(s * b);
    let omega = Mat::<T>::from_fn(s, b, |i, j| T::of(signs[j * s + i]));
    let mut q = orthonormal(g * &omega);
    let mut products = 1;
    let mut previous: Option<f64> = None;
    while products < SUBSPACE.max_iterations {
        let z = g * &q;
        products += 1;
        let h = q.transpose() * &z;
        let evd = h
            .self_adjoint_eigen(Side::Lower)
            .map_err(|_| no_convergence(layer))?;
        let theta = evd.S().column_vector();
        let energy: f64 = (b - rank..b).map(|i| theta[i].f64()).sum();
        let tail = (trace - energy).max(floor);
        if previous.is_some_and(|p| energy - p <= tolerance * tail) {
            let y = evd.U();
            let leading = Mat::<T>::from_fn(b, rank, |i, j| y[(i, b - 1 - j)]);
            return Ok(Some(Leading {
                vectors: &q * leading,
                iterations: products,
                captured: energy,
            }));
        }
        previous = Some(energy);
        q = match Chebyshev::from_ritz(theta[0].f64(), theta[b - 1].f64(), limit) {
            None => orthonormal(z),
            Some(filter) => {
                let degree = filter.degree.min(SUBSPACE.max_iterations - products).max(1);
                products += degree - 1;
                orthonormal(chebyshev_block(g, q, z, filter, degree))
            }
        };
    }
    Ok(None)
}

/// `T_d((G − m·I)/e)·Q` by the three-term recurrence, given `z = G·Q` (see `filter`).
fn chebyshev_block<T: Real>(
    g: &Mat<T>,
    q: Mat<T>,
    z: Mat<T>,
    filter: Chebyshev,
    degree: usize,
) -> Mat<T> {
    let (m, e) = (filter.center, filter.half_width);
    let mut previous = q;
    let mut current = Scale(T::of(1.0 / e)) * (z - Scale(T::of(m)) * &previous);
    for _ in 1..degree {
        // Y_{k+1} = 2/e·G·Y_k − 2m/e·Y_k − Y_{k−1}
        let mut next = Scale(T::of(-2.0 * m / e)) * &current - &previous;
        matmul::matmul(
            next.as_mut(),
            Accum::Add,
            g.as_ref(),
            current.as_ref(),
            T::of(2.0 / e),
            faer::get_global_parallelism(),
        );
        previous = std::mem::replace(&mut current, next);
    }
    current
}

/// The `rank` leading eigenvectors of the symmetric `g` by a dense eigensolver that computes
/// only those: tridiagonalisation, the `rank` leading eigenpairs of the tridiagonal matrix
/// (`tridiagonal`; divide and conquer for all `s` where that cannot vouch for its result),
/// then the Householder sequence applied to `rank` columns instead of all `s`.
fn dense_leading_eigenvectors<T: Real>(
    mut tri: Mat<T>,
    rank: usize,
    layer: &str,
) -> Result<Leading<T>, FactorizeError> {
    let s = tri.nrows();
    // Below this size the threads cost more than they share (docs/performance.md, tuning
    // notes).
    let par = if s <= SUBSPACE.small_dense {
        faer::Par::Seq
    } else {
        faer::get_global_parallelism()
    };
    if s < 2 {
        return Ok(Leading {
            vectors: Mat::from_fn(s, rank, |_, _| T::one()),
            iterations: 0,
            captured: (0..s).map(|i| tri[(i, i)].f64()).sum(),
        });
    }
    let block = recommended_block_size::<T>(s, s);
    let mut householder = Mat::<T>::zeros(block, s - 1);
    let mut memory = MemBuffer::new(StackReq::any_of(&[
        tridiag::tridiag_in_place_scratch::<T>(s, par, Default::default()),
        householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<T>(
            s - 1,
            block,
            rank,
        ),
    ]));
    let stack = MemStack::new(&mut memory);
    tridiag::tridiag_in_place(
        tri.as_mut(),
        householder.as_mut(),
        par,
        stack,
        Default::default(),
    );
    let diagonal: Vec<f64> = (0..s).map(|i| tri[(i, i)].f64()).collect();
    let subdiagonal: Vec<f64> = (0..s - 1).map(|i| tri[(i + 1, i)].f64()).collect();
    let found = tridiagonal::leading_eigenvectors(&diagonal, &subdiagonal, rank);
    let (mut q, values) = match found {
        Some((v, values)) => (Mat::<T>::from_fn(s, rank, |i, j| T::of(v[(i, j)])), values),
        None => all_tridiagonal_eigenvectors(&diagonal, &subdiagonal, rank, layer)?,
    };
    householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
        tri.submatrix(1, 0, s - 1, s - 1),
        householder.as_ref(),
        Conj::No,
        q.as_mut().subrows_mut(1, s - 1),
        par,
        stack,
    );
    Ok(Leading {
        vectors: q,
        iterations: 0,
        captured: values.iter().sum(),
    })
}

/// The `rank` leading eigenvectors of a tridiagonal matrix and their eigenvalues by faer's
/// divide and conquer, which computes all of them: the fallback for matrices `tridiagonal`
/// cannot vouch for.
fn all_tridiagonal_eigenvectors<T: Real>(
    diagonal: &[f64],
    subdiagonal: &[f64],
    rank: usize,
    layer: &str,
) -> Result<(Mat<T>, Vec<f64>), FactorizeError> {
    let s = diagonal.len();
    // Its workspace is several `s × s` matrices: allocated only when needed.
    let mut memory = MemBuffer::new(evd::self_adjoint_evd_scratch::<T>(
        s,
        ComputeEigenvectors::Yes,
        faer::get_global_parallelism(),
        Default::default(),
    ));
    let diagonal = Col::<T>::from_fn(s, |i| T::of(diagonal[i]));
    let subdiagonal = Col::<T>::from_fn(s, |i| T::of(subdiagonal.get(i).copied().unwrap_or(0.0)));
    let mut values = Col::<T>::zeros(s);
    let mut vectors = Mat::<T>::zeros(s, s);
    evd::tridiagonal_self_adjoint_evd(
        diagonal.as_diagonal(),
        subdiagonal.as_diagonal(),
        values.as_diagonal_mut(),
        Some(vectors.as_mut()),
        // Divide and conquer gains from threads even where the tridiagonalisation does not.
        faer::get_global_parallelism(),
        MemStack::new(&mut memory),
        Default::default(),
    )
    .map_err(|_| no_convergence(layer))?;
    // Eigenvalues come in nondecreasing order: the leading ones are the last columns.
    Ok((
        Mat::<T>::from_fn(s, rank, |i, j| vectors[(i, s - 1 - j)]),
        (0..rank).map(|j| values[s - 1 - j].f64()).collect(),
    ))
}

fn orthonormal<T: Real>(a: Mat<T>) -> Mat<T> {
    a.qr().compute_thin_Q()
}

fn no_convergence(layer: &str) -> FactorizeError {
    FactorizeError::NoConvergence {
        layer: layer.to_string(),
        routine: "symmetric eigensolver",
    }
}
