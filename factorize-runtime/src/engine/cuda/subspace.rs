//! The leading eigenvectors of a Gram matrix on the device: Chebyshev-filtered subspace
//! iteration with Rayleigh–Ritz checks placed by the observed convergence rate, or the dense
//! `syevd`.

use std::cell::Ref;

use cudarc::driver::CudaSlice;

use super::blas::Mat;
use super::{Gpu, GpuError, Trace};
use crate::engine::filter::Chebyshev;
use crate::engine::gaussian::Gaussian;
use crate::engine::params::SUBSPACE;

/// Products with `G` between the first Rayleigh–Ritz checks of the GPU iteration.
pub(super) const CHECK_SPACING: usize = 3;

/// Whether the top-`rank` Ritz energy has settled, given its gains between checks: the last
/// gain is below `threshold`, or (when the gains shrink at least twofold) the energy still
/// missing, extrapolated geometrically from the last two, is.
pub(super) fn settled(gains: &[f64], threshold: f64) -> bool {
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
pub(super) fn products_to_settle(gains: &[f64], threshold: f64) -> Option<usize> {
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
pub(super) const FILTER_LIMIT: f64 = 1e6;

impl Gpu {
    /// The fixed random-sign start block `s × b` (see `SubspaceParams::seed`), uploaded once per size.
    pub(super) fn start_block(
        &self,
        s: usize,
        b: usize,
    ) -> Result<Ref<'_, CudaSlice<f64>>, GpuError> {
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
    pub(super) fn top_eigenvectors(
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

    /// Chebyshev-filtered subspace iteration (see `filter`); `None` when it did not settle
    /// within `SubspaceParams::max_iterations` products with `g` or the block lost its rank.
    ///
    /// A Rayleigh–Ritz step costs a `b × b` `syevd` (about three filtered steps on an H100), so
    /// it is not done every step: first after three products (its Ritz values place the filter),
    /// then every `CHECK_SPACING` products, and once two gains of the top-`rank` Ritz energy
    /// are known, after as many products as their ratio predicts are needed. It stops when the
    /// last gain, or the energy still missing by geometric extrapolation of the last two gains,
    /// is below `tolerance` of the residual energy (see `settled`).
    pub(super) fn subspace_iteration(
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
        let gram = Mat::new(g, (s, s));
        let mut q = {
            let omega = self.start_block(s, b)?;
            self.product(1.0, gram, Mat::new(&omega, (s, b)))?
        };
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
            // needs a well-conditioned basis (a pass of Cholesky-QR saved).
            let passes = if products + 1 >= next_check { 2 } else { 1 };
            if !self.cholesky_qr(&mut q, s, b, passes)? {
                return Ok(None);
            }
            self.product_into(1.0, gram, Mat::new(&q, (s, b)), 0.0, &mut z)?;
            products += 1;
            if products >= next_check {
                timing.mark(&self.stream, format_args!("{products} products"));
                // With the vectors: they cost less than a second `syevd` on the check that
                // settles.
                let (block, image) = (Mat::new(&q, (s, b)), Mat::new(&z, (s, b)));
                self.product_into(1.0, block.t(), image, 0.0, &mut h)?;
                let theta = self.syevd(&mut h, b, true)?;
                timing.mark(&self.stream, "rayleigh-ritz");
                let energy: f64 = theta[b - rank..].iter().sum();
                let tail = (trace - energy).max(floor);
                if let Some(p) = previous {
                    gains.push(energy - p);
                }
                if settled(&gains, tolerance * tail) {
                    let y = self.leading_columns(&h, b, b, rank)?;
                    let ritz = self.product(1.0, Mat::new(&q, (s, b)), Mat::new(&y, (b, rank)))?;
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
    pub(super) fn chebyshev_block(
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
            let gram = Mat::new(g, (s, s));
            self.product_into(2.0 / e, gram, Mat::new(&current, (s, b)), 1.0, &mut next)?;
            (previous, current, next) = (current, next, previous);
        }
        Ok([current, previous, next])
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
