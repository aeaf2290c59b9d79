//! The weight-space pipeline: `G = M·Mᵀ`, its leading eigenvectors, `R = Mᵀ·Q`, the residual
//! and the balanced split, on the device; the host receives only the factors.

use cudarc::driver::CudaSlice;

use super::blas::{Mat, Operand};
use super::{Gpu, GpuError, Trace};
use crate::engine::params::SUBSPACE;
use crate::engine::{LowRank, WeightMatrix};

impl Gpu {
    pub(super) fn low_rank(&self, w: &WeightMatrix<'_>, rank: usize) -> Result<LowRank, GpuError> {
        let mut trace = Trace::start();
        let a = self.upload(w.data())?;
        trace.mark(&self.stream, "upload");
        self.low_rank_uploaded(a, w, rank)
    }

    /// [`Self::low_rank`] of `w` given its values `a` on the device (overwritten).
    pub(super) fn low_rank_uploaded(
        &self,
        mut a: CudaSlice<f64>,
        w: &WeightMatrix<'_>,
        rank: usize,
    ) -> Result<LowRank, GpuError> {
        let (out_dim, in_dim) = (w.out_dim(), w.in_dim());
        let mut trace = Trace::start();
        // Row-major W [out, in] is the column-major A = Wᵀ (in × out). M is the wider way up
        // (`s × t`, `s ≤ t`): W = Aᵀ when wide, else Wᵀ = A.
        let wide = out_dim <= in_dim;
        let (s, t) = if wide {
            (out_dim, in_dim)
        } else {
            (in_dim, out_dim)
        };
        let norm = self.norm(&a)?;
        let m = as_m(&a, (in_dim, out_dim), wide);
        let g = self.product(1.0, m, m.t())?;
        trace.mark(&self.stream, "gram");
        let (q_values, iterations) = self.top_eigenvectors(&g, s, rank, SUBSPACE.tolerance)?;
        trace.mark(&self.stream, "eigenvectors");
        drop(g);
        let q = Mat::new(&q_values, (s, rank));
        // R = Mᵀ·Q (t × rank).
        let r_values = self.product(1.0, as_m(&a, (in_dim, out_dim), wide).t(), q)?;
        let r = Mat::new(&r_values, (t, rank));
        // Residual, in A's layout: A − (Q·Rᵀ)ᵀ = A − R·Qᵀ (wide) or A − Q·Rᵀ (tall).
        if wide {
            self.product_into(-1.0, r, q.t(), 1.0, &mut a)?;
        } else {
            self.product_into(-1.0, q, r.t(), 1.0, &mut a)?;
        }
        let residual = self.norm(&a)?;
        trace.mark(&self.stream, "residual");
        let out = self.split(
            &q_values,
            &r_values,
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
    pub(super) fn split(
        &self,
        q: &CudaSlice<f64>,
        r: &CudaSlice<f64>,
        (s, t, rank): (usize, usize, usize),
        wide: bool,
        relative_error: f64,
        iterations: usize,
    ) -> Result<LowRank, GpuError> {
        // σ_i² is the diagonal of RᵀR.
        let r_mat = Mat::new(r, (t, rank));
        let rtr = self.product(1.0, r_mat.t(), r_mat)?;
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
}

/// `M` (`s × t`, the wider way up) on the values of `A = Wᵀ` (`in × out`): `Aᵀ` when wide.
fn as_m(a: &CudaSlice<f64>, (in_dim, out_dim): (usize, usize), wide: bool) -> Operand<'_> {
    let stored = Mat::new(a, (in_dim, out_dim));
    if wide {
        stored.t()
    } else {
        stored.into()
    }
}

pub(super) fn relative_error_of(residual: f64, norm: f64) -> f64 {
    if norm > 0.0 {
        residual / norm
    } else {
        0.0
    }
}
