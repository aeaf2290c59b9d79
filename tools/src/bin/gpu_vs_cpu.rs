//! CPU vs GPU factorization time and error, per matrix size and spectrum.
//!
//! `cargo run --release -p factorize-tools --features cuda --bin gpu_vs_cpu [-- --no-cpu]`
//! (on a machine without CUDA: build here, run there with `LD_LIBRARY_PATH` set to the CUDA
//! libraries, see the README).

use std::time::Instant;

use dfdx::nn::modules::Linear;
use dfdx::prelude::*;
use factorize_runtime::engine::calibrated::{self, Calibration};
use factorize_runtime::engine::{gpu_available, solve, solve_many, WeightMatrix};
use factorize_runtime::synthetic::{matrix_with_spectrum, power_law};
use factorize_runtime::Fit;
use factorize_runtime::{Backend, Factorizable, FactorizeConfig, Precision};

/// Eight 4096×4096 layers as a derived dfdx model: `factorize` reads each weight off its
/// tensor, factorizes it and builds the factorized layers, as a user's model goes.
#[derive(Factorizable)]
#[factorize(latent_features = 512)]
pub struct Eight<E: Dtype, D: Device<E>> {
    pub l0: Linear<4096, 4096, E, D>,
    pub l1: Linear<4096, 4096, E, D>,
    pub l2: Linear<4096, 4096, E, D>,
    pub l3: Linear<4096, 4096, E, D>,
    pub l4: Linear<4096, 4096, E, D>,
    pub l5: Linear<4096, 4096, E, D>,
    pub l6: Linear<4096, 4096, E, D>,
    pub l7: Linear<4096, 4096, E, D>,
}

fn main() {
    if let Err(reason) = gpu_available() {
        eprintln!("no usable GPU: {reason}");
        std::process::exit(1);
    }
    let with_cpu = !std::env::args().any(|a| a == "--no-cpu");
    let gpu = FactorizeConfig {
        backend: Backend::Cuda,
        progress: false,
        ..Default::default()
    };
    let cpu32 = FactorizeConfig {
        backend: Backend::Cpu,
        precision: Precision::F32,
        progress: false,
        ..Default::default()
    };
    let cpu64 = FactorizeConfig {
        precision: Precision::F64,
        ..cpu32
    };
    // Warm-up: context, handles, cuSOLVER's lazy initialisation.
    let w = matrix_with_spectrum(256, 256, &power_law(256, 0.5), 0);
    let m = WeightMatrix::new("warm", &w, 256, 256).unwrap();
    let t = Instant::now();
    solve(&m, 32, &gpu).unwrap();
    println!(
        "GPU first call (initialisation): {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    weight_space(&gpu, with_cpu.then_some((&cpu32, &cpu64)));
    data_aware(&gpu);
    let layers: Vec<Vec<f64>> = (0..8)
        .map(|k| matrix_with_spectrum(4096, 4096, &power_law(4096, 0.6), 10 + k))
        .collect();
    many_layers(&gpu, &layers);
    dfdx_model(&gpu, &layers);
}

/// A Gaussian random matrix (Marchenko–Pastur spectrum), by Box–Muller from a small LCG.
fn gaussian(len: usize) -> Vec<f64> {
    let mut rng_state = 7u64;
    let mut u = move || {
        rng_state = rng_state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((rng_state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..len)
        .map(|_| (-2.0 * u().ln()).sqrt() * (2.0 * std::f64::consts::PI * u()).cos())
        .collect()
}

/// Weight-space factorization time and error, GPU against the CPU's two precisions.
fn weight_space(gpu: &FactorizeConfig, cpu: Option<(&FactorizeConfig, &FactorizeConfig)>) {
    println!(
        "{:<10} {:<8} {:>5} {:>9} {:>10} {:>10} {:>11} {:>6}",
        "matrix", "spectrum", "rank", "gpu ms", "cpu f32 ms", "cpu f64 ms", "gpu excess", "iters"
    );
    for (o, i, rank) in [(1024, 1024, 128), (4096, 1024, 128), (4096, 4096, 512)] {
        let n = usize::min(o, i);
        for (label, w) in [
            ("gaussian", gaussian(o * i)),
            ("power", matrix_with_spectrum(o, i, &power_law(n, 0.6), 1)),
        ] {
            let m = WeightMatrix::new("bench", &w, o, i).unwrap();
            let mut best = f64::MAX;
            let mut g = None;
            for _ in 0..3 {
                let t = Instant::now();
                let s = solve(&m, rank, gpu).unwrap();
                best = best.min(t.elapsed().as_secs_f64() * 1e3);
                g = Some(s);
            }
            let g = g.unwrap();
            let (mut t32, mut t64, mut excess) = (f64::NAN, f64::NAN, f64::NAN);
            if let Some((cpu32, cpu64)) = cpu {
                let t = Instant::now();
                solve(&m, rank, cpu32).unwrap();
                t32 = t.elapsed().as_secs_f64() * 1e3;
                let t = Instant::now();
                let c = solve(&m, rank, cpu64).unwrap();
                t64 = t.elapsed().as_secs_f64() * 1e3;
                // The CPU f64 path meets the Eckart–Young optimum to ~1e-12 (tests/runtime/engine.rs).
                excess = g.value.relative_error / c.value.relative_error - 1.0;
            }
            println!(
                "{:<10} {:<8} {:>5} {:>9.1} {:>10.1} {:>10.1} {:>11.2e} {:>6}",
                format!("{o}x{i}"),
                label,
                rank,
                best,
                t32,
                t64,
                excess,
                g.value.iterations
            );
        }
    }
}

/// Data-aware fits: the exact fit against the weight-space fit on the same GPU.
fn data_aware(gpu: &FactorizeConfig) {
    for (o, i, rows, rank) in [
        (384, 384, 768, 64),
        (1536, 384, 768, 128),
        (4096, 4096, 16384, 512),
    ] {
        let w = matrix_with_spectrum(o, i, &power_law(o.min(i), 0.5), 1);
        let mut state = 11u64;
        let x: Vec<f64> = (0..rows * i)
            .map(|k| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5;
                u * (1.0 + (k % i) as f64).powf(-0.5) // columns of decaying scale
            })
            .collect();
        let bias = vec![0.0; o];
        let m = WeightMatrix::new("w", &w, o, i).unwrap();
        let c = Calibration::new("w", &x, rows, i).unwrap();
        let time = |f: &mut dyn FnMut()| {
            f();
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        };
        let weight = time(&mut || {
            solve(&m, rank, gpu).unwrap();
        });
        let exact = time(&mut || {
            calibrated::solve(&m, &bias, &c, rank, Fit::exact(), Backend::Cuda).unwrap();
        });
        println!("data-aware {o}x{i} from {rows} rows, rank {rank}: GPU weight-space {weight:.1} ms, GPU exact {exact:.1} ms ({:.2}x)", exact / weight);
    }
}

/// A model of 8 layers 4096×4096 at rank 512, host weights in, host factors out: one by one,
/// and with `solve_many`'s overlapped uploads.
fn many_layers(gpu: &FactorizeConfig, layers: &[Vec<f64>]) {
    let names: Vec<String> = (0..8).map(|k| format!("layer{k}")).collect();
    // The factors are kept, as a caller keeps them (fresh host memory for every layer).
    let t = Instant::now();
    let kept: Vec<_> = names
        .iter()
        .zip(layers)
        .map(|(name, w)| {
            let m = WeightMatrix::new(name, w, 4096, 4096).unwrap();
            solve(&m, 512, gpu).unwrap()
        })
        .collect();
    let one_by_one = t.elapsed().as_secs_f64() * 1e3;
    drop(kept);
    let t = Instant::now();
    let batch: Vec<(WeightMatrix<'_>, usize)> = names
        .iter()
        .zip(layers)
        .map(|(name, w)| (WeightMatrix::new(name, w, 4096, 4096).unwrap(), 512))
        .collect();
    let kept = solve_many(&batch, gpu).unwrap();
    println!(
        "8 layers 4096x4096 rank 512, power law, host to host: {:.1} ms with solve_many (uploads overlapped), {one_by_one:.1} ms with solve per layer",
        t.elapsed().as_secs_f64() * 1e3
    );
    drop(kept);
}

/// The same 8 layers as a dfdx model of f32 tensors: reading each weight off its tensor and
/// building the factorized layers count too.
fn dfdx_model(gpu: &FactorizeConfig, layers: &[Vec<f64>]) {
    let dev: Cpu = Default::default();
    let mut model: Eight<f32, Cpu> = Eight {
        l0: BuildModule::build(&dev),
        l1: BuildModule::build(&dev),
        l2: BuildModule::build(&dev),
        l3: BuildModule::build(&dev),
        l4: BuildModule::build(&dev),
        l5: BuildModule::build(&dev),
        l6: BuildModule::build(&dev),
        l7: BuildModule::build(&dev),
    };
    let fields = [
        &mut model.l0,
        &mut model.l1,
        &mut model.l2,
        &mut model.l3,
        &mut model.l4,
        &mut model.l5,
        &mut model.l6,
        &mut model.l7,
    ];
    for (layer, w) in fields.into_iter().zip(layers) {
        let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        layer.weight.copy_from(&w32);
    }
    let t = Instant::now();
    let (_, report) = model.factorize_with_report(gpu).unwrap();
    println!(
        "the same 8 layers as a dfdx f32 model, model.factorize on the GPU: {:.1} ms ({} replaced)",
        t.elapsed().as_secs_f64() * 1e3,
        report.replaced().count()
    );
}
