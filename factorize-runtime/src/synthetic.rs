//! Weight matrices with a prescribed spectrum, for demos, tests and benchmarks.
//!
//! `W = U·diag(σ)·Vᵀ` with `U`, `V` Haar-like random orthonormal bases (QR of a Gaussian block,
//! from a fixed seed), so the Eckart–Young optimum of every rank is known exactly.
//! Trained layers have power-law singular values (`σ_i ∝ (i+1)^(−α)`, α ≈ 0.3–1); Gaussian
//! initialisations have a flat one.
//!
//! ```
//! use factorize_runtime::synthetic::{matrix_with_spectrum, power_law, optimal_relative_error};
//! let sigma = power_law(64, 1.0);
//! let w = matrix_with_spectrum(64, 96, &sigma, 1);
//! assert_eq!(w.len(), 64 * 96);
//! let norm: f64 = w.iter().map(|x| x * x).sum::<f64>().sqrt();
//! let expected: f64 = sigma.iter().map(|s| s * s).sum::<f64>().sqrt();
//! assert!((norm - expected).abs() < 1e-9 * expected);
//! assert!(optimal_relative_error(&sigma, 64) == 0.0);
//! ```

use faer::Mat;

use crate::engine::Gaussian;

/// `count` singular values `(i+1)^(−alpha)`, nonincreasing.
pub fn power_law(count: usize, alpha: f64) -> Vec<f64> {
    (0..count).map(|i| ((i + 1) as f64).powf(-alpha)).collect()
}

/// The Eckart–Young optimum of rank `rank`: `sqrt(Σ_{i>rank} σ_i²) / sqrt(Σ σ_i²)`, for
/// `sigma` sorted in nonincreasing order.
pub fn optimal_relative_error(sigma: &[f64], rank: usize) -> f64 {
    let total: f64 = sigma.iter().map(|s| s * s).sum();
    let tail: f64 = sigma.iter().skip(rank).map(|s| s * s).sum();
    if total == 0.0 {
        0.0
    } else {
        (tail / total).sqrt()
    }
}

/// A row-major `[out_dim, in_dim]` matrix with singular values `sigma` (at most
/// `min(out_dim, in_dim)` of them; missing ones are zero), reproducible from `seed`.
pub fn matrix_with_spectrum(out_dim: usize, in_dim: usize, sigma: &[f64], seed: u64) -> Vec<f64> {
    let k = sigma.len().min(out_dim).min(in_dim);
    let mut rng = Gaussian::new(seed);
    let mut basis = |n: usize| {
        let g = Mat::<f64>::from_fn(n, k, |_, _| rng.sample());
        g.qr().compute_thin_Q()
    };
    let u = basis(out_dim);
    let v = basis(in_dim);
    let us = Mat::<f64>::from_fn(out_dim, k, |i, j| u[(i, j)] * sigma[j]);
    let w = us * v.transpose();
    let mut data = Vec::with_capacity(out_dim * in_dim);
    for i in 0..out_dim {
        for j in 0..in_dim {
            data.push(w[(i, j)]);
        }
    }
    data
}
