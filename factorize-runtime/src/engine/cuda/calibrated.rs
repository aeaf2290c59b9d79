//! The exact data-aware fit on the device, step for step the CPU fit of
//! `engine/calibrated.rs`.

use cudarc::driver::CudaSlice;

use super::blas::Mat;
use super::{gpu, Gpu, GpuError, Trace};
use crate::engine::params::SUBSPACE;
use crate::engine::{LowRank, WeightMatrix};

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
        let wt_values = self.upload(w.data())?;
        let wt = Mat::new(&wt_values, (in_dim, out_dim));
        let (mu_values, c_values) = self.mean_and_scatter(x, (rows, in_dim), &mut trace)?;
        let mu = Mat::new(&mu_values, (in_dim, 1));
        let c = Mat::new(&c_values, (in_dim, in_dim));
        trace.mark(&self.stream, "second moment");
        let rho = ridge * self.gram_trace(&c_values, in_dim)? / in_dim as f64;
        // tr(W·C₀·Wᵀ) = Σ (WᵀW) ∘ C₀.
        let output_energy = self.dot(&self.product(1.0, wt, wt.t())?, &c_values)?;
        let mut cr_values = self.stream.clone_dtod(&c_values)?;
        self.add_to_diagonal(&mut cr_values, in_dim, rho)?;
        let cr = Mat::new(&cr_values, (in_dim, in_dim));
        let (q_values, iterations) = if out_dim <= in_dim {
            self.output_basis_by_gram(wt, cr, (out_dim, in_dim, rank), &mut trace)?
        } else {
            self.output_basis_by_root(wt, &cr_values, (out_dim, in_dim, rank))?
        };
        let q = Mat::new(&q_values, (out_dim, rank));
        trace.mark(&self.stream, "output subspace");
        // R = Wᵀ·Q; BA = Q·Qᵀ·W, so the error is tr(W·C₀·Wᵀ) − tr(Rᵀ·C₀·R).
        let r_values = self.product(1.0, wt, q)?;
        let r = Mat::new(&r_values, (in_dim, rank));
        let captured = self.dot(&r_values, &self.product(1.0, c, r)?)?;
        let (norm_w, norm_r) = (self.norm(&wt_values)?, self.norm(&r_values)?);
        let relative_error = if norm_w > 0.0 {
            (norm_w.powi(2) - norm_r.powi(2)).max(0.0).sqrt() / norm_w
        } else {
            0.0
        };
        // W·μ, and BA·μ = Q·(Rᵀ·μ).
        let w_mu = self.product(1.0, wt.t(), mu)?;
        let r_mu = self.product(1.0, r.t(), mu)?;
        let ba_mu = self.product(1.0, q, Mat::new(&r_mu, (rank, 1)))?;
        trace.mark(&self.stream, "energies");
        let factors = self.split(
            &q_values,
            &r_values,
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

    /// The mean row `μ = Xᵀ·1/N` (`in × 1`) and the scatter `C₀ = Xᵀ·X − N·μ·μᵀ` (`in × in`) of
    /// the row-major `rows × in` `x`, uploaded here and freed on return.
    fn mean_and_scatter(
        &self,
        x: &[f64],
        (rows, in_dim): (usize, usize),
        trace: &mut Trace,
    ) -> Result<(CudaSlice<f64>, CudaSlice<f64>), GpuError> {
        let xt_values = self.upload(x)?;
        trace.mark(&self.stream, "upload");
        let xt = Mat::new(&xt_values, (in_dim, rows));
        let ones = self.stream.clone_htod(&vec![1.0f64; rows])?;
        let mu = self.product(1.0 / rows as f64, xt, Mat::new(&ones, (rows, 1)))?;
        let mut c = self.product(1.0, xt, xt.t())?;
        let m = Mat::new(&mu, (in_dim, 1));
        self.product_into(-(rows as f64), m, m.t(), 1.0, &mut c)?;
        Ok((mu, c))
    }

    /// With `out <= in`: the leading eigenvectors of `W·C·Wᵀ` (`out × out`), `C` ridged.
    fn output_basis_by_gram(
        &self,
        wt: Mat<'_>,
        cr: Mat<'_>,
        (out_dim, in_dim, rank): (usize, usize, usize),
        trace: &mut Trace,
    ) -> Result<(CudaSlice<f64>, usize), GpuError> {
        let wc = self.product(1.0, wt.t(), cr)?;
        let g = self.product(1.0, Mat::new(&wc, (out_dim, in_dim)), wt)?;
        trace.mark(&self.stream, "output gram");
        self.top_eigenvectors(&g, out_dim, rank, SUBSPACE.calibrated_tolerance)
    }

    /// With `out > in`: through the smaller `C^{1/2}·Wᵀ·W·C^{1/2}` (`in × in`), mapped back by
    /// `W·C^{1/2}` and orthonormalised. `cr` is the ridged `C`.
    fn output_basis_by_root(
        &self,
        wt: Mat<'_>,
        cr: &CudaSlice<f64>,
        (out_dim, in_dim, rank): (usize, usize, usize),
    ) -> Result<(CudaSlice<f64>, usize), GpuError> {
        let mut v = self.stream.clone_dtod(cr)?;
        let lambda = self.syevd(&mut v, in_dim, true)?;
        let roots: Vec<f64> = lambda.iter().map(|l| l.max(0.0).sqrt()).collect();
        let roots = self.stream.clone_htod(&roots)?;
        let vs = self.dgmm(&v, in_dim, in_dim, &roots)?;
        let square = (in_dim, in_dim);
        let root = self.product(1.0, Mat::new(&vs, square), Mat::new(&v, square).t())?;
        let ws = self.product(1.0, wt.t(), Mat::new(&root, square))?;
        let ws = Mat::new(&ws, (out_dim, in_dim));
        let h = self.product(1.0, ws.t(), ws)?;
        let tolerance = SUBSPACE.calibrated_tolerance;
        let (y, iterations) = self.top_eigenvectors(&h, in_dim, rank, tolerance)?;
        let mut u = self.product(1.0, ws, Mat::new(&y, (in_dim, rank)))?;
        if !self.cholesky_qr2(&mut u, out_dim, rank)? {
            return Err(GpuError::Failed(
                "Cholesky-QR breakdown on the output basis".into(),
            ));
        }
        Ok((u, iterations))
    }
}
