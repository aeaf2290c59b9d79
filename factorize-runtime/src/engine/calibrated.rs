//! Data-aware factorization: the rank-`L` pair that best reproduces a layer's outputs on
//! calibration inputs, exactly.
//!
//! For a layer `y = W·x + b` and calibration rows `X` (`N × in`, mean `μ`, centred `X_c`), the
//! pair `(B, A)` and bias `b′` minimizing `‖(X·Wᵀ + b) − (X·(BA)ᵀ + b′)‖_F` are:
//! - `b′ = b + (W − BA)·μ` (the mean residual), which leaves `‖X_c·(W − BA)ᵀ‖_F`;
//! - with `C = X_cᵀ·X_c` that is `tr(Δ·C·Δᵀ)`, minimized by `BA = U_L·U_Lᵀ·W` where `U_L` are
//!   the leading eigenvectors of `W·C·Wᵀ` (the left singular vectors of `W·C^{1/2}`): the same
//!   eigen-solver as the weight-space engine, on a different Gram matrix. No square root or
//!   inverse of `C` is formed.
//!
//! A ridge `ρ·I` (with `ρ` relative to `tr(C)/in`) is added to `C` as asked: an exact fit on few
//! rows can overfit (all the more when `N ≤ in` and `C` is singular, which the fit reports), and
//! weight-space SVD is the limit of a large ridge. [`Fit::Als`] reproduces Composer's alternating least squares
//! from the weight-space start, for comparison.
//!
//! ```
//! use factorize_runtime::engine::calibrated::{fit_linear, Calibration};
//! use factorize_runtime::Fit;
//! use factorize_runtime::engine::WeightMatrix;
//! // 2 outputs, 3 inputs; inputs that only ever vary along the first axis.
//! let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let x: Vec<f64> = (0..20).flat_map(|i| [i as f64, 1.0, 1.0]).collect();
//! let m = WeightMatrix::new("fc", &w, 2, 3).unwrap();
//! let calib = Calibration::new("fc", &x, 20, 3).unwrap();
//! let fit = fit_linear(&m, &[0.0, 0.0], &calib, 1, Fit::Exact { ridge: 0.0 }).unwrap();
//! assert!(fit.nmse < 1e-20); // rank 1 is exact on these inputs
//! ```

use std::time::Instant;

use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, MatRef, Side};

use super::cpu::{
    gram, lower_product, mirror_lower, split_factors, symmetric_product, top_eigenvectors, Leading,
};
use super::params::SUBSPACE;
use super::{check_finite, low_rank, on_cpu, route, LowRank, Solved, WeightMatrix};
#[cfg(feature = "cuda-engine")]
use super::{settle, Route};
use crate::config::{Backend, Fit, Precision};
use crate::error::FactorizeError;

/// Calibration inputs of one layer: `rows × cols` row-major, checked finite and non-empty;
/// optionally with the same rows as the dense model gave them (see [`Self::with_reference`]).
#[derive(Debug, Clone, Copy)]
pub struct Calibration<'a> {
    data: &'a [f64],
    rows: usize,
    cols: usize,
    reference: Option<&'a [f64]>,
}

impl<'a> Calibration<'a> {
    /// Wraps `data` as the inputs of layer `layer` (named in errors).
    pub fn new(
        layer: &str,
        data: &'a [f64],
        rows: usize,
        cols: usize,
    ) -> Result<Self, FactorizeError> {
        if rows == 0 {
            return Err(FactorizeError::Calibration {
                layer: layer.to_string(),
                reason: "no calibration rows".into(),
            });
        }
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(FactorizeError::Shape {
                layer: layer.to_string(),
                tensor: "calibration input",
                expected: rows.saturating_mul(cols),
                actual: data.len(),
                shape: format!("[{rows}, {cols}]"),
            });
        }
        check_finite(layer, "calibration input", data)?;
        Ok(Self {
            data,
            rows,
            cols,
            reference: None,
        })
    }

    /// Rows of `cols` values (`data.len() / cols` of them), with the dense model's `reference`
    /// rows when given (see [`Self::with_reference`]).
    pub fn of_rows(
        layer: &str,
        data: &'a [f64],
        cols: usize,
        reference: Option<&'a [f64]>,
    ) -> Result<Self, FactorizeError> {
        let x = Self::new(layer, data, data.len() / cols.max(1), cols)?;
        match reference {
            Some(reference) => x.with_reference(layer, reference),
            None => Ok(x),
        }
    }

    /// Adds the reference inputs: row `i` of `reference` is what the dense model fed the layer
    /// where the model being fitted fed it row `i` of these inputs. [`Fit::Correcting`] fits
    /// the layer's output on them; the other fits ignore them.
    pub fn with_reference(self, layer: &str, reference: &'a [f64]) -> Result<Self, FactorizeError> {
        if reference.len() != self.data.len() {
            return Err(FactorizeError::Shape {
                layer: layer.to_string(),
                tensor: "reference input",
                expected: self.data.len(),
                actual: reference.len(),
                shape: format!("[{}, {}]", self.rows, self.cols),
            });
        }
        check_finite(layer, "reference input", reference)?;
        Ok(Self {
            reference: Some(reference),
            ..self
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    fn matrix(&self) -> MatRef<'a, f64> {
        MatRef::from_row_major_slice(self.data, self.rows, self.cols)
    }
}

/// A data-aware fit of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibratedFit {
    /// The pair (`first = A`, `second = B`), as for the weight-space engine.
    pub factors: LowRank,
    /// The refitted bias `b′` of the second map.
    pub bias: Vec<f64>,
    /// Output nmse on the calibration rows (see [`nmse`]).
    pub nmse: f64,
    /// The absolute ridge added to `C` (0 when none).
    pub ridge: f64,
    /// Whether the rows cannot span the inputs (`N ≤ in`): `C` is singular.
    pub rank_deficient: bool,
}

/// The mean row, accumulated row by row (the rows are contiguous).
fn column_means(x: &Calibration<'_>) -> Vec<f64> {
    let mut mean = vec![0.0; x.cols];
    for row in x.data.chunks_exact(x.cols) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m /= x.rows as f64);
    mean
}

/// Second moment of the centred rows and the row mean.
fn moments(x: &Calibration<'_>) -> (Mat<f64>, Vec<f64>) {
    // Accumulated over blocks of rows: a centred copy of all the rows would be the largest
    // allocation of a small fit, and fresh pages fault in one by one.
    const ROWS: usize = 128;
    let mean = column_means(x);
    let mut c = Mat::<f64>::zeros(x.cols, x.cols);
    // Centred rows as columns, each filled from one contiguous row of `x`.
    let mut block = Mat::<f64>::zeros(x.cols, ROWS.min(x.rows));
    for (b, rows) in x.data.chunks(ROWS * x.cols).enumerate() {
        let n = rows.len() / x.cols;
        for (i, row) in rows.chunks_exact(x.cols).enumerate() {
            block
                .col_mut(i)
                .iter_mut()
                .zip(row.iter().zip(&mean))
                .for_each(|(out, (v, m))| *out = v - m);
        }
        let centred = block.as_ref().subcols(0, n);
        let accum = if b == 0 { Accum::Replace } else { Accum::Add };
        lower_product(c.as_mut(), accum, centred, centred.transpose());
    }
    mirror_lower(&mut c);
    (c, mean)
}

/// Errors unless `rank` suits `w`, `bias` is finite with one value per output and the rows of
/// `x` have one value per input.
fn check_inputs(
    w: &WeightMatrix<'_>,
    bias: &[f64],
    x: &Calibration<'_>,
    rank: usize,
) -> Result<(), FactorizeError> {
    let (out_dim, in_dim) = (w.out_dim(), w.in_dim());
    w.check_rank(rank)?;
    check_finite(w.name(), "bias", bias)?;
    if bias.len() != out_dim {
        return Err(FactorizeError::Shape {
            layer: w.name().to_string(),
            tensor: "bias",
            expected: out_dim,
            actual: bias.len(),
            shape: format!("[{out_dim}]"),
        });
    }
    if x.cols != in_dim {
        return Err(FactorizeError::Shape {
            layer: w.name().to_string(),
            tensor: "calibration input",
            expected: x.rows * in_dim,
            actual: x.data.len(),
            shape: format!("[{}, {in_dim}]", x.rows),
        });
    }
    Ok(())
}

/// Fits a rank-`rank` pair to `w` (with bias `bias`) on the calibration rows `x`.
///
/// Errors: shapes that do not match, NaN/Inf, `rank` out of `1..=min(out, in)`, a failed solver.
pub fn fit_linear(
    w: &WeightMatrix<'_>,
    bias: &[f64],
    x: &Calibration<'_>,
    rank: usize,
    fit: Fit,
) -> Result<CalibratedFit, FactorizeError> {
    crate::pool::run(|| {
        check_inputs(w, bias, x, rank)?;
        match fit {
            Fit::Exact { ridge } => fit_on_moments(w, bias, x, rank, OnMoments::Exact { ridge }),
            Fit::Als { iterations } => {
                fit_on_moments(w, bias, x, rank, OnMoments::Als { iterations })
            }
            // It takes the moments of seen and reference rows together, on its own.
            Fit::Correcting { ridge } => correcting(w, bias, x, rank, ridge),
        }
    })
}

/// The fits computed from the second moment of the rows the layer sees.
enum OnMoments {
    Exact { ridge: f64 },
    Als { iterations: usize },
}

/// The exact fit or ALS, on checked inputs, on the calling thread's pool.
fn fit_on_moments(
    w: &WeightMatrix<'_>,
    bias: &[f64],
    x: &Calibration<'_>,
    rank: usize,
    fit: OnMoments,
) -> Result<CalibratedFit, FactorizeError> {
    let (out_dim, in_dim) = (w.out_dim(), w.in_dim());
    let wm = MatRef::from_row_major_slice(w.data(), out_dim, in_dim);
    let (mut c, mean) = moments(x);
    let scale = trace(&c) / in_dim as f64;
    let (factors, energies, ridge) = match fit {
        OnMoments::Exact { ridge } => {
            // No inverse of C is formed, so even a singular C (N <= in) needs no ridge to be
            // solvable; the ridge is about generalising off the calibration rows.
            let rho = ridge * scale;
            let (factors, energies) = exact(w, &mut c, rho, rank)?;
            (factors, energies, rho)
        }
        OnMoments::Als { iterations } => {
            let mut factors = als(w, &c, rank, iterations, scale)?;
            factors.relative_error =
                super::relative_error(w, &factors.second, &factors.first, rank);
            let energies = Energies {
                output: quad(wm, &c),
                error: quad(difference(wm, &factors).as_ref(), &c),
            };
            (factors, energies, 0.0)
        }
    };
    let (w_mu, ba_mu) = mean_images(wm, &factors, &mean);
    Ok(CalibratedFit {
        bias: refitted_bias(bias, &w_mu, &ba_mu),
        nmse: energies.nmse(&w_mu, bias, x.rows),
        factors,
        ridge,
        rank_deficient: x.rows <= in_dim,
    })
}

/// The correcting fit ([`Fit::Correcting`]) with the relative ridge `ridge`.
///
/// With `F` the centred inputs the layer sees and `D` the centred reference inputs (paired
/// rows), the target is `D·Wᵀ` and the objective `‖D·Wᵀ − F·Mᵀ‖² + ρ‖M − W‖²`. Its unconstrained
/// minimum solves `M·(C_ff + ρI) = W·(C_df + ρI)`, and for any `M` the objective is a constant
/// plus `tr((M − M*)·(C_ff + ρI)·(M − M*)ᵀ)`: so the best rank-`rank` `M` is the exact fit of
/// `M*` under `C_ff` with ridge `ρ`. The bias takes the mean residual,
/// `b′ = b + W·μ_d − BA·μ_f`.
fn correcting(
    w: &WeightMatrix<'_>,
    bias: &[f64],
    x: &Calibration<'_>,
    rank: usize,
    ridge: f64,
) -> Result<CalibratedFit, FactorizeError> {
    let (out_dim, in_dim) = (w.out_dim(), w.in_dim());
    let wm = MatRef::from_row_major_slice(w.data(), out_dim, in_dim);
    let reference = x.reference.unwrap_or(x.data);
    // Seen and reference rows side by side: one moment pass gives C_ff, C_fd and C_dd.
    let joint: Vec<f64> = x
        .data
        .chunks_exact(in_dim)
        .zip(reference.chunks_exact(in_dim))
        .flat_map(|(f, d)| f.iter().chain(d).copied())
        .collect();
    let (moment, mean) = moments(&Calibration::new(w.name(), &joint, x.rows, 2 * in_dim)?);
    let (mu_f, mu_d) = mean.split_at(in_dim);
    let block = |row, col| moment.as_ref().submatrix(row, col, in_dim, in_dim);
    let mut c_ff = block(0, 0).to_owned();
    let rho = ridge * trace(&c_ff) / in_dim as f64;
    let ridged = |m: MatRef<'_, f64>| {
        let mut m = m.to_owned();
        (0..in_dim).for_each(|i| m[(i, i)] += rho);
        m
    };
    let optimum = ridged(c_ff.as_ref())
        .llt(Side::Lower)
        .map_err(|_| FactorizeError::Calibration {
            layer: w.name().to_string(),
            reason: "the inputs it sees do not span its input space: a correcting fit needs \
                     a ridge > 0 here"
                .into(),
        })?
        .solve(ridged(block(0, in_dim)) * wm.transpose());
    let target: Vec<f64> = (0..out_dim)
        .flat_map(|o| (0..in_dim).map(move |i| (o, i)))
        .map(|(o, i)| optimum[(i, o)])
        .collect();
    let target = WeightMatrix::new(w.name(), &target, out_dim, in_dim)?;
    let (mut factors, _) = exact(&target, &mut c_ff, rho, rank)?;
    factors.relative_error = super::relative_error(w, &factors.second, &factors.first, rank);
    // The residual on the rows, `[W, −BA]` under the joint second moment.
    let a = MatRef::from_row_major_slice(&factors.first, rank, in_dim);
    let b = MatRef::from_row_major_slice(&factors.second, out_dim, rank);
    let ba = b * a;
    let residual = Mat::<f64>::from_fn(out_dim, 2 * in_dim, |o, j| {
        if j < in_dim {
            -ba[(o, j)]
        } else {
            wm[(o, j - in_dim)]
        }
    });
    let energies = Energies {
        output: quad(wm, &block(in_dim, in_dim).to_owned()),
        error: quad(residual.as_ref(), &moment).max(0.0),
    };
    let column = |m: Mat<f64>| (0..out_dim).map(|o| m[(o, 0)]).collect::<Vec<f64>>();
    let w_mu = column(wm * MatRef::from_column_major_slice(mu_d, in_dim, 1));
    let ba_mu = column(&ba * MatRef::from_column_major_slice(mu_f, in_dim, 1));
    Ok(CalibratedFit {
        bias: refitted_bias(bias, &w_mu, &ba_mu),
        nmse: energies.nmse(&w_mu, bias, x.rows),
        factors,
        ridge: rho,
        rank_deficient: x.rows <= in_dim,
    })
}

/// A layer's leading output directions, from which the best pair of every rank up to the
/// number found is a prefix: `W_r = Q_r·Q_rᵀ·W` with `Q_r` the first `r` columns (see
/// [`directions`]). Sensitivity measurements truncate one layer to many ranks from one
/// decomposition.
#[derive(Debug, Clone)]
pub struct Directions {
    q: Mat<f64>,
    weight: Vec<f64>,
    bias: Vec<f64>,
    /// The calibration rows' mean, when the directions are data-aware.
    mean: Option<Vec<f64>>,
}

/// The leading `max_rank` output directions of the layer `(w, bias)`: the left singular vectors
/// of `W` (weight SVD, `x` = `None`), or of `W·(C + ρI)^{1/2}` on calibration rows `x` (the
/// exact fit, [`Fit::Exact`] with relative `ridge`), leading first.
///
/// ```
/// use factorize_runtime::engine::calibrated::directions;
/// use factorize_runtime::engine::WeightMatrix;
/// let w = [3.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 1.0]; // diag(3, 2, 1)
/// let m = WeightMatrix::new("fc", &w, 3, 3).unwrap();
/// let d = directions(&m, &[0.0; 3], None, 0.0, 2).unwrap();
/// let (w1, _) = d.truncated(1);
/// assert!((w1[0] - 3.0).abs() < 1e-12 && w1[4].abs() < 1e-12); // keeps the largest
/// ```
///
/// Errors: as [`fit_linear`].
pub fn directions(
    w: &WeightMatrix<'_>,
    bias: &[f64],
    x: Option<&Calibration<'_>>,
    ridge: f64,
    max_rank: usize,
) -> Result<Directions, FactorizeError> {
    crate::pool::run(|| {
        let (out_dim, in_dim) = (w.out_dim(), w.in_dim());
        let wm = MatRef::from_row_major_slice(w.data(), out_dim, in_dim);
        let (c, mean) = match x {
            Some(x) => {
                check_inputs(w, bias, x, max_rank)?;
                let (mut c, mean) = moments(x);
                let rho = ridge * trace(&c) / in_dim as f64;
                (0..in_dim).for_each(|i| c[(i, i)] += rho);
                (c, Some(mean))
            }
            None => {
                w.check_rank(max_rank)?;
                check_finite(w.name(), "bias", bias)?;
                (Mat::<f64>::identity(in_dim, in_dim), None)
            }
        };
        let (leading, _) = output_subspace(wm, &c, max_rank, w.name())?;
        Ok(Directions {
            q: leading.vectors,
            weight: w.data().to_vec(),
            bias: bias.to_vec(),
            mean,
        })
    })
}

impl Directions {
    /// The ranks available: `1..=max_rank()`.
    pub fn max_rank(&self) -> usize {
        self.q.ncols()
    }

    /// The best rank-`rank` weight `Q_r·Q_rᵀ·W` (row-major `[out, in]`) and its bias (refitted
    /// to the mean residual when data-aware). `rank` is clamped to `1..=max_rank()`.
    pub fn truncated(&self, rank: usize) -> (Vec<f64>, Vec<f64>) {
        let (out_dim, rank) = (self.q.nrows(), rank.clamp(1, self.max_rank()));
        let in_dim = self.weight.len() / out_dim.max(1);
        let wm = MatRef::from_row_major_slice(&self.weight, out_dim, in_dim);
        let q = self.q.as_ref().subcols(0, rank);
        let wr = q * (q.transpose() * wm);
        let weight = (0..out_dim)
            .flat_map(|o| (0..in_dim).map(move |i| (o, i)))
            .map(|(o, i)| wr[(o, i)])
            .collect();
        let bias = match &self.mean {
            Some(mean) => {
                let mu = MatRef::from_column_major_slice(mean, in_dim, 1);
                let shift = (wm - &wr) * mu;
                (0..out_dim).map(|o| self.bias[o] + shift[(o, 0)]).collect()
            }
            None => self.bias.clone(),
        };
        (weight, bias)
    }
}

/// Below this fraction of the energy it is taken from, a difference of energies has lost too
/// many digits to cancellation: the error is then computed from the residual itself.
const CANCELLATION: f64 = 1e-6;

/// Output energies on the calibration rows, mean removed: `tr(W·C·Wᵀ)` of the layer and
/// `tr(Δ·C·Δᵀ)` of the pair's error `Δ = W − BA` (the bias refit removes the mean error).
pub(crate) struct Energies {
    pub output: f64,
    pub error: f64,
}

impl Energies {
    /// The nmse over all `rows × out` output elements: the error energy over the variance of
    /// `X·Wᵀ + b`, whose energy is `tr(W·C·Wᵀ) + N·Σ_o (w_o·μ + b_o − m)²`, `m` the mean of the
    /// per-output means; `w_mu` is `W·μ`.
    pub(crate) fn nmse(&self, w_mu: &[f64], bias: &[f64], rows: usize) -> f64 {
        let out_dim = w_mu.len();
        let per_output: Vec<f64> = w_mu.iter().zip(bias).map(|(c, b)| c + b).collect();
        let m = per_output.iter().sum::<f64>() / out_dim as f64;
        let n = rows as f64;
        let spread = per_output.iter().map(|v| (v - m).powi(2)).sum::<f64>();
        let cells = n * out_dim as f64;
        let var = (self.output + n * spread) / cells;
        let err = self.error / cells;
        if var > 0.0 {
            err / var
        } else {
            err
        }
    }
}

/// The exact fit `B·A = Q·Qᵀ·W` (`Q` the leading left singular subspace of `W·C_r^{1/2}`), its
/// weight error, and its energies under the ridge-free `c` (left as it was given).
///
/// With `R = Wᵀ·Q`: `‖W − BA‖² = ‖W‖² − ‖R‖²` and `tr(Δ·C·Δᵀ) = tr(W·C·Wᵀ) − tr(Rᵀ·C·R)` (`I −
/// QQᵀ` is a projector). Both traces come with the Gram matrix the subspace was found in:
/// `tr(W·C·Wᵀ) = tr(W·C_r·Wᵀ) − ρ‖W‖²`, and `tr(Rᵀ·C·R) = Σθ − ρ‖R‖²` with `Σθ = tr(Qᵀ·W·C_r·Wᵀ·Q)`
/// the eigenvalues the solver found. None of them needs another product with `C` unless the
/// error is too small a fraction of its energy for the difference (see [`CANCELLATION`]).
fn exact(
    w: &WeightMatrix<'_>,
    c: &mut Mat<f64>,
    rho: f64,
    rank: usize,
) -> Result<(LowRank, Energies), FactorizeError> {
    let (out_dim, in_dim) = (w.out_dim(), w.in_dim());
    let wm = MatRef::from_row_major_slice(w.data(), out_dim, in_dim);
    // `C_r = C + ρI` in place of `C` while the subspace is found, then `C` again exactly
    // (from its saved diagonal, not by subtracting): one `in × in` copy fewer.
    let diagonal: Vec<f64> = (0..in_dim).map(|i| c[(i, i)]).collect();
    for i in 0..in_dim {
        c[(i, i)] += rho;
    }
    let subspace = output_subspace(wm, c, rank, w.name());
    for (i, d) in diagonal.into_iter().enumerate() {
        c[(i, i)] = d;
    }
    let (leading, energy_r) = subspace?;
    let c = &*c;
    let q = leading.vectors;
    let r = wm.transpose() * &q;
    let mut factors = split_factors(q.as_ref(), r.as_ref(), true).into_low_rank(
        out_dim,
        in_dim,
        0.0,
        leading.iterations,
    );
    let (w2, r2) = (w.squared_norm(), r.squared_norm_l2());
    factors.relative_error = if w2 - r2 > CANCELLATION * w2 {
        ((w2 - r2) / w2).sqrt()
    } else {
        super::relative_error(w, &factors.second, &factors.first, rank)
    };
    let output = (energy_r - rho * w2).max(0.0);
    let captured = leading.captured - rho * r2;
    let error = if output - captured > CANCELLATION * output {
        output - captured
    } else {
        quad(difference(wm, &factors).as_ref(), c)
    };
    Ok((factors, Energies { output, error }))
}

/// An orthonormal basis (`out × rank`) of the leading left singular subspace of `W·C^{1/2}`,
/// with the subspace iterations used and its captured energy `tr(Qᵀ·W·C·Wᵀ·Q)`, and
/// `tr(W·C·Wᵀ)`. With `out <= in` it comes from `W·C·Wᵀ` (`out × out`); otherwise from the
/// smaller `Fᵀ·Wᵀ·W·F` (`in × in`, the same nonzero eigenvalues) for any `F` with `F·Fᵀ = C` —
/// the Cholesky factor, or the square root when `C` is singular: `W·F` has the same left
/// singular subspace as `W·C^{1/2}` — mapped back by `W·F` and a QR. The iteration settles
/// to `SubspaceParams::calibrated_tolerance`.
fn output_subspace(
    wm: MatRef<'_, f64>,
    c: &Mat<f64>,
    rank: usize,
    layer: &str,
) -> Result<(Leading<f64>, f64), FactorizeError> {
    let (out_dim, in_dim) = (wm.nrows(), wm.ncols());
    let no_convergence = || FactorizeError::NoConvergence {
        layer: layer.to_string(),
        routine: "symmetric eigensolver",
    };
    if out_dim <= in_dim {
        let g = symmetric_product((wm * c).as_ref(), wm.transpose());
        let energy = trace(&g);
        return Ok((
            top_eigenvectors(g, rank, layer, SUBSPACE.calibrated_tolerance)?,
            energy,
        ));
    }
    let factor = match c.llt(Side::Lower) {
        Ok(llt) => llt.L().to_owned(),
        Err(_) => {
            let evd = c
                .self_adjoint_eigen(Side::Lower)
                .map_err(|_| no_convergence())?;
            let (v, lambda) = (evd.U(), evd.S().column_vector());
            let scaled =
                Mat::<f64>::from_fn(in_dim, in_dim, |i, j| v[(i, j)] * lambda[j].max(0.0).sqrt());
            &scaled * v.transpose()
        }
    };
    let ws = wm * &factor;
    let h = gram(ws.transpose());
    let energy = trace(&h);
    let leading = top_eigenvectors(h, rank, layer, SUBSPACE.calibrated_tolerance)?;
    let vectors = (&ws * &leading.vectors).qr().compute_thin_Q();
    Ok((Leading { vectors, ..leading }, energy))
}

fn trace(g: &Mat<f64>) -> f64 {
    (0..g.nrows()).map(|i| g[(i, i)]).sum()
}

/// `W − BA`.
fn difference(wm: MatRef<'_, f64>, factors: &LowRank) -> Mat<f64> {
    let (out_dim, in_dim, rank) = (wm.nrows(), wm.ncols(), factors.rank);
    let a = MatRef::from_row_major_slice(&factors.first, rank, in_dim);
    let b = MatRef::from_row_major_slice(&factors.second, out_dim, rank);
    wm - b * a
}

/// The refitted bias of the pair, `b′ = b + (W − BA)·μ` (the mean residual on the rows), from
/// `W·μ` and `BA·μ`.
fn refitted_bias(bias: &[f64], w_mu: &[f64], ba_mu: &[f64]) -> Vec<f64> {
    bias.iter()
        .zip(w_mu.iter().zip(ba_mu))
        .map(|(b, (w, l))| b + (w - l))
        .collect()
}

/// `W·μ` and `BA·μ` on the host.
fn mean_images(wm: MatRef<'_, f64>, factors: &LowRank, mean: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (out_dim, in_dim, rank) = (wm.nrows(), wm.ncols(), factors.rank);
    let a = MatRef::from_row_major_slice(&factors.first, rank, in_dim);
    let b = MatRef::from_row_major_slice(&factors.second, out_dim, rank);
    let mu = MatRef::from_column_major_slice(mean, in_dim, 1);
    let (w_mu, ba_mu) = (wm * mu, b * (a * mu));
    let column = |m: &Mat<f64>| (0..out_dim).map(|o| m[(o, 0)]).collect();
    (column(&w_mu), column(&ba_mu))
}

/// `tr(M·C·Mᵀ)`.
fn quad(m: MatRef<'_, f64>, c: &Mat<f64>) -> f64 {
    let mc = m * c;
    let mut sum = 0.0;
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            sum += mc[(i, j)] * m[(i, j)];
        }
    }
    sum
}

/// [`fit_linear`] on the backend asked for, by the engines' one dispatch policy (see
/// [`super::solve`]): the exact fit runs on the GPU under `Backend::Cuda`, or under
/// `Backend::Auto` when one is usable (redone on the CPU, with a note, when it runs out of
/// memory); ALS always runs on the CPU.
pub fn solve(
    w: &WeightMatrix<'_>,
    bias: &[f64],
    x: &Calibration<'_>,
    rank: usize,
    fit: Fit,
    backend: Backend,
) -> Result<Solved<CalibratedFit>, FactorizeError> {
    let start = Instant::now();
    let cpu = || fit_linear(w, bias, x, rank, fit);
    // ALS has no GPU route.
    if let Fit::Exact { ridge } = fit {
        #[cfg(feature = "cuda-engine")]
        if route(w.name(), backend)? == Route::Gpu {
            check_inputs(w, bias, x, rank)?;
            let outcome = super::cuda::calibrated(w, x.data, x.rows, ridge, rank)
                .map(|done| from_gpu(done, w, bias, x));
            return settle(w.name(), backend, outcome, start.elapsed(), cpu);
        }
        #[cfg(not(feature = "cuda-engine"))]
        {
            // Without the engine the route is the CPU, or an error under `Backend::Cuda`.
            let _ = ridge;
            route(w.name(), backend)?;
        }
    }
    on_cpu(start, None, cpu)
}

/// The GPU's fit as the CPU's fit reports it.
#[cfg(feature = "cuda-engine")]
fn from_gpu(
    done: super::cuda::CalibratedOnGpu,
    w: &WeightMatrix<'_>,
    bias: &[f64],
    x: &Calibration<'_>,
) -> CalibratedFit {
    let energies = Energies {
        output: done.output_energy,
        error: done.error_energy,
    };
    CalibratedFit {
        bias: refitted_bias(bias, &done.w_mu, &done.ba_mu),
        nmse: energies.nmse(&done.w_mu, bias, x.rows),
        factors: done.factors,
        ridge: done.ridge,
        rank_deficient: x.rows <= w.in_dim(),
    }
}

/// Composer-style alternating least squares in covariance form, from the weight-space SVD.
fn als(
    w: &WeightMatrix<'_>,
    c: &Mat<f64>,
    rank: usize,
    iterations: usize,
    scale: f64,
) -> Result<LowRank, FactorizeError> {
    let (out_dim, in_dim) = (w.out_dim(), w.in_dim());
    let start = low_rank(w, rank, Precision::F64)?;
    let wm = MatRef::from_row_major_slice(w.data(), out_dim, in_dim);
    let mut a = MatRef::from_row_major_slice(&start.first, rank, in_dim).to_owned();
    let mut b = MatRef::from_row_major_slice(&start.second, out_dim, rank).to_owned();
    // A tiny ridge keeps the small normal equations solvable.
    let eps = 1e-10 * scale.max(f64::MIN_POSITIVE);
    let solve = |lhs: Mat<f64>, rhs: Mat<f64>| -> Result<Mat<f64>, FactorizeError> {
        let mut lhs = lhs;
        let n = lhs.nrows();
        let diag = (0..n).map(|i| lhs[(i, i)].abs()).fold(0.0, f64::max);
        for i in 0..n {
            lhs[(i, i)] += eps + 1e-12 * diag;
        }
        let llt = lhs
            .llt(Side::Lower)
            .map_err(|_| FactorizeError::NoConvergence {
                layer: w.name().to_string(),
                routine: "least-squares solve",
            })?;
        Ok(llt.solve(rhs))
    };
    for _ in 0..iterations {
        // B-step: min over B of tr((W − BA)·C·(W − BA)ᵀ): B = W·C·Aᵀ·(A·C·Aᵀ)⁻¹.
        let ca = c * a.transpose();
        let lhs = &a * &ca;
        let rhs = (wm * &ca).transpose().to_owned();
        b = solve(lhs, rhs)?.transpose().to_owned();
        // A-step: Bᵀ(W − BA)C = 0 holds for A = (BᵀB)⁻¹·Bᵀ·W.
        let lhs = b.transpose() * &b;
        let rhs = b.transpose() * wm;
        a = solve(lhs, rhs)?;
    }
    let first: Vec<f64> = (0..rank)
        .flat_map(|i| (0..in_dim).map(move |j| (i, j)))
        .map(|(i, j)| a[(i, j)])
        .collect();
    let second: Vec<f64> = (0..out_dim)
        .flat_map(|i| (0..rank).map(move |j| (i, j)))
        .map(|(i, j)| b[(i, j)])
        .collect();
    Ok(LowRank {
        out_dim,
        in_dim,
        rank,
        first,
        second,
        singular_values: start.singular_values,
        relative_error: 0.0,
        iterations,
    })
}

/// Output nmse of the pair on rows `x`: the mean squared difference between `X·Wᵀ + b` and
/// `X·(BA)ᵀ + b′` over all output elements, divided by the population variance of all elements
/// of `X·Wᵀ + b`. (Composer's figure uses the sample variance and counts the original bias as
/// error; see the README.)
pub fn nmse(
    w: &WeightMatrix<'_>,
    bias: &[f64],
    factors: &LowRank,
    new_bias: &[f64],
    x: &Calibration<'_>,
) -> Result<f64, FactorizeError> {
    let (out_dim, in_dim, rank) = (w.out_dim(), w.in_dim(), factors.rank);
    if x.cols != in_dim || bias.len() != out_dim || new_bias.len() != out_dim {
        return Err(FactorizeError::Shape {
            layer: w.name().to_string(),
            tensor: "calibration input",
            expected: x.rows * in_dim,
            actual: x.data.len(),
            shape: format!("[{}, {in_dim}]", x.rows),
        });
    }
    let xm = x.matrix();
    let wm = MatRef::from_row_major_slice(w.data(), out_dim, in_dim);
    let a = MatRef::from_row_major_slice(&factors.first, rank, in_dim);
    let b = MatRef::from_row_major_slice(&factors.second, out_dim, rank);
    let y = xm * wm.transpose();
    let approx = (xm * a.transpose()) * b.transpose();
    let n = (x.rows * out_dim) as f64;
    let original = |i: usize, o: usize| y[(i, o)] + bias[o];
    let cells = || (0..out_dim).flat_map(|o| (0..x.rows).map(move |i| (i, o)));
    let mean = cells().map(|(i, o)| original(i, o)).sum::<f64>() / n;
    let var = cells()
        .map(|(i, o)| (original(i, o) - mean).powi(2))
        .sum::<f64>()
        / n;
    let err = cells()
        .map(|(i, o)| (original(i, o) - approx[(i, o)] - new_bias[o]).powi(2))
        .sum::<f64>()
        / n;
    Ok(if var > 0.0 { err / var } else { err })
}
