//! Forward time on the CPU: dfdx `Linear<W, W>` vs `FactorizedLinear<W, W/8, W>`.
//!
//! The multiply-add ratio is `W² / (2·W·W/8) = 4`; the goal is a time ratio of at least
//! 0.8 × 4 at batch >= 256. Report: `cargo bench -p factorize-runtime --bench forward`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dfdx::prelude::*;
use factorize_runtime::FactorizedLinear;

fn pair<const W: usize, const L: usize>(c: &mut Criterion) {
    let dev = Cpu::seed_from_u64(0);
    let dense = dev.build_module::<dfdx::nn::builders::Linear<W, W>, f32>();
    let fact = FactorizedLinear::<W, L, W, f32, Cpu>::build(&dev);
    let mut g = c.benchmark_group(format!("forward/{W}/rank{L}"));
    g.sample_size(10);
    for batch in [1usize, 64, 1024] {
        let x: Tensor<(usize, Const<W>), f32, Cpu> = dev.sample_normal_like(&(batch, Const));
        g.bench_function(BenchmarkId::new("dense", batch), |b| {
            b.iter(|| dense.forward(x.clone()))
        });
        g.bench_function(BenchmarkId::new("factorized", batch), |b| {
            b.iter(|| fact.forward(x.clone()))
        });
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    pair::<1024, 128>(c);
    pair::<4096, 512>(c);
}

criterion_group!(benches, bench);
criterion_main!(benches);
