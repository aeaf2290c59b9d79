//! Convolution speed on the CPU.
//!
//! - `conv_vs_matmul`: our `Conv2D` forward against the same multiply-adds as one dfdx matmul of
//!   a ready im2col matrix (goal: at most 1.5x the matmul's time), and as one faer GEMM (the
//!   library our kernel multiplies with, so the difference is the unfolding's own cost).
//! - `factorized_3x3`: a 3×3 conv 256 → 256 at 28×28, batch 8, against its factorized pair at
//!   latent 64 (multiply-add ratio 3.6; goal: at least 0.7 × that), forward and backward.
//!
//! `cargo bench -p factorize-runtime --bench conv`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dfdx::prelude::*;
use factorize_runtime::conv::Conv2D;
use factorize_runtime::FactorizedConv2D;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};

type Dev = Cpu;

fn conv_vs_matmul<const C: usize>(c: &mut Criterion) {
    let dev = Dev::seed_from_u64(0);
    let conv = Conv2D::<C, C, 3, 1, 1, 1, f32, Dev>::build(&dev);
    let x: Tensor<Rank4<16, C, 32, 32>, f32, Dev> = dev.sample_normal();
    let cols: Tensor<(usize, usize), f32, Dev> = dev.sample_normal_like(&(16 * 32 * 32, 9 * C));
    let w: Tensor<(usize, Const<C>), f32, Dev> = dev.sample_normal_like(&(9 * C, Const));
    let mut g = c.benchmark_group(format!("conv_vs_matmul/{C}ch/32x32/batch16"));
    g.sample_size(10);
    g.bench_function("conv2d", |b| b.iter(|| conv.forward(x.clone())));
    g.bench_function("im2col_matmul", |b| {
        b.iter(|| cols.clone().matmul(w.clone()))
    });
    let cols = Mat::<f32>::from_fn(9 * C, 16 * 32 * 32, |i, j| ((i * 7 + j) % 13) as f32);
    let w = Mat::<f32>::from_fn(C, 9 * C, |i, j| ((i + j * 3) % 11) as f32);
    g.bench_function("im2col_matmul_faer", |b| {
        b.iter(|| {
            let mut y = Mat::<f32>::zeros(C, 16 * 32 * 32);
            matmul(
                y.as_mut(),
                Accum::Replace,
                w.as_ref(),
                cols.as_ref(),
                1.0,
                Par::rayon(0),
            );
            y
        })
    });
    g.finish();
}

fn factorized_3x3(c: &mut Criterion) {
    let dev = Dev::seed_from_u64(0);
    let dense = Conv2D::<256, 256, 3, 1, 1, 1, f32, Dev>::build(&dev);
    let small = FactorizedConv2D::<256, 64, 256, 3, 1, 1, 1, f32, Dev>::build(&dev);
    let x: Tensor<Rank4<8, 256, 28, 28>, f32, Dev> = dev.sample_normal();
    let mut g = c.benchmark_group("factorized_3x3/256ch/28x28/batch8/latent64");
    g.sample_size(10);
    g.bench_function(BenchmarkId::new("forward", "dense"), |b| {
        b.iter(|| dense.forward(x.clone()))
    });
    g.bench_function(BenchmarkId::new("forward", "factorized"), |b| {
        b.iter(|| small.forward(x.clone()))
    });
    g.bench_function(BenchmarkId::new("backward", "dense"), |b| {
        b.iter(|| dense.forward(x.leaky_trace()).sum::<Rank0, _>().backward())
    });
    g.bench_function(BenchmarkId::new("backward", "factorized"), |b| {
        b.iter(|| small.forward(x.leaky_trace()).sum::<Rank0, _>().backward())
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    conv_vs_matmul::<64>(c);
    conv_vs_matmul::<256>(c);
    factorized_3x3(c);
}

criterion_group!(benches, bench);
criterion_main!(benches);
