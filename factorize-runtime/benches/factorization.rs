//! Factorization time: our truncated engine vs faer's full thin SVD, same matrix, same precision.
//!
//! Both sides get the same power-law (trained-like) and flat (Gaussian-like) spectra; the engine's
//! error equals the Eckart–Young optimum to 1e-4 (tests/runtime/engine.rs), so this compares time
//! at the same error. Report: `cargo bench -p factorize-runtime --bench factorization`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use factorize_runtime::engine::{low_rank, WeightMatrix};
use factorize_runtime::synthetic::{matrix_with_spectrum, power_law};
use factorize_runtime::Precision;

const RANK: usize = 128;

fn bench(c: &mut Criterion) {
    for (out_dim, in_dim) in [(1024usize, 1024usize), (4096, 1024)] {
        let n = out_dim.min(in_dim);
        for (spectrum, sigma) in [("power", power_law(n, 0.6)), ("flat", vec![1.0; n])] {
            let w = matrix_with_spectrum(out_dim, in_dim, &sigma, 1);
            let m = WeightMatrix::new("bench", &w, out_dim, in_dim).unwrap();
            let w32 = faer::Mat::<f32>::from_fn(out_dim, in_dim, |i, j| w[i * in_dim + j] as f32);
            let w64 = faer::Mat::<f64>::from_fn(out_dim, in_dim, |i, j| w[i * in_dim + j]);
            let mut g = c.benchmark_group(format!(
                "factorize/{out_dim}x{in_dim}/rank{RANK}/{spectrum}"
            ));
            g.sample_size(10);
            for p in [Precision::F32, Precision::F64] {
                g.bench_function(BenchmarkId::new("truncated", format!("{p:?}")), |b| {
                    b.iter(|| low_rank(&m, RANK, p).unwrap())
                });
            }
            g.bench_function(BenchmarkId::new("faer_thin_svd", "F32"), |b| {
                b.iter(|| w32.thin_svd().unwrap())
            });
            g.bench_function(BenchmarkId::new("faer_thin_svd", "F64"), |b| {
                b.iter(|| w64.thin_svd().unwrap())
            });
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
