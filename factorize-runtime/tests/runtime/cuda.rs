//! The GPU engine keeps the CPU engine's contract. Without a usable GPU (CI, most machines)
//! each GPU test prints why it skipped; the backend-selection test runs everywhere.

use std::io::Write;

use factorize_runtime::engine::{gpu_available, low_rank, relative_error, solve, WeightMatrix};
use factorize_runtime::synthetic::{matrix_with_spectrum, optimal_relative_error, power_law};
use factorize_runtime::{Backend, FactorizeConfig, FactorizeError, Precision};

pub(crate) fn gpu(test: &str) -> bool {
    match gpu_available() {
        Ok(()) => true,
        Err(reason) => {
            // Straight to stderr: libtest captures `println!`, and a skip must be seen.
            let _ = writeln!(std::io::stderr(), "skipped {test}: no usable GPU: {reason}");
            false
        }
    }
}

fn cuda() -> FactorizeConfig {
    FactorizeConfig {
        backend: Backend::Cuda,
        ..Default::default()
    }
}

#[test]
fn backend_selection_never_panics_and_says_why() {
    let w = matrix_with_spectrum(40, 30, &power_law(30, 0.5), 1);
    let m = WeightMatrix::new("sel", &w, 40, 30).unwrap();
    let auto = solve(&m, 5, &FactorizeConfig::default()).unwrap();
    match gpu_available() {
        Ok(()) => {
            assert_eq!(auto.backend, Backend::Cuda);
            assert_eq!(solve(&m, 5, &cuda()).unwrap().backend, Backend::Cuda);
        }
        Err(reason) => {
            println!("no GPU here ({reason}): Auto must use the CPU, Cuda must be an error");
            assert_eq!(auto.backend, Backend::Cpu);
            let e = solve(&m, 5, &cuda()).unwrap_err();
            assert!(
                matches!(e, FactorizeError::BackendUnavailable { .. }),
                "{e}"
            );
            assert!(
                e.to_string().contains("`sel`") && e.to_string().contains(&reason),
                "{e}"
            );
        }
    }
}

fn check_against_cpu(out_dim: usize, in_dim: usize, sigma: &[f64], rank: usize) {
    let w = matrix_with_spectrum(out_dim, in_dim, sigma, 17);
    let m = WeightMatrix::new("gpu", &w, out_dim, in_dim).unwrap();
    let g = solve(&m, rank, &cuda()).unwrap();
    assert_eq!(g.backend, Backend::Cuda);
    let measured = relative_error(&m, &g.value.second, &g.value.first, rank);
    let optimum = optimal_relative_error(sigma, rank);
    assert!(
        (measured - optimum).abs() <= 1e-4 * optimum + 1e-12,
        "{out_dim}x{in_dim} rank {rank}: GPU {measured} vs optimum {optimum}"
    );
    assert!((g.value.relative_error - measured).abs() <= 1e-4 * optimum + 1e-12);
    let c = low_rank(&m, rank, Precision::F64).unwrap();
    assert!(
        (g.value.relative_error - c.relative_error).abs() <= 1e-4 * c.relative_error + 1e-12,
        "GPU {} vs CPU {}",
        g.value.relative_error,
        c.relative_error
    );
    for (a, b) in g
        .value
        .singular_values
        .iter()
        .zip(&c.singular_values)
        .take(8)
    {
        assert!((a - b).abs() <= 1e-6 * c.singular_values[0], "{a} vs {b}");
    }
}

#[test]
fn gpu_meets_the_optimum_and_agrees_with_the_cpu() {
    if !gpu("gpu_meets_the_optimum_and_agrees_with_the_cpu") {
        return;
    }
    // Dense path (block not much smaller than the side): square, wide, tall.
    check_against_cpu(96, 96, &power_law(96, 0.7), 24);
    check_against_cpu(64, 160, &power_law(64, 1.0), 16);
    check_against_cpu(160, 64, &power_law(64, 0.4), 40);
    check_against_cpu(50, 70, &[3.0, 2.0, 1.0], 3);
    // Subspace iteration: rank small next to the side.
    check_against_cpu(300, 600, &power_law(300, 0.5), 16);
    check_against_cpu(640, 300, &power_law(300, 1.0), 16);
    let flat = vec![1.0; 1024];
    check_against_cpu(1024, 1024, &flat, 128);
    check_against_cpu(2048, 1024, &power_law(1024, 0.6), 128);
    // Over two pinned staging buffers (2 · 4Mi values) with a tail: the upload is staged.
    check_against_cpu(4100, 2600, &power_law(40, 0.5), 8);
}

#[test]
fn gpu_special_matrices() {
    if !gpu("gpu_special_matrices") {
        return;
    }
    let z = vec![0.0; 20 * 30];
    let m = WeightMatrix::new("zeros", &z, 20, 30).unwrap();
    let f = solve(&m, 4, &cuda()).unwrap().value;
    assert_eq!(f.relative_error, 0.0);
    assert!(f.first.iter().chain(&f.second).all(|x| x.is_finite()));
    let ones = vec![1.0; 20 * 30];
    let m = WeightMatrix::new("ones", &ones, 20, 30).unwrap();
    let f = solve(&m, 1, &cuda()).unwrap().value;
    assert!(f.relative_error < 1e-10, "{}", f.relative_error);
}

#[test]
fn gpu_is_deterministic() {
    if !gpu("gpu_is_deterministic") {
        return;
    }
    let w = matrix_with_spectrum(512, 700, &power_law(512, 0.8), 3);
    let m = WeightMatrix::new("det", &w, 512, 700).unwrap();
    let a = solve(&m, 32, &cuda()).unwrap().value;
    let b = solve(&m, 32, &cuda()).unwrap().value;
    assert_eq!(a, b);
}

mod calibrated {
    use super::gpu;
    use factorize_runtime::engine::calibrated::{fit_linear, solve, Calibration};
    use factorize_runtime::engine::{gpu_available, WeightMatrix};
    use factorize_runtime::synthetic::{matrix_with_spectrum, power_law};
    use factorize_runtime::Fit;
    use factorize_runtime::{Backend, FactorizeError};

    fn case(out_dim: usize, in_dim: usize, rows: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let w = matrix_with_spectrum(out_dim, in_dim, &power_law(out_dim.min(in_dim), 0.5), 1);
        let mix = matrix_with_spectrum(in_dim, in_dim, &power_law(in_dim, 1.0), 2);
        let z = matrix_with_spectrum(rows, in_dim, &vec![1.0; rows.min(in_dim)], 3);
        let (zm, mm) = (
            faer::MatRef::from_row_major_slice(&z, rows, in_dim),
            faer::MatRef::from_row_major_slice(&mix, in_dim, in_dim),
        );
        let xm = zm * mm;
        let x: Vec<f64> = (0..rows)
            .flat_map(|i| (0..in_dim).map(move |j| (i, j)))
            .map(|(i, j)| xm[(i, j)] + 0.3)
            .collect();
        let bias: Vec<f64> = (0..out_dim).map(|o| (o as f64).sin()).collect();
        (w, x, bias)
    }

    #[test]
    fn gpu_exact_fit_agrees_with_the_cpu() {
        if !gpu("gpu_exact_fit_agrees_with_the_cpu") {
            return;
        }
        // wide, tall, rank-deficient rows, and a rank small enough for the subspace iteration.
        for (o, i, n, rank, ridge) in [
            (64, 160, 300, 16, 0.0),
            (200, 64, 300, 16, 0.0),
            (64, 160, 50, 16, 0.1),
            (512, 512, 1000, 24, 0.1),
            (700, 300, 900, 20, 0.0),
            // Rows over two pinned staging buffers, with a tail: a staged upload.
            (48, 64, 131_200, 8, 0.0),
        ] {
            let (w, x, bias) = case(o, i, n);
            let m = WeightMatrix::new("fc", &w, o, i).unwrap();
            let c = Calibration::new("fc", &x, n, i).unwrap();
            let cpu = fit_linear(&m, &bias, &c, rank, Fit::Exact { ridge }).unwrap();
            let solved = solve(&m, &bias, &c, rank, Fit::Exact { ridge }, Backend::Cuda).unwrap();
            assert_eq!(solved.backend, Backend::Cuda);
            let g = solved.value;
            assert!(
                (g.nmse / cpu.nmse - 1.0).abs() < 1e-6,
                "{o}x{i} n {n}: GPU {} vs CPU {}",
                g.nmse,
                cpu.nmse
            );
            assert!((g.factors.relative_error - cpu.factors.relative_error).abs() < 1e-6);
            let db: f64 = g
                .bias
                .iter()
                .zip(&cpu.bias)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                db < 1e-6 * (1.0 + cpu.bias.iter().map(|b| b.abs()).fold(0.0, f64::max)),
                "bias {db}"
            );
        }
    }

    #[test]
    fn backend_choice_for_calibrated_fits() {
        let (w, x, bias) = case(40, 30, 60);
        let m = WeightMatrix::new("fc", &w, 40, 30).unwrap();
        let c = Calibration::new("fc", &x, 60, 30).unwrap();
        let backend = |fit, backend| solve(&m, &bias, &c, 4, fit, backend).map(|s| s.backend);
        assert_eq!(backend(Fit::exact(), Backend::Cpu).unwrap(), Backend::Cpu);
        let als = backend(Fit::als(), Backend::Cuda).unwrap();
        assert_eq!(als, Backend::Cpu, "ALS runs on the CPU");
        match gpu_available() {
            Ok(()) => {
                assert_eq!(backend(Fit::exact(), Backend::Auto).unwrap(), Backend::Cuda);
            }
            Err(_) => {
                assert_eq!(backend(Fit::exact(), Backend::Auto).unwrap(), Backend::Cpu);
                let e = backend(Fit::exact(), Backend::Cuda).unwrap_err();
                assert!(
                    matches!(e, FactorizeError::BackendUnavailable { .. }),
                    "{e}"
                );
            }
        }
    }
}

/// The layer-level and model-level calibrated APIs reach the GPU: the model-level one on
/// `cfg.backend`, the layer-level ones as `Backend::Auto`.
mod calibrated_apis {
    use dfdx::nn::modules::{Linear, ReLU};
    use dfdx::prelude::*;
    use factorize_runtime::engine::gpu_available;
    use factorize_runtime::synthetic::{matrix_with_spectrum, power_law};
    use factorize_runtime::Fit;
    use factorize_runtime::{
        mirror, Backend, Factorizable, FactorizeConfig, FactorizeError, FactorizedLinear,
    };

    type Batch = Tensor<(usize, Const<96>), f64, Cpu>;

    #[derive(Factorizable)]
    #[factorize(latent_features = 12, min_features = 32)]
    pub struct Net<E: Dtype, D: Device<E>> {
        pub a: Linear<96, 80, E, D>,
        pub act: ReLU,
        pub b: Linear<80, 64, E, D>,
    }

    #[mirror]
    impl<E: Dtype, D: Device<E>> Module<Tensor<(usize, Const<96>), E, D>> for Net<E, D> {
        type Output = Tensor<(usize, Const<64>), E, D>;
        type Error = D::Err;
        fn try_forward(&self, x: Tensor<(usize, Const<96>), E, D>) -> Result<Self::Output, D::Err> {
            self.b
                .try_forward(self.act.try_forward(self.a.try_forward(x)?)?)
        }
    }

    fn setup() -> (Net<f64, Cpu>, Batch) {
        let dev = Cpu::seed_from_u64(3);
        let mut net = Net::<f64, Cpu> {
            a: BuildModule::build(&dev),
            act: ReLU,
            b: BuildModule::build(&dev),
        };
        net.a
            .weight
            .copy_from(&matrix_with_spectrum(80, 96, &power_law(80, 0.5), 1));
        net.b
            .weight
            .copy_from(&matrix_with_spectrum(64, 80, &power_law(64, 0.5), 2));
        let x = matrix_with_spectrum(300, 96, &power_law(96, 1.0), 4);
        (net, dev.tensor_from_vec(x, (300, Const)))
    }

    fn on(backend: Backend) -> FactorizeConfig {
        FactorizeConfig {
            backend,
            ..Default::default()
        }
    }

    #[test]
    fn calibrated_apis_run_on_the_backend_asked_for() {
        let (net, x) = setup();
        let run = |m: &NetFactorized<f64, Cpu>| {
            m.forward(x.clone());
        };
        let (_, cpu) = net
            .factorize_calibrated(&on(Backend::Cpu), Fit::exact(), run)
            .unwrap();
        assert!(
            cpu.layers.iter().all(|r| r.backend == Some(Backend::Cpu)),
            "{cpu}"
        );
        let (_, layer) = FactorizedLinear::<96, 12, 80, f64, Cpu>::from_linear_calibrated(
            "a",
            &net.a,
            &x,
            Fit::exact(),
            &FactorizeConfig::default(),
        )
        .unwrap();
        match gpu_available() {
            Ok(()) => {
                let (_, gpu) = net
                    .factorize_calibrated(&on(Backend::Cuda), Fit::exact(), run)
                    .unwrap();
                for (g, c) in gpu.layers.iter().zip(&cpu.layers) {
                    assert_eq!(g.backend, Some(Backend::Cuda), "{gpu}");
                    let (g, c) = (g.nmse.unwrap(), c.nmse.unwrap());
                    assert!((g / c - 1.0).abs() < 1e-6, "GPU {g} vs CPU {c}");
                }
                assert_eq!(layer.backend, Some(Backend::Cuda));
            }
            Err(reason) => {
                let e = net
                    .factorize_calibrated(&on(Backend::Cuda), Fit::exact(), run)
                    .map(|_| ())
                    .unwrap_err();
                assert!(
                    matches!(e, FactorizeError::BackendUnavailable { .. }),
                    "{e}"
                );
                assert!(
                    e.to_string().contains("`a`") && e.to_string().contains(&reason),
                    "{e}"
                );
                assert_eq!(layer.backend, Some(Backend::Cpu));
            }
        }
    }
}

/// `solve_many` gives each layer exactly what `solve` gives it, on every backend: on the GPU
/// the uploads overlap the solves (two of these layers are large enough to be staged).
#[test]
fn solve_many_matches_solve_layer_by_layer() {
    let gpu_here = gpu_available().is_ok();
    // The middle layer is large (staged) only where a GPU runs it.
    let big = if gpu_here { (4100, 2600) } else { (400, 260) };
    let shapes = [(300, 600, 16), (big.0, big.1, 8), (640, 300, 16)];
    let data: Vec<Vec<f64>> = (0..3)
        .map(|k| matrix_with_spectrum(shapes[k].0, shapes[k].1, &power_law(40, 0.5), k as u64))
        .collect();
    let layers: Vec<(WeightMatrix<'_>, usize)> = (0..3)
        .map(|k| {
            let (o, i, rank) = shapes[k];
            (
                WeightMatrix::new(["a", "b", "c"][k], &data[k], o, i).unwrap(),
                rank,
            )
        })
        .collect();
    let cpu = FactorizeConfig {
        backend: Backend::Cpu,
        ..Default::default()
    };
    let mut configs = vec![cpu];
    if gpu("solve_many_matches_solve_layer_by_layer (GPU part)") {
        configs.push(cuda());
    }
    for cfg in configs {
        let many = factorize_runtime::engine::solve_many(&layers, &cfg).unwrap();
        assert_eq!(many.len(), layers.len());
        for ((w, rank), m) in layers.iter().zip(&many) {
            let one = solve(w, *rank, &cfg).unwrap();
            assert_eq!(m.backend, one.backend);
            assert_eq!(m.value, one.value, "{} on {:?}", w.name(), cfg.backend);
        }
    }
    // Ranks are checked before any work, naming the layer.
    let mut bad = layers.clone();
    bad[2].1 = 1000;
    let e = factorize_runtime::engine::solve_many(&bad, &cpu).unwrap_err();
    assert!(
        matches!(e, FactorizeError::Rank { ref layer, .. } if layer == "c"),
        "{e}"
    );
    assert!(factorize_runtime::engine::solve_many(&[], &cpu)
        .unwrap()
        .is_empty());
    if !gpu_here {
        let e = factorize_runtime::engine::solve_many(&layers, &cuda()).unwrap_err();
        assert!(
            matches!(e, FactorizeError::BackendUnavailable { ref layer, .. } if layer == "a"),
            "{e}"
        );
    }
}
