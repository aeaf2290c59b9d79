//! The exact data-aware fit on the device, step for step the CPU fit of
//! `engine/calibrated.rs`.

use super::blas::*;
use super::{gpu, Gpu, GpuError, Trace};
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
