//! The dense path's eigensolver against faer's, on the job the dense path does: the top-`k`
//! eigenpairs of a Gram matrix `G = W·Wᵀ` (power-law spectrum, as trained weights have).
//!
//! After faer's tridiagonalisation `G = H·T·Hᵀ` (shared, not timed):
//! - `ours`: `engine/tridiagonal.rs`, only the `k` wanted pairs of `T`;
//! - `faer_dc`: faer's `tridiagonal_self_adjoint_evd`, divide and conquer, all `n` pairs (what
//!   the dense path falls back to).
//!
//! And on `G` itself, faer's Krylov–Schur `partial_self_adjoint_eigen` (`faer_partial`,
//! tolerance 1e-10), which would replace tridiagonalisation and solver together: compare it
//! with `ours` plus the tridiagonalisation (`faer_tridiagonalize`).
//! Report: `cargo bench -p factorize-runtime --bench eigen`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use factorize_runtime::engine::__tridiagonal_leading_eigenvectors as ours;
use factorize_runtime::synthetic::{matrix_with_spectrum, power_law};
use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::evd::{self, tridiag, ComputeEigenvectors};
use faer::linalg::qr::no_pivoting::factor::recommended_block_size;
use faer::matrix_free::eigen::{
    partial_self_adjoint_eigen, partial_self_adjoint_eigen_scratch, PartialEigenParams,
};
use faer::{Col, Mat, Par};

/// The Gram matrix of a `side × 4·side` weight with a power-law spectrum.
fn gram(side: usize) -> Mat<f64> {
    let w = matrix_with_spectrum(side, 4 * side, &power_law(side, 0.6), 1);
    let wm = Mat::<f64>::from_fn(side, 4 * side, |i, j| w[i * 4 * side + j]);
    &wm * wm.transpose()
}

/// `T`'s diagonal and subdiagonal, by faer's tridiagonalisation of `g`.
fn tridiagonalize(g: &Mat<f64>) -> (Vec<f64>, Vec<f64>) {
    let s = g.nrows();
    let mut t = g.clone();
    let block = recommended_block_size::<f64>(s, s);
    let mut householder = Mat::<f64>::zeros(block, s - 1);
    let mut memory = MemBuffer::new(tridiag::tridiag_in_place_scratch::<f64>(
        s,
        Par::Seq,
        Default::default(),
    ));
    tridiag::tridiag_in_place(
        t.as_mut(),
        householder.as_mut(),
        Par::Seq,
        MemStack::new(&mut memory),
        Default::default(),
    );
    let d = (0..s).map(|i| t[(i, i)]).collect();
    let e = (0..s - 1).map(|i| t[(i + 1, i)]).collect();
    (d, e)
}

/// All eigenpairs of `T` by faer's divide and conquer.
fn faer_dc(d: &[f64], e: &[f64]) -> (Col<f64>, Mat<f64>) {
    let s = d.len();
    let par = faer::get_global_parallelism();
    let mut memory = MemBuffer::new(StackReq::any_of(&[evd::self_adjoint_evd_scratch::<f64>(
        s,
        ComputeEigenvectors::Yes,
        par,
        Default::default(),
    )]));
    let d = Col::<f64>::from_fn(s, |i| d[i]);
    let e = Col::<f64>::from_fn(s, |i| e.get(i).copied().unwrap_or(0.0));
    let mut values = Col::<f64>::zeros(s);
    let mut vectors = Mat::<f64>::zeros(s, s);
    evd::tridiagonal_self_adjoint_evd(
        d.as_diagonal(),
        e.as_diagonal(),
        values.as_diagonal_mut(),
        Some(vectors.as_mut()),
        par,
        MemStack::new(&mut memory),
        Default::default(),
    )
    .unwrap();
    (values, vectors)
}

/// The top `k` eigenpairs of `g` by faer's Krylov–Schur.
fn faer_partial(g: &Mat<f64>, k: usize) -> (Vec<f64>, Mat<f64>) {
    let s = g.nrows();
    let params = PartialEigenParams::default();
    let par = faer::get_global_parallelism();
    let mut memory = MemBuffer::new(partial_self_adjoint_eigen_scratch(g, k, par, params));
    let mut q = Mat::<f64>::zeros(s, k);
    let mut values = vec![0.0f64; k];
    let v0 = Col::<f64>::from_fn(s, |i| 1.0 + (i % 7) as f64);
    partial_self_adjoint_eigen(
        q.as_mut(),
        &mut values,
        g,
        v0.as_ref(),
        1e-10,
        par,
        MemStack::new(&mut memory),
        params,
    );
    (values, q)
}

fn bench(c: &mut Criterion) {
    for (side, k) in [(384usize, 32usize), (384, 128), (1024, 128), (1024, 256)] {
        let g = gram(side);
        let (d, e) = tridiagonalize(&g);
        // The same job: all three give the same top-k eigenvalue sum.
        let (_, values) = ours(&d, &e, k).expect("ours vouches for a power-law Gram matrix");
        let (all, _) = faer_dc(&d, &e);
        let reference: f64 = (side - k..side).map(|i| all[i]).sum();
        let (partial, _) = faer_partial(&g, k);
        for (name, sum) in [
            ("ours", values.iter().sum::<f64>()),
            ("partial", partial.iter().sum()),
        ] {
            assert!(
                (sum / reference - 1.0).abs() < 1e-9,
                "{name}: {sum} vs {reference}"
            );
        }
        let mut group = c.benchmark_group(format!("leading/{side}/k{k}"));
        group.sample_size(10);
        group.bench_function(BenchmarkId::new("ours", "tridiagonal"), |b| {
            b.iter(|| ours(&d, &e, k).unwrap())
        });
        group.bench_function(BenchmarkId::new("faer_dc", "tridiagonal"), |b| {
            b.iter(|| faer_dc(&d, &e))
        });
        group.bench_function(BenchmarkId::new("faer_tridiagonalize", "gram"), |b| {
            b.iter(|| tridiagonalize(&g))
        });
        group.bench_function(BenchmarkId::new("faer_partial", "gram"), |b| {
            b.iter(|| faer_partial(&g, k))
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
